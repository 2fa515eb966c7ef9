"""A Transformer teacher (methods.md §13): the attention-weight initialisation by hand, a student
with every attention layer kept computes the teacher's function, the hybrid's cache equals its
full forward, the from-scratch Llama teacher, and the errors a user converting a checkpoint meets."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import spiking
from spiking.convert import from_transformer

H, HEADS, KV, DH = 8, 2, 1, 4  # one KV head shared by two query heads (GQA)


def llama(layers: int = 1, heads: int = HEADS, kv: int = KV, tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=13, hidden_size=H, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=DH, intermediate_size=12, max_position_embeddings=64, tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm copied to the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def char_llama(layers: int = 2, tie: bool = True):
    """(the arithmetic task's character tokenizer, a random Llama with its vocabulary and special ids)."""
    from stages.data import build_char_tokenizer

    tokenizer = build_char_tokenizer("0123456789+=")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=H, num_hidden_layers=layers, num_attention_heads=HEADS,
        num_key_value_heads=KV, head_dim=DH, intermediate_size=12, tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer, LlamaForCausalLM(config).eval()


def test_attention_initialisation_by_hand_one_layer():
    teacher = llama(layers=1, tie=False)
    student = from_transformer(teacher)
    attn, mixer, block = teacher.model.layers[0].self_attn, student.backbone.layers[0].mixer, student.backbone.layers[0]
    q, k, v, o = (getattr(attn, f"{n}_proj").weight for n in "qkvo")
    E, N = HEADS * DH, KV * DH
    assert (mixer.intermediate_size, mixer.ssm_state_size) == (E, N) and student.config.bc_proj
    # x rows: query head j's channel c reads KV head j // (HEADS // KV), channel c, of V
    for row in range(E):
        head, channel = divmod(row, DH)
        kv_head = head // (HEADS // KV)
        assert torch.equal(mixer.in_proj.weight[row], v[kv_head * DH + channel])
    # B = K's rows; C = the mean of the query heads of the (single) KV group, scaled by 1/sqrt(DH) = 1/2
    for n in range(N):
        assert torch.equal(mixer.bc_proj.weight[n], k[n])
        expected_c = (q[n] + q[DH + n]) / 2 / 2
        assert torch.allclose(mixer.bc_proj.weight[N + n], expected_c, atol=1e-7)
    assert torch.equal(mixer.out_proj.weight, o)
    # the conv passes the current token through: weight [E, 1, K] = (0, ..., 0, 1), bias 0
    K = mixer.conv1d.kernel_size[0]
    assert torch.equal(mixer.conv1d.weight[:, 0], torch.tensor([0.0] * (K - 1) + [1.0]).expand(E, K))
    assert torch.equal(mixer.conv1d.bias, torch.zeros(E))
    # x_proj now yields Δ only (rank R), from the conv output
    assert mixer.x_proj.weight.shape == (student.config.time_step_rank, E)
    # copied around the mixer
    layer = teacher.model.layers[0]
    assert torch.equal(block.norm.weight, layer.input_layernorm.weight)
    assert torch.equal(block.mlp_norm.weight, layer.post_attention_layernorm.weight)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(block.mlp, name).weight, getattr(layer.mlp, name).weight)
    assert torch.equal(student.backbone.embeddings.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.backbone.norm_f.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)  # untied teacher: its own head


def test_converted_mixer_at_step_zero_is_gated_linear_attention_by_hand():
    """One token, state 0: y = C·(Δ·x·B) + D·x, so with the copied weights and the identity conv the
    output is out_proj( ((C·B)·Δ + D) · SiLU(V h) · SiLU(z) ), computed here by hand."""
    teacher = llama(layers=1)
    mixer = from_transformer(teacher).backbone.layers[0].mixer.eval()
    h = torch.randn(1, 1, H)
    E, N = HEADS * DH, KV * DH
    with torch.no_grad():
        xz = mixer.in_proj.weight @ h[0, 0]
        x, z = torch.nn.functional.silu(xz[:E]), xz[E:]
        B, C = mixer.bc_proj.weight[:N] @ h[0, 0], mixer.bc_proj.weight[N:] @ h[0, 0]
        dt = torch.nn.functional.softplus(mixer.dt_proj.weight @ (mixer.x_proj.weight @ x) + mixer.dt_proj.bias)
        y = (C @ B) * dt * x + mixer.D * x
        expected = mixer.out_proj.weight @ (y * torch.nn.functional.silu(z))
        got = mixer(h)[0, 0]
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kv", [2, 1])
def test_every_layer_kept_reproduces_the_teacher(kv):
    teacher = llama(layers=3, kv=kv)
    student = from_transformer(teacher, keep_attention=[0, 1, 2]).eval()
    ids = torch.randint(3, 13, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding: the real positions must agree
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
        s, t = student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits
        assert torch.allclose(s[mask.bool()], t[mask.bool()], atol=1e-6)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        student.generate(ids, attention_mask=mask, **greedy), teacher.generate(ids, attention_mask=mask, **greedy)
    )


