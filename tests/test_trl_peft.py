"""The student under TRL's GRPOTrainer (beta = 0 and beta > 0) and PEFT LoRA, on CPU.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_trl_peft.py -q
"""

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import spiking  # registers the Auto classes
from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, calibrate, default_neurons, lora_target_modules

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

CHARS = list("0123456789+=")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level WordLevel tokenizer built offline: <pad>=0, <eos>=1, then one id per char."""
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def tiny_student(tokenizer) -> SpikingMambaForCausalLM:
    torch.manual_seed(0)
    config = SpikingMambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        neurons=default_neurons(D=4),
    )
    model = SpikingMambaForCausalLM(config)
    calibrate(model, [tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)])
    return model


def digit_sum_reward(completions, **kwargs):
    """Varies across samples, so GRPO's group advantages are non-zero and the policy moves."""
    return [float(sum(int(c) for c in text if c.isdigit())) for text in completions]


def prompts():
    return Dataset.from_dict({"prompt": ["12+34=", "5+6=", "70+8=", "9+99="] * 2})


def grpo_args(tmp_path, **overrides):
    return trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"), use_cpu=True, bf16=False, report_to=[], max_steps=2,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=4, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", seed=0, **overrides,
    )


def changed(before: dict, model) -> list[str]:
    return [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_trains_the_student(tmp_path, beta):
    tokenizer = char_tokenizer()
    model = tiny_student(tokenizer)
    # beta > 0: TRL rebuilds the reference from config._name_or_path, so train from a saved folder
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=digit_sum_reward, args=grpo_args(tmp_path, beta=beta),
        train_dataset=prompts(), processing_class=tokenizer,
    )
    assert (trainer.ref_model is not None) == (beta > 0)
    trainer.train()
    moved = changed(before, trainer.model)
    assert any(".mixer.in_proj." in n for n in moved), moved
    assert any(".neurons." in n for n in moved), "neuron thresholds should train too"
    assert all(r["kl"] >= 0 for r in trainer.state.log_history if "kl" in r)


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_with_a_peft_config_trains_the_adapter_only(tmp_path, beta):
    """TRL wraps the student with PEFT itself (`peft_config`, PEFT's usual Mamba target list);
    with beta > 0 the reference is the same model with the adapter off."""
    tokenizer = char_tokenizer()
    model = tiny_student(tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "dt_proj"], task_type="CAUSAL_LM")
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=digit_sum_reward, args=grpo_args(tmp_path, beta=beta),
        train_dataset=prompts(), processing_class=tokenizer, peft_config=lora,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = changed(before, trainer.model)
    assert any("lora_B" in n for n in moved), moved
    assert all("lora_" in n for n in moved), [n for n in moved if "lora_" not in n]
    assert not any(".neurons." in n and "lora_" in n for n, _ in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "target, adapted",
    [
        (["in_proj", "x_proj", "dt_proj"], {"in_proj", "x_proj", "dt_proj"}),  # Mamba's usual LoRA target
        ("all-linear", {"in_proj", "x_proj", "dt_proj", "out_proj"}),  # every linear layer but the LM head
    ],
    ids=["mamba-list", "all-linear"],
)
def test_peft_lora_with_standard_targets_adapts_projections_only(target, adapted):
    """PEFT's own target forms on a student with a neuron before in_proj, x_proj and out_proj:
    the projections get adapters, no neuron does, and training moves the adapter weights alone."""
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = SpikingMambaConfig(
        vocab_size=len(tokenizer), hidden_size=32, state_size=8, num_hidden_layers=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        neurons={**default_neurons(D=4), "x_proj": {"kind": "atmn", "T": 2}},
    )
    model = SpikingMambaForCausalLM(config)
    calibrate(model, [tokenizer(["12+34=", "5+6="], return_tensors="pt", padding=True)])
    neuron_names = {name for name, _ in spiking.iter_neurons(model)}
    assert len(neuron_names) == 6
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target, task_type="CAUSAL_LM"))
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == adapted, wrapped
    assert len(wrapped) == 2 * len(adapted)  # each projection of both blocks
    assert not wrapped & neuron_names
    assert len({name for name, _ in spiking.iter_neurons(model)}) == 6  # every neuron still there, unwrapped

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = tokenizer(["12+34=46", "5+6=11"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for _ in range(2):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = changed(before, model)
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved), moved
    assert all("lora_" in n for n in moved)
    for name in adapted:
        assert any(f"{name}.lora_B" in n for n in moved), name


def test_lora_target_modules_is_the_plain_list():
    assert lora_target_modules() == ["in_proj", "x_proj", "dt_proj"]
    assert lora_target_modules(("in_proj",)) == ["in_proj"]
