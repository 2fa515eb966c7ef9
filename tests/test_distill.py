"""The distill stage: the loss against hand-computed values, the SGC schedule, a tiny end-to-end
run, exact resume after a crash, and clear errors before training on bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import spiking
from stages import data, distill, teacher, training
from stages.context import ModelConfig, StageContext, TeacherArch, TeacherSource
from tests.test_teacher_stage import CrashAfterSave

TINY_ARCH = TeacherArch(hidden_size=16, num_hidden_layers=2, state_size=4)
TINY_DISTILL = {
    "max_steps": 6,
    "batch_size": 4,
    "save_steps": 3,
    "logging_steps": 2,
    "eval_samples": 8,
    "eval_blocks": 4,
    "calibration_batches": 2,
}


def make_ctx(root: Path, stage: str, upstream: dict[str, Path], seed: int = 0) -> StageContext:
    out = root / stage
    out.mkdir(parents=True, exist_ok=True)
    return StageContext(
        stage=stage, run_dir=root, out_dir=out, upstream=upstream,
        model=ModelConfig(teacher=TeacherSource(train_from_scratch=TINY_ARCH)), seed=seed,
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, Path]:
    """A finished data + teacher run on a tiny arithmetic task (shared by the tests below)."""
    root = tmp_path_factory.mktemp("run")
    ctx = make_ctx(root, "data", {})
    data.run(data.Config(source={"synthetic": "arithmetic", "digits": [2], "num_problems": 300}, test_size=40, rl_prompts=20, seq_len=12), ctx)
    tctx = make_ctx(root, "teacher", {"data": ctx.out_dir})
    teacher.run(teacher.Config(max_steps=30, batch_size=8, save_steps=30, logging_steps=10, eval_samples=8, eval_blocks=4), tctx)
    return {"data": ctx.out_dir, "teacher": tctx.out_dir}


# ----------------------------------------------------------------------------- the loss, by hand


def eye_head(vocab: int) -> torch.nn.Linear:
    """An LM head that passes its input through (identity weight): hand-written logits go in as the
    'final hidden state'."""
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return head


def heads_for(logits: torch.Tensor) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    return eye_head(logits.shape[-1]), eye_head(logits.shape[-1])


def test_kl_term_equals_hand_computed_value_with_temperature():
    # one position, vocab 2: p_T = softmax([0, ln 3]/τ), p_S = softmax([0, 0]/τ) = (1/2, 1/2)
    teacher_logits = torch.tensor([[[0.0, math.log(3.0)]]])
    student_logits = torch.zeros(1, 1, 2)
    for tau in (1.0, 2.0):
        cfg = distill.LossConfig(kl=1.0, hidden=0.0, ce=0.0, temperature=tau)
        p = torch.softmax(teacher_logits[0, 0] / tau, -1).tolist()
        expected = tau**2 * sum(pi * math.log(pi / 0.5) for pi in p)
        terms = distill.distillation_loss(student_logits, teacher_logits, (), (), None, cfg, heads_for(student_logits))
        print(f"tau={tau}: kl={terms['kl'].item():.6f}, hand={expected:.6f}")
        assert terms["kl"].item() == pytest.approx(expected, rel=1e-6)
        assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)


def test_hidden_term_is_the_mean_over_blocks_of_mse_and_weights_add_up():
    s_hidden = (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    t_hidden = (torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0))  # MSE 1 and 9 -> mean 5
    logits = torch.zeros(1, 2, 3)
    labels = torch.tensor([[0, 1]])  # predicts token 1 from position 0: CE = ln 3 for uniform logits
    cfg = distill.LossConfig(kl=1.0, hidden=0.5, ce=2.0)
    terms = distill.distillation_loss(logits, logits, s_hidden, t_hidden, labels, cfg, heads_for(logits))
    assert terms["hidden_mse"].item() == pytest.approx(5.0)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["ce"].item() == pytest.approx(math.log(3.0), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * 5.0 + 2.0 * math.log(3.0), rel=1e-6)


@pytest.mark.parametrize("ce", [0.0, 1.0])
def test_chunked_vocabulary_terms_equal_the_whole_batch_ones_with_their_gradients(ce):
    # 2 rows × 37 tokens in chunks of 16 (the last chunk short), vocab 300: loss and gradients
    # (student final state, student head, through the hidden term too) as with no chunking
    torch.manual_seed(0)
    B, L, H, V = 2, 37, 24, 300
    heads = (torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False))
    student_final, teacher_final = torch.randn(B, L, H, requires_grad=True), torch.randn(B, L, H)
    s_hidden, t_hidden = (torch.randn(B, L, H, requires_grad=True),), (torch.randn(B, L, H),)
    labels = torch.randint(0, V, (B, L))
    results = []
    for chunk in (None, 16):
        cfg = distill.LossConfig(kl=1.0, hidden=0.5, ce=ce, temperature=2.0, chunk_tokens=chunk)
        terms = distill.distillation_loss(student_final, teacher_final, s_hidden, t_hidden, labels, cfg, heads, chunk)
        grads = torch.autograd.grad(terms["loss"], [student_final, s_hidden[0], heads[0].weight])
        results.append((terms, grads))
    (whole, g_whole), (chunked, g_chunked) = results
    for key in ("loss", "kl", "ce", "hidden_mse"):
        print(key, whole[key].item(), chunked[key].item())
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_whole, g_chunked):
        print("max grad diff", (a - b).abs().max().item())
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert heads[1].weight.grad is None  # the teacher's head is never differentiated


def test_sgc_schedule_anneals_linearly_to_zero_then_stays_there():
    sgc = training.SGCConfig(lambda0=0.5, anneal=0.8)
    values = [training.sgc_lambda(step, 100, sgc) for step in (0, 40, 80, 90, 100)]
    assert values == pytest.approx([0.5, 0.25, 0.0, 0.0, 0.0])
    assert training.sgc_lambda(0, 100, False) == 0.0


def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValidationError, match="D"):
        distill.Config(neuron={"kind": "si_lif", "D": 0})
    with pytest.raises(ValidationError, match="lambda0"):
        distill.Config(sgc={"lambda0": 1.5})
    with pytest.raises(ValidationError, match="nonsense"):
        distill.Config(trainer={"nonsense": 1})


# ----------------------------------------------------------------------------- the stage


def test_distill_trains_a_loadable_spiking_student_and_reports_metrics(tmp_path, upstream):
    ctx = make_ctx(tmp_path, "distill", upstream)
    metrics = distill.run(distill.Config(**TINY_DISTILL), ctx)
    print(metrics)
    assert metrics["steps"] == 6
    for key in ("student_accuracy", "teacher_accuracy", "converted_accuracy", "firing_rate"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["student_ppl"] > 1 and metrics["teacher_ppl"] > 1
    assert metrics["energy_ratio"] > 1  # spikes replace the in_proj/out_proj MACs
    assert {"firing_rate/in_proj", "firing_rate/out_proj"} <= set(metrics)

    student = AutoModelForCausalLM.from_pretrained(ctx.out_dir)
    assert isinstance(student, spiking.SpikingMambaForCausalLM)
    assert set(student.config.neurons) == {"in_proj", "out_proj"}
    assert all(n.sgc_lambda == 0.0 for _, n in spiking.iter_neurons(student))  # deployed = pure spikes
    assert all(bool(n.calibrated) for _, n in spiking.iter_neurons(student))
    log = json.loads((ctx.out_dir / "train_log.json").read_text())
    logged = [entry for entry in log if "kl" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    assert {"hidden_mse", "ce", "sgc_lambda", "firing_rate/in_proj"} <= set(logged[0])
    assert logged[0]["sgc_lambda"] > logged[-1]["sgc_lambda"] == 0.0


@pytest.mark.parametrize("crash_at", [3, TINY_DISTILL["max_steps"]])
def test_resume_after_a_crash_gives_the_same_student(tmp_path, upstream, crash_at):
    # crash_at == max_steps: killed after the last checkpoint, before the outputs; the resumed
    # attempt loads that checkpoint (HF Trainer would otherwise take one step more)
    straight = make_ctx(tmp_path / "a", "distill", upstream)
    distill.run(distill.Config(**TINY_DISTILL), straight)

    crashed = make_ctx(tmp_path / "b", "distill", upstream)
    crashed.extra["callbacks"] = [CrashAfterSave(crash_at)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill.run(distill.Config(**TINY_DISTILL), crashed)
    crashed.extra["callbacks"] = []
    metrics = distill.run(distill.Config(**TINY_DISTILL), crashed)  # resumes from checkpoint-<crash_at>
    assert metrics["converted_accuracy"] is not None  # recorded by the first attempt
    assert metrics["steps"] == TINY_DISTILL["max_steps"]

    a, b = load_file(str(straight.out_dir / "model.safetensors")), load_file(str(crashed.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_inputs_fail_before_training(tmp_path, upstream):
    # an unknown placement
    ctx = make_ctx(tmp_path / "placement", "distill", upstream)
    with pytest.raises(ValueError, match="stages.distill.placement.*lm_foot"):
        distill.run(distill.Config(**TINY_DISTILL, placement=["in_proj", "lm_foot"]), ctx)
    assert not ctx.checkpoint_dir.exists()

    # a teacher whose vocabulary is smaller than the data's tokenizer
    small = tmp_path / "small_teacher"
    MambaForCausalLM(MambaConfig(vocab_size=5, hidden_size=8, num_hidden_layers=1, state_size=2)).save_pretrained(small)
    shutil.copy(upstream["teacher"] / "tokenizer.json", small / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (upstream["teacher"] / name).exists():
            shutil.copy(upstream["teacher"] / name, small / name)
    ctx = make_ctx(tmp_path / "vocab", "distill", {"data": upstream["data"], "teacher": small})
    with pytest.raises(ValueError, match="vocab_size"):
        distill.run(distill.Config(**TINY_DISTILL), ctx)
    assert not ctx.checkpoint_dir.exists()

    # a corpus with no tokens
    empty_data = tmp_path / "empty_data"
    shutil.copytree(upstream["data"], empty_data)
    corpus = load_from_disk(str(upstream["data"] / "corpus"))
    shutil.rmtree(empty_data / "corpus")
    corpus.filter(lambda _: False).save_to_disk(str(empty_data / "corpus"))
    ctx = make_ctx(tmp_path / "empty", "distill", {"data": empty_data, "teacher": upstream["teacher"]})
    with pytest.raises(ValueError, match="no tokens"):
        distill.run(distill.Config(**TINY_DISTILL), ctx)
    assert not ctx.checkpoint_dir.exists()

    # a missing upstream stage
    ctx = make_ctx(tmp_path / "noteacher", "distill", {"data": upstream["data"]})
    with pytest.raises(ValueError, match="needs the output of stage 'teacher'"):
        distill.run(distill.Config(**TINY_DISTILL), ctx)