def _greedy_by_full_forward(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_hybrid_cache_equals_full_forward():
    teacher = llama(layers=3, kv=1)
    student = from_transformer(teacher, keep_attention=[1], neurons=spiking.default_neurons()).eval()
    assert student.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    spiking.calibrate(student, [torch.randint(3, 13, (4, 12))])
    ids = torch.randint(3, 13, (2, 10))
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :4], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(4, 10):  # one token at a time, the mask over past + new as generate keeps it
            out = student(ids[:, t : t + 1], cache=cache, use_cache=True, attention_mask=torch.ones(2, t + 1, dtype=torch.long))
            steps.append(out.logits)
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        assert cache.get_seq_length(1) == 10  # the kept layer's KV cache holds every token
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(student.generate(ids, **greedy), _greedy_by_full_forward(student, ids, 5))
    # left padding: a padded row generates what it generates alone
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    padded = student.generate(ids, attention_mask=mask, **greedy)
    alone = student.generate(ids[:1, 4:], **greedy)
    assert torch.equal(padded[0, 10:], alone[0, 6:])


def test_hybrid_saves_and_loads_as_an_hf_model(tmp_path):
    student = from_transformer(llama(layers=2), keep_attention=[0]).eval()
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.attention_layers == [0] and loaded.config.bc_proj
    ids = torch.randint(3, 13, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_from_teacher_dispatches_and_the_distill_loop_learns():
    """from_teacher takes a Transformer too; a few KD steps lower the KL (the hybrid is trainable)."""
    teacher = llama(layers=2)
    with torch.no_grad():  # a peaked teacher (random init predicts nearly uniformly): a KL worth lowering
        for layer in teacher.model.layers:
            layer.self_attn.o_proj.weight.mul_(30)
            layer.mlp.down_proj.weight.mul_(30)
    student = spiking.from_teacher(teacher, neurons=spiking.default_neurons(), keep_attention=[1])
    assert isinstance(student, spiking.SpikingMambaForCausalLM) and student.config.attention_layers == [1]
    ids = torch.randint(3, 13, (8, 12))
    spiking.calibrate(student, [ids])
    with torch.no_grad():
        target = torch.log_softmax(teacher(ids).logits, -1)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)

    def kl():
        return torch.nn.functional.kl_div(torch.log_softmax(student(ids).logits, -1), target, log_target=True, reduction="batchmean")

    first = kl().item()
    assert first > 0.005  # the converted Mamba layer changes the function: something to learn
    for _ in range(30):
        optimizer.zero_grad()
        loss = kl()
        loss.backward()
        optimizer.step()
    assert kl().item() < 0.5 * first


def test_block_outputs_align_teacher_and_student_blocks():
    from stages.training import block_outputs

    teacher = llama(layers=3)
    student = from_transformer(teacher, keep_attention=[0, 1, 2]).eval()
    ids = torch.randint(3, 13, (1, 6))
    with torch.no_grad():
        t = block_outputs(teacher(ids, output_hidden_states=True).hidden_states, teacher)
        s = block_outputs(student(ids, output_hidden_states=True).hidden_states, student)
    assert (len(t), len(s)) == (2, 3)  # HF Llama does not return its last block's own output
    for a, b in zip(s, t):  # the same function: block l against block l
        assert torch.allclose(a, b, atol=1e-6)


def test_conversion_errors_name_the_problem():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=13))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_transformer(gpt2)
    with pytest.raises(ValueError, match="keep_attention: 5 is not a layer id"):
        from_transformer(llama(layers=2), keep_attention=[5])
    gelu = llama(layers=1)
    gelu.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_transformer(gelu)
    mamba = spiking.SpikingMambaForCausalLM(spiking.SpikingMambaConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1))
    with pytest.raises(ValueError, match="keep_attention: the teacher is a Mamba"):
        spiking.from_teacher(mamba, keep_attention=[0])
    with pytest.raises(ValueError, match="to_hf_mamba"):
        spiking.to_hf_mamba(from_transformer(llama(layers=1)))


