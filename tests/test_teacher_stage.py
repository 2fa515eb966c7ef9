"""The teacher stage: from-scratch training, exact resume, pretrained loading, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM, TrainerCallback

from stages import data, teacher, training
from stages.context import ModelConfig, StageContext, TeacherArch, TeacherSource

TINY_ARCH = TeacherArch(hidden_size=16, num_hidden_layers=1, state_size=4)
TINY_TRAIN = {"max_steps": 6, "batch_size": 4, "save_steps": 3, "logging_steps": 2, "eval_samples": 8, "eval_blocks": 4}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    ctx = StageContext(stage="data", run_dir=root, out_dir=root / "data", upstream={}, model=ModelConfig(), seed=0)
    ctx.out_dir.mkdir()
    cfg = data.Config(source={"synthetic": "arithmetic", "digits": [2], "num_problems": 300}, test_size=40, rl_prompts=20, seq_len=12)
    data.run(cfg, ctx)
    return ctx.out_dir


def teacher_ctx(tmp_path: Path, data_dir: Path, name: str = "teacher", seed: int = 0, **model) -> StageContext:
    source = TeacherSource(**model) if model else TeacherSource(train_from_scratch=TINY_ARCH)
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage="teacher", run_dir=tmp_path, out_dir=out, upstream={"data": data_dir},
        model=ModelConfig(teacher=source), seed=seed,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_train_from_scratch_saves_a_loadable_teacher_and_metrics(tmp_path, data_dir):
    ctx = teacher_ctx(tmp_path, data_dir)
    metrics = teacher.run(teacher.Config(**TINY_TRAIN), ctx)
    assert metrics["steps"] == 6 and metrics["train_loss"] > 0
    assert 0.0 <= metrics["teacher_accuracy"] <= 1.0 and metrics["eval_samples"] == 8
    assert 1.0 < metrics["teacher_ppl"] < 2 * 18  # near-uniform over 18 tokens at worst, after 6 steps
    model = AutoModelForCausalLM.from_pretrained(ctx.out_dir)
    assert isinstance(model, MambaForCausalLM) and model.config.vocab_size == 18
    assert model.config.eos_token_id == 2 and model.config.pad_token_id == 0
    assert (ctx.out_dir / "tokenizer.json").is_file()
    assert sorted(p.name for p in ctx.checkpoint_dir.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    log = json.loads((ctx.out_dir / "train_log.json").read_text())
    assert [entry["step"] for entry in log if "loss" in entry] == [2, 4, 6]


class CrashAfterSave(TrainerCallback):
    """The in-process version of a SIGKILL: stop right after checkpoint `step` is on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash after checkpoint-{self.step}")


def test_resume_after_a_crash_gives_the_same_weights(tmp_path, data_dir):
    straight = teacher_ctx(tmp_path, data_dir, "straight")
    teacher.run(teacher.Config(**TINY_TRAIN), straight)

    crashed = teacher_ctx(tmp_path, data_dir, "crashed")
    crashed.extra["callbacks"] = [CrashAfterSave(3)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        teacher.run(teacher.Config(**TINY_TRAIN), crashed)
    assert crashed.last_checkpoint().name == "checkpoint-3"
    assert not (crashed.out_dir / "model.safetensors").exists()

    crashed.extra["callbacks"] = []
    metrics = teacher.run(teacher.Config(**TINY_TRAIN), crashed)  # resumes from checkpoint-3
    assert metrics["steps"] == 6
    expected, resumed = weights(straight.out_dir), weights(crashed.out_dir)
    assert expected.keys() == resumed.keys()
    for name in expected:
        print(name, (expected[name] - resumed[name]).abs().max().item())
        assert torch.equal(expected[name], resumed[name]), name

    # control: a resume that replays the data from the start (not the saved position) differs,
    # so the equality above does depend on the checkpoint's data position being restored
    replayed = teacher_ctx(tmp_path, data_dir, "replayed")
    replay_cfg = teacher.Config(**{**TINY_TRAIN, "trainer": {"ignore_data_skip": True}})
    replayed.extra["callbacks"] = [CrashAfterSave(3)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        teacher.run(replay_cfg, replayed)
    replayed.extra["callbacks"] = []
    teacher.run(replay_cfg, replayed)
    assert not torch.equal(weights(replayed.out_dir)["backbone.embeddings.weight"], expected["backbone.embeddings.weight"])


def test_different_seeds_give_different_teachers(tmp_path, data_dir):
    cfg = teacher.Config(**{**TINY_TRAIN, "max_steps": 2, "save_steps": 2})
    a, b = teacher_ctx(tmp_path, data_dir, "a", seed=0), teacher_ctx(tmp_path, data_dir, "b", seed=1)
    teacher.run(cfg, a)
    teacher.run(cfg, b)
    wa, wb = weights(a.out_dir), weights(b.out_dir)
    assert not torch.equal(wa["backbone.embeddings.weight"], wb["backbone.embeddings.weight"])


def save_tiny_pretrained(folder: Path, vocab_size: int) -> MambaForCausalLM:
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, state_size=4))
    model.save_pretrained(folder)
    return model