def test_teacher_arch_llama_fields():
    from stages.context import TeacherArch
    from stages.teacher import build_model

    with pytest.raises(ValueError, match="num_attention_heads does not apply to architecture 'mamba'"):
        TeacherArch(num_attention_heads=2)
    with pytest.raises(ValueError, match="state_size does not apply to architecture 'llama'"):
        TeacherArch(architecture="llama", state_size=8)
    with pytest.raises(ValueError, match="must divide by num_attention_heads"):
        TeacherArch(architecture="llama", hidden_size=30, num_attention_heads=4)

    class Tok:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return 17

    model = build_model(TeacherArch(architecture="llama", hidden_size=16, num_hidden_layers=2, num_key_value_heads=2), Tok())
    assert isinstance(model, LlamaForCausalLM)
    assert (model.config.vocab_size, model.config.num_key_value_heads, model.config.intermediate_size) == (17, 2, 64)


def test_transformer_tiny_recipe_code_path(tmp_path):
    """Every stage of recipes/transformer-tiny.yaml through the CLI at tiny budgets: a Llama teacher,
    a hybrid spiking student (layers 1 and 3 kept), sparsify, GRPO, eval with energy at two contexts."""
    from pathlib import Path

    from pipeline.__main__ import main

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    small = ("eval_samples=16",)
    overrides = [
        f"run.output_dir={run}", "stages.data.source.num_problems=2000", "stages.data.test_size=16", "stages.data.rl_prompts=32",
        "stages.teacher.max_steps=20", "stages.teacher.save_steps=10",
        "stages.distill.max_steps=4", "stages.sparsify.max_steps=2", "stages.rl.trl.max_steps=1",
        "stages.rl.trl.per_device_train_batch_size=8", "stages.eval.eval_blocks=4",
        *[f"stages.{stage}.{knob}" for stage in ("teacher", "distill", "sparsify", "rl", "eval") for knob in small],
    ]
    assert main(["run", str(root / "recipes" / "transformer-tiny.yaml"), *overrides]) == 0
    teacher = AutoModelForCausalLM.from_pretrained(run / "teacher")
    assert isinstance(teacher, LlamaForCausalLM)  # saved as transformers' own class
    student = spiking.load_deployed(run / "sparsify")
    assert student.config.attention_layers == [1, 3] and student.config.bc_proj
    assert {"mlp.up", "mlp.down", "in_proj", "out_proj"} <= set(student.config.neurons)
    metrics = __import__("json").loads((run / "eval" / "metrics.json").read_text())
    for stage in ("teacher", "distill", "sparsify", "rl"):
        assert metrics["stages"][stage]["status"] == "evaluated", stage
    by_context = metrics["stages"]["distill"]["energy_by_context"]
    assert by_context["attention"] and by_context["contexts"] == [256, 2048]
    # the teacher's attention grows with the context; the hybrid has attention in two layers of four
    assert by_context["ratio_to_teacher"]["ctx2048"] > max(1.0, by_context["ratio_to_teacher"]["ctx256"])
    report = (run / "eval" / "report" / "report.md").read_text()
    assert "Energy per token by context length" in report
    # the model cards say what each folder is
    assert "4 layers, 4 attention heads (2 key/value)" in (run / "teacher" / "README.md").read_text()
    assert "kept attention layers [1, 3]" in (run / "distill" / "README.md").read_text()


def test_attention_init_false_keeps_the_mixers_own_initialisation():
    teacher = llama(layers=1)
    torch.manual_seed(1)
    plain = from_transformer(teacher, attention_init=False)
    mixer = plain.backbone.layers[0].mixer
    assert not torch.equal(mixer.out_proj.weight, teacher.model.layers[0].self_attn.o_proj.weight)
    assert mixer.conv1d.weight[:, 0, :-1].abs().sum() > 0  # not the identity conv
    # everything around the mixers is still the teacher's
    assert torch.equal(plain.backbone.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)