def test_pretrained_teacher_is_loaded_and_saved_unchanged(tmp_path, data_dir):
    # a folder takes the same from_pretrained path as a hub id
    original = save_tiny_pretrained(tmp_path / "pretrained", vocab_size=24)
    ctx = teacher_ctx(tmp_path, data_dir, pretrained=str(tmp_path / "pretrained"))
    metrics = teacher.run(teacher.Config(**TINY_TRAIN), ctx)
    assert "steps" not in metrics and not ctx.checkpoint_dir.exists()  # default: no training
    assert 0.0 <= metrics["teacher_accuracy"] <= 1.0 and metrics["teacher_ppl"] > 1.0
    saved = weights(ctx.out_dir)
    for name, tensor in original.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name


def test_pretrained_teacher_can_be_finetuned(tmp_path, data_dir):
    original = save_tiny_pretrained(tmp_path / "pretrained", vocab_size=18)
    ctx = teacher_ctx(tmp_path, data_dir, pretrained=str(tmp_path / "pretrained"))
    metrics = teacher.run(teacher.Config(**{**TINY_TRAIN, "max_steps": 2, "finetune_pretrained": True}), ctx)
    assert metrics["steps"] == 2
    assert not torch.equal(weights(ctx.out_dir)["backbone.embeddings.weight"], original.backbone.embeddings.weight)


def test_pretrained_vocab_smaller_than_tokenizer_is_an_error(tmp_path, data_dir):
    save_tiny_pretrained(tmp_path / "small_vocab", vocab_size=10)
    ctx = teacher_ctx(tmp_path, data_dir, pretrained=str(tmp_path / "small_vocab"))
    with pytest.raises(ValueError, match=r"vocab_size \(10\) is smaller than the tokenizer's 18 tokens"):
        teacher.run(teacher.Config(**TINY_TRAIN), ctx)


def test_missing_pretrained_folder_is_an_error(tmp_path, data_dir):
    ctx = teacher_ctx(tmp_path, data_dir, pretrained=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="cannot load"):
        teacher.run(teacher.Config(**TINY_TRAIN), ctx)


def test_teacher_source_must_be_exactly_one(tmp_path, data_dir):
    both = teacher_ctx(tmp_path, data_dir, pretrained="x", train_from_scratch=TINY_ARCH)
    with pytest.raises(ValueError, match="exactly one of `pretrained`.*got both"):
        teacher.run(teacher.Config(**TINY_TRAIN), both)
    neither = teacher_ctx(tmp_path, data_dir)
    neither.model.teacher = TeacherSource()
    with pytest.raises(ValueError, match="got neither"):
        teacher.run(teacher.Config(**TINY_TRAIN), neither)


def test_teacher_needs_the_data_stage(tmp_path):
    ctx = teacher_ctx(tmp_path, tmp_path)
    ctx.upstream = {}
    with pytest.raises(ValueError, match="needs the output of stage 'data'"):
        teacher.run(teacher.Config(**TINY_TRAIN), ctx)


def test_mlp_teacher_trains_and_is_saved_as_a_neuron_free_spiking_mamba(tmp_path, data_dir):
    """MAR's Mamba+MLP teacher: no HF class has that block, so it stays the project's model."""
    import spiking

    arch = TeacherArch(hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    ctx = teacher_ctx(tmp_path, data_dir, train_from_scratch=arch)
    teacher.run(teacher.Config(**TINY_TRAIN), ctx)
    model = AutoModelForCausalLM.from_pretrained(ctx.out_dir)
    assert isinstance(model, spiking.SpikingMambaForCausalLM)
    assert model.config.neurons == {} and model.config.mlp_intermediate_size == 32


def test_saved_hf_teacher_computes_what_was_trained(tmp_path, data_dir):
    """The stage trains through the project's mixer and saves an HF MambaForCausalLM: same logits."""
    ctx = teacher_ctx(tmp_path, data_dir)
    teacher.run(teacher.Config(**TINY_TRAIN), ctx)
    hf = MambaForCausalLM.from_pretrained(ctx.out_dir).eval()
    fast = training.load_compute_teacher(ctx.out_dir, ctx)
    ids = torch.tensor([[1, 5, 6, 12, 7, 8, 13]])
    torch.testing.assert_close(fast(input_ids=ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_trainer_passthrough_is_checked_and_applied(tmp_path, data_dir):
    with pytest.raises(ValidationError, match="trainer.max_grad_nrom: not a transformers TrainingArguments field"):
        teacher.Config(trainer={"max_grad_nrom": 1.0})
    with pytest.raises(ValidationError, match="trainer.learning_rate: set it with the stage's `lr` field"):
        teacher.Config(trainer={"learning_rate": 1e-3})
    with pytest.raises(ValidationError, match="trainer.seed: the run sets it"):
        teacher.Config(trainer={"seed": 3})
    with pytest.raises(ValidationError, match="max_steps"):
        teacher.Config(max_steps=0)
    cfg = teacher.Config(**{**TINY_TRAIN, "trainer": {"max_grad_norm": 0.5, "adam_beta2": 0.95}})
    args = training.build_training_args(cfg, teacher_ctx(tmp_path, data_dir))
    assert args.max_grad_norm == 0.5 and args.adam_beta2 == 0.95
    assert args.seed == 0 and args.data_seed == 0 and args.dataloader_num_workers == 0
    assert args.learning_rate == cfg.lr and args.max_steps == 6 and args.output_dir.endswith("checkpoints")