def test_a_dense_converted_student_is_compared_with_its_teacher():
    """distill's `placement: []` on a Transformer: a neuron-free student; no firing rate, energy of both."""
    from datasets import Dataset

    from stages import tasks

    tokenizer, teacher = char_llama()
    student = from_transformer(teacher, keep_attention=[0]).eval()
    blocks = Dataset.from_dict({"input_ids": torch.randint(3, len(tokenizer), (2, 8)).tolist()})
    prompts = Dataset.from_dict({"prompt": ["1+2=", "3+4="], "answer": ["3", "7"]})
    metrics, report = tasks.compare_with_teacher(student, teacher, tokenizer, blocks, prompts, budget=2, batch_size=2)
    assert metrics["firing_rate"] is None and not any(key.startswith("firing_rate/") for key in metrics)
    assert metrics["energy_ratio"] > 0 and report.context == pytest.approx(4.5)  # (8 + 1) / 2 keys per token


def test_a_hybrid_folder_loads_and_generates_without_spikerl(tmp_path):
    """The saved hybrid carries its code (the kept attention is transformers' own module): loaded with
    trust_remote_code where `import spiking` fails, it computes what it computes here."""
    import json
    import subprocess
    import sys

    from tests.test_portable import WITHOUT_SPIKERL, without_spikerl_env

    tokenizer, teacher = char_llama()
    student = from_transformer(teacher, keep_attention=[1], neurons=spiking.default_neurons()).eval()
    texts = ["12+34=", "5+6="]
    spiking.calibrate(student, [tokenizer(texts, return_tensors="pt", padding=True)])
    folder = tmp_path / "hybrid"
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    blocked = tmp_path / "blocked"
    for name in ("spiking", "triton"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here (test stub)')\n")
    script, out_file = tmp_path / "load.py", tmp_path / "out.json"
    script.write_text(WITHOUT_SPIKERL)
    done = subprocess.run(
        [sys.executable, str(script), str(out_file), json.dumps(texts), str(folder)],
        cwd=tmp_path, env=without_spikerl_env(blocked, tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(out_file.read_text())
    assert got["spiking_modules"] == [] and got[str(folder)]["class"].endswith(".SpikingMambaForCausalLM")
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = student(**inputs).logits
        generated = student.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert (torch.tensor(got[str(folder)]["logits"]) - logits.flatten()).abs().max().item() <= 1e-5
    assert got[str(folder)]["generated"] == generated.tolist()


def test_a_pretrained_llama_folder_goes_through_the_pipeline(tmp_path):
    """What a user converting a Llama checkpoint does: `model.teacher.pretrained: <folder>` (weights and
    tokenizer), the teacher stage keeps it as loaded, distill converts it into a hybrid."""
    from pathlib import Path

    from pipeline.__main__ import main
    tokenizer, llama_model = char_llama(tie=False)
    checkpoint = tmp_path / "my-llama"
    llama_model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    overrides = [
        f"run.output_dir={run}", f"model.teacher={{pretrained: {checkpoint}}}", "stages.data.source.num_problems=600",
        "stages.data.test_size=8", "stages.data.rl_prompts=8", "stages.teacher.eval_samples=8",
        "stages.distill.max_steps=2", "stages.distill.eval_samples=8", "stages.distill.keep_attention=[0]",
    ]
    assert main(["run", str(root / "recipes" / "transformer-tiny.yaml"), "--until", "distill", *overrides]) == 0
    teacher = AutoModelForCausalLM.from_pretrained(run / "teacher")
    assert isinstance(teacher, LlamaForCausalLM)
    original = LlamaForCausalLM.from_pretrained(checkpoint)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), original.state_dict().values()))
    student = spiking.load_deployed(run / "distill")
    assert student.config.attention_layers == [0] and not student.config.tie_word_embeddings


def test_a_qwen2_teacher_with_qkv_bias():
    """Qwen2 (q/k/v biases, no o_proj bias): every layer kept reproduces it; converted layers drop the biases."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=13, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV,
        intermediate_size=12, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    teacher = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # biases away from 0, so a dropped one shows
        for layer in teacher.model.layers:
            for name in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, name).bias.uniform_(-0.5, 0.5)
    ids = torch.randint(3, 13, (2, 9))
    kept = from_transformer(teacher, keep_attention=[0, 1]).eval()
    assert kept.config.attention["attention_bias"]
    with torch.no_grad():
        assert torch.allclose(kept(ids).logits, teacher(ids).logits, atol=1e-6)
        assert torch.equal(kept.backbone.layers[0].mixer.o_proj.bias, torch.zeros(H))
    converted = from_transformer(teacher, keep_attention=[1]).eval()
    mixer = converted.backbone.layers[0].mixer
    assert torch.equal(mixer.bc_proj.weight[: KV * DH], teacher.model.layers[0].self_attn.k_proj.weight)
    with torch.no_grad():
        assert converted(ids).logits.isfinite().all()
