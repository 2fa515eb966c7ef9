"""The sparsify stage: the SBDS loss against hand-computed values, spike-aware steps against the
neurons' own partial outputs, the recipe's module section, a tiny end-to-end run (plain and
Mamba+MLP student), exact resume after a crash, and clear errors before training."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import spiking
from stages import distill, sparsify, teacher
from stages.context import ModelConfig, TeacherArch, TeacherSource
from tests.test_distill import TINY_DISTILL, heads_for, make_ctx, upstream  # noqa: F401 - upstream is a fixture
from tests.test_teacher_stage import CrashAfterSave

TINY_SPARSIFY = {
    "modules": {"in_proj": {"kind": "atmn", "T": 2}, "mixer.out_proj": {"kind": "atmn", "T": 3, "learnable": False}},
    "max_steps": 4,
    "batch_size": 4,
    "save_steps": 2,
    "logging_steps": 2,
    "eval_samples": 8,
    "eval_blocks": 4,
    "calibration_batches": 2,
}


@pytest.fixture(scope="module")
def distilled(upstream, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """data + teacher + a few distill steps (SI-LIF D=4 on in_proj/out_proj)."""
    root = tmp_path_factory.mktemp("distilled")
    ctx = make_ctx(root, "distill", upstream)
    distill.run(distill.Config(**TINY_DISTILL), ctx)
    return {**upstream, "distill": ctx.out_dir}


def tiny_model(neurons: dict, mlp: int | None = None, seed: int = 0) -> spiking.SpikingMambaForCausalLM:
    torch.manual_seed(seed)
    config = spiking.SpikingMambaConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=2, state_size=4, neurons=neurons, mlp_intermediate_size=mlp
    )
    model = spiking.SpikingMambaForCausalLM(config)
    spiking.calibrate(model, [torch.randint(0, 20, (3, 7))])
    return model.eval()


# ----------------------------------------------------------------------------- the loss, by hand


def test_sbds_with_alpha_1_beta_0_gamma_0_is_the_plain_forward_kl():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    cfg = sparsify.SBDSConfig(alpha=1.0, beta=0.0, gamma=0.0)
    plain = distill.distillation_loss(student_logits, teacher_logits, (), (), None, distill.LossConfig(kl=1, hidden=0), heads_for(student_logits))
    terms = sparsify.sbds_loss([student_logits], teacher_logits, [[]], [], cfg, None, heads_for(teacher_logits))
    print(f"sbds={terms['loss'].item():.8f} distill kl={plain['kl'].item():.8f}")
    assert terms["loss"].item() == pytest.approx(plain["kl"].item(), rel=1e-6)
    # the same q at every step: the step average changes nothing
    terms3 = sparsify.sbds_loss([student_logits] * 3, teacher_logits, [[]] * 3, [], cfg, None, heads_for(teacher_logits))
    assert terms3["loss"].item() == pytest.approx(plain["kl"].item(), rel=1e-6)


def test_sbds_terms_equal_hand_computed_values():
    # vocab 2, one position: p_T = (1/4, 3/4); q_0 = (1/2, 1/2), q_1 = p_T
    teacher_logits = torch.tensor([[[0.0, math.log(3.0)]]])
    q0, q1 = torch.zeros(1, 1, 2), teacher_logits.clone()
    p = (0.25, 0.75)
    forward0 = sum(pi * math.log(pi / 0.5) for pi in p)  # KL(p_T ‖ q_0)
    reverse0 = sum(0.5 * math.log(0.5 / pi) for pi in p)  # KL(q_0 ‖ p_T)
    # features: 2 blocks; step 0 off by 1 and 3 (MSE 1, 9), step 1 exact (0, 0) -> mean 2.5
    t_feat = [torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]
    s_feat = [[torch.ones(1, 1, 2), torch.full((1, 1, 2), 3.0)], [torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)]]
    cfg = sparsify.SBDSConfig(alpha=0.2, beta=0.7, gamma=1.0)
    terms = sparsify.sbds_loss([q0, q1], teacher_logits, s_feat, t_feat, cfg, None, heads_for(teacher_logits))
    print({k: round(v.item(), 6) for k, v in terms.items()}, forward0, reverse0)
    assert terms["kl_forward"].item() == pytest.approx(forward0 / 2, rel=1e-6)  # (1/T) Σ_t, q_1 costs 0
    assert terms["kl_reverse"].item() == pytest.approx(reverse0 / 2, rel=1e-6)
    assert terms["kl_forward_last"].item() == pytest.approx(0.0, abs=1e-7)
    assert terms["feature_mse"].item() == pytest.approx(2.5)
    assert terms["loss"].item() == pytest.approx(0.2 * forward0 / 2 + 0.7 * reverse0 / 2 + 2.5, rel=1e-6)
    # forward and reverse KL differ here: the test tells them apart
    assert abs(forward0 - reverse0) > 1e-3


def test_sbds_ce_term_is_the_last_steps_cross_entropy_on_the_next_tokens():
    # vocab 2, positions 0..2; labels [0, 1, 1]: position 0 predicts 1, position 1 predicts 1
    # last step: logits (0, log 3) at every position -> p(1) = 3/4; an earlier step is ignored
    last = torch.tensor([[[0.0, math.log(3.0)]] * 3])
    earlier = torch.zeros(1, 3, 2)
    labels = torch.tensor([[0, 1, 1]])
    cfg = sparsify.SBDSConfig(alpha=0.0, beta=0.0, gamma=0.0, ce=0.5)
    terms = sparsify.sbds_loss([earlier, last], last, [[], []], [], cfg, labels, heads_for(last))
    print({k: round(v.item(), 6) for k, v in terms.items()})
    assert terms["ce"].item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert terms["loss"].item() == pytest.approx(0.5 * -math.log(0.75), rel=1e-6)
    # ce = 0 (the default): the labels change nothing
    plain = sparsify.SBDSConfig()
    with_labels = sparsify.sbds_loss([earlier, last], last, [[], []], [], plain, labels, heads_for(last))
    without = sparsify.sbds_loss([earlier, last], last, [[], []], [], plain, None, heads_for(last))
    assert with_labels["loss"].item() == without["loss"].item()


def test_chunked_sbds_equals_the_whole_batch_loss_with_its_gradients():
    # T = 3 steps, 2 rows × 29 tokens in chunks of 8, vocab 200, CE on: loss and gradients as with no chunking
    torch.manual_seed(0)
    B, L, H, V, T = 2, 29, 16, 200, 3
    heads = (torch.nn.Linear(H, V, bias=False), torch.nn.Linear(H, V, bias=False))
    steps = [torch.randn(B, L, H, requires_grad=True) for _ in range(T)]
    teacher_final = torch.randn(B, L, H)
    labels = torch.randint(0, V, (B, L))
    results = []
    for chunk in (None, 8):
        cfg = sparsify.SBDSConfig(gamma=0.0, ce=0.5, temperature=1.5, chunk_tokens=chunk)
        terms = sparsify.sbds_loss(steps, teacher_final, [[]] * T, [], cfg, labels, heads)
        results.append((terms, torch.autograd.grad(terms["loss"], [*steps, heads[0].weight])))
    (whole, g_whole), (chunked, g_chunked) = results
    for key in ("loss", "kl_forward", "kl_reverse", "kl_forward_last", "ce"):
        print(key, whole[key].item(), chunked[key].item())
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_whole, g_chunked):
        print("max grad diff", (a - b).abs().max().item())
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_inherit_threshold_keeps_the_top_level_of_the_distilled_neuron():
    old = spiking.make_neuron({"kind": "si_lif", "D": 4}, channels=3)
    with torch.no_grad():
        old.log_V.copy_(torch.tensor([0.1, 0.2, 0.4]).log())
    new = spiking.make_neuron({"kind": "atmn", "T": 2}, channels=3)
    spiking.inherit_threshold(new, old)
    # D·V = T·V_th: V_th = V·4/2
    assert torch.allclose(new.V_th, torch.tensor([0.2, 0.4, 0.8]))
    assert bool(new.calibrated)
    # same range: the largest input the old neuron saturates at, the new one saturates at too
    x = torch.tensor([[0.4, 0.8, 1.6]])
    assert torch.allclose(new(x), old(x))


# ----------------------------------------------------------------------------- spike-aware steps


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_atmn_active_steps_runs_the_first_k_steps(tau):
    torch.manual_seed(0)
    neuron = spiking.ATMN(6, T=4, tau=tau)
    neuron.calibrate_(torch.randn(50, 6))
    x = torch.randn(3, 5, 6) * 2
    partial = neuron.step_outputs(x)  # [T, 3, 5, 6]
    for k in range(1, 5):
        neuron.active_steps = k
        assert torch.equal(neuron(x), partial[k - 1]), k
    neuron.active_steps = 9  # more than T: all T steps
    assert torch.equal(neuron(x), partial[-1])
    assert not torch.equal(partial[0], partial[-1])  # the steps do differ on this input


def test_spike_aware_distributions_use_the_atmn_partial_spike_sums():
    # ATMN (T=3) on the mixer projections, an SI-LIF on x_proj that must not change across t
    neurons = {
        "in_proj": {"kind": "atmn", "T": 3},
        "out_proj": {"kind": "atmn", "T": 2},
        "x_proj": {"kind": "si_lif", "D": 2},
    }
    model = tiny_model(neurons)
    ids = torch.randint(0, 20, (2, 6))
    batch = {"input_ids": ids}
    assert sparsify.spike_steps(model) == 3
    cfg = sparsify.SBDSConfig(features="pre_norm")
    with torch.no_grad():
        outputs, _ = sparsify.student_step_outputs(model, batch, cfg, "pre_norm", steps=3)
    assert len(outputs) == 3

    # by hand: every ATMN output replaced by its own partial output after t+1 steps (out_proj's
    # T=2 neuron uses both steps at t=2); SI-LIF neurons untouched
    for t in range(3):
        handles = [
            n.register_forward_hook(lambda m, args, out, t=t: m.step_outputs(args[0])[min(t, m.T - 1)])
            for _, n in spiking.iter_neurons(model) if isinstance(n, spiking.ATMN)
        ]
        try:
            with torch.no_grad():
                manual = model(**batch, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        print(f"t={t}: max |Δ final state| = {(outputs[t][0] - manual.hidden_states[-1]).abs().max():.3g}")
        assert torch.equal(outputs[t][0], manual.hidden_states[-1]), t  # what the LM head reads
        for got, want in zip(outputs[t][1], manual.hidden_states[:-1]):
            assert torch.equal(got, want)
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(outputs[-1][0], plain)  # the last step is the deployed forward
    assert not torch.equal(outputs[0][0], outputs[-1][0])  # one step is not the full train
    assert all(n.active_steps is None for _, n in spiking.iter_neurons(model) if isinstance(n, spiking.ATMN))

    # spike_aware false: only the final distribution
    with torch.no_grad():
        final_only, _ = sparsify.student_step_outputs(model, batch, sparsify.SBDSConfig(spike_aware=False), None, steps=3)
    assert len(final_only) == 1 and torch.equal(final_only[0][0], plain)


def test_post_norm_features_are_the_outputs_of_the_next_rmsnorm():
    model = tiny_model({"in_proj": {"kind": "atmn", "T": 2}})
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        _, feats = sparsify.forward_with_features(model, {"input_ids": ids}, "post_norm")
        out = model(input_ids=ids, output_hidden_states=True)
        layers = model.backbone.layers
        want = [layers[1].norm(out.hidden_states[0]), out.hidden_states[-1]]  # block 1's norm, norm_f
    assert len(feats) == 2
    for got, expected in zip(feats, want):
        assert torch.equal(got, expected)


# ----------------------------------------------------------------------------- the module section


def test_module_section_accepts_aliases_and_names_bad_keys():
    cfg = sparsify.Config(modules={"mixer.in_proj": "dense", "mlp_up": {"kind": "atmn", "T": 2}, "out_proj": "keep"})
    assert set(cfg.modules) == {"in_proj", "mlp.up", "out_proj"}
    assert cfg.modules["in_proj"].kind == "dense"
    assert cfg.modules["mlp.up"].spec().to_config() == {
        "kind": "atmn", "T": 2, "tau": 1.0, "learnable": True, "lsq_grad_scale": True, "ata_momentum": 0.0
    }
    with pytest.raises(ValidationError, match="modules.lm_foot"):
        sparsify.Config(modules={"lm_foot": "dense"})
    with pytest.raises(ValidationError, match=r"modules\.in_proj\.kind"):
        sparsify.Config(modules={"in_proj": {"kind": "relu"}})
    with pytest.raises(ValidationError, match="'D' does not apply to kind 'atmn'"):
        sparsify.Config(modules={"in_proj": {"kind": "atmn", "D": 2}})
    with pytest.raises(ValidationError, match="given twice"):
        sparsify.Config(modules={"in_proj": "dense", "mixer.in_proj": "atmn"})
    with pytest.raises(ValidationError, match="T"):
        sparsify.Config(modules={"in_proj": {"kind": "atmn", "T": 0}})
    with pytest.raises(ValidationError, match="alpha"):
        sparsify.Config(sbds={"alpha": -1})
    with pytest.raises(ValidationError, match="features"):
        sparsify.Config(sbds={"features": "mid_norm"})


def test_a_dumped_modules_section_loads_back():
    # the run folder's resolved recipe.yaml dumps every field, None included (D: null for atmn)
    cfg = sparsify.Config(modules={"in_proj": {"kind": "atmn", "T": 2}, "out_proj": "keep"})
    again = sparsify.Config.model_validate(cfg.model_dump())
    assert again.modules == cfg.modules
    with pytest.raises(ValidationError, match="'D' does not apply to kind 'atmn'"):
        sparsify.ModuleNeuron.model_validate({"kind": "atmn", "D": 4})


def test_refined_neurons_replace_join_keep_and_drop():
    old = {"in_proj": {"kind": "si_lif", "D": 4, "learnable": True}, "out_proj": {"kind": "si_lif", "D": 4, "learnable": True}}
    modules = sparsify.Config(
        modules={"in_proj": "atmn", "out_proj": {"kind": "si_lif", "D": 4, "learnable": False}, "x_proj": {"kind": "si_lif", "D": 2}}
    ).modules
    neurons, changed = sparsify.refined_neurons(old, modules, has_mlp=False)
    assert neurons["in_proj"]["kind"] == "atmn" and neurons["out_proj"]["learnable"] is False
    assert sorted(changed) == ["in_proj", "x_proj"]  # out_proj keeps its threshold: same kind and D
    neurons, changed = sparsify.refined_neurons(old, sparsify.Config(modules={"in_proj": "dense"}).modules, False)
    assert set(neurons) == {"out_proj"} and changed == []
    with pytest.raises(ValueError, match=r"stages\.sparsify\.modules\.mlp\.up.*no MLP"):
        sparsify.refined_neurons(old, sparsify.Config(modules={"mlp.up": "atmn"}).modules, has_mlp=False)


# ----------------------------------------------------------------------------- the stage


def _assert_student(folder: Path, placements: dict[str, str]):
    student = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(student, spiking.SpikingMambaForCausalLM)
    assert {p: s["kind"] for p, s in student.config.neurons.items()} == placements
    kinds = {spiking.neuron_placement(name): n.kind for name, n in spiking.iter_neurons(student)}
    assert kinds == placements
    assert all(bool(n.calibrated) and n.sgc_lambda == 0.0 for _, n in spiking.iter_neurons(student))
    return student


def test_sparsify_refines_the_distilled_student_with_atmn(tmp_path, distilled, caplog):
    ctx = make_ctx(tmp_path, "sparsify", distilled)
    cfg = sparsify.Config(**TINY_SPARSIFY, teacher=str(distilled["teacher"]))  # `teacher: path` form
    with caplog.at_level("INFO", logger="spikerl"):
        metrics = sparsify.run(cfg, ctx)
    # module-aware: the energy share and firing rate of every module type, logged before training
    table = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sparsify: in_proj")]
    assert len(table) == 1 and "%" in table[0] and "atmn T=2" in table[0], table
    print(json.dumps(metrics, indent=1))
    assert metrics["steps"] == 4 and metrics["spike_steps"] == 3
    student = _assert_student(ctx.out_dir, {"in_proj": "atmn", "out_proj": "atmn"})
    # a frozen threshold (learnable: false) stays the calibrated one; a learnable one trains
    first = load_file(str(ctx.checkpoint_dir / "checkpoint-2" / "model.safetensors"))
    final = load_file(str(ctx.out_dir / "model.safetensors"))
    for key in first:
        if key.endswith("neurons.out_proj_input.a"):
            assert torch.equal(first[key], final[key]), key
        if key.endswith("neurons.in_proj_input.a"):
            assert not torch.equal(first[key], final[key]), key
    assert any(key.endswith("neurons.out_proj_input.a") for key in first)  # the checks above ran
    # ... and after a reload too (from_pretrained turns requires_grad back on for every parameter)
    student.train()
    student(input_ids=torch.randint(0, 10, (2, 5))).logits.sum().backward()
    grads = {name: n.a.grad for name, n in spiking.iter_neurons(student)}
    assert all(g is None for name, g in grads.items() if name.endswith("out_proj"))
    assert all(g is not None for name, g in grads.items() if name.endswith("in_proj"))
    for key in ("student_accuracy", "teacher_accuracy", "distilled_accuracy", "converted_accuracy", "firing_rate"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert {"firing_rate/in_proj", "firing_rate/out_proj", "distilled_firing_rate/in_proj"} <= set(metrics)
    assert metrics["energy_ratio"] > 1 and metrics["distilled_energy_ratio"] > 1
    shares = [metrics[f"energy_share_teacher/{p}"] for p in ("in_proj", "x_proj", "out_proj")]
    assert all(0 < s < 1 for s in shares) and sum(shares) < 1
    assert "energy_share_teacher/mlp.up" not in metrics  # no MLP in this student
    log = json.loads((ctx.out_dir / "train_log.json").read_text())
    logged = [entry for entry in log if "kl_forward" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert {"kl_reverse", "feature_mse", "kl_forward_last", "firing_rate/in_proj"} <= set(logged[0])
    assert AutoTokenizer.from_pretrained(ctx.out_dir) is not None


def test_the_spike_energy_term_lowers_the_spike_driven_energy(tmp_path, distilled):
    results = {}
    for weight in (0.0, 20.0):
        ctx = make_ctx(tmp_path / f"w{weight}", "sparsify", distilled)
        cfg = sparsify.Config(**{**TINY_SPARSIFY, "max_steps": 8, "logging_steps": 4, "lr": 3e-2}, sbds={"energy": weight})
        results[weight] = sparsify.run(cfg, ctx)
        log = json.loads((ctx.out_dir / "train_log.json").read_text())
        logged = [entry for entry in log if "kl_forward" in entry]
        assert ("spike_energy_fraction" in logged[-1]) == (weight > 0)
        if weight > 0:
            assert 0 < logged[-1]["spike_energy_fraction"] < 1  # a fraction of the teacher's pJ per token
    print({w: (m["firing_rate"], m["energy_ratio"]) for w, m in results.items()})
    assert results[20.0]["firing_rate"] < results[0.0]["firing_rate"]
    assert results[20.0]["energy_ratio"] > results[0.0]["energy_ratio"]


def test_resume_after_a_crash_gives_the_same_student(tmp_path, distilled):
    straight = make_ctx(tmp_path / "a", "sparsify", distilled)
    sparsify.run(sparsify.Config(**TINY_SPARSIFY), straight)

    crashed = make_ctx(tmp_path / "b", "sparsify", distilled)
    crashed.extra["callbacks"] = [CrashAfterSave(2)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        sparsify.run(sparsify.Config(**TINY_SPARSIFY), crashed)
    crashed.extra["callbacks"] = []
    metrics = sparsify.run(sparsify.Config(**TINY_SPARSIFY), crashed)  # resumes from checkpoint-2
    assert metrics["converted_accuracy"] is not None  # recorded by the first attempt

    a, b = load_file(str(straight.out_dir / "model.safetensors")), load_file(str(crashed.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # killed after the LAST checkpoint, before the outputs: the re-run loads checkpoint-4 instead
    # of taking a 5th step (HF Trainer resumed at max_steps would)
    late = make_ctx(tmp_path / "c", "sparsify", distilled)
    late.extra["callbacks"] = [CrashAfterSave(TINY_SPARSIFY["max_steps"])]
    with pytest.raises(RuntimeError, match="simulated crash"):
        sparsify.run(sparsify.Config(**TINY_SPARSIFY), late)
    late.extra["callbacks"] = []
    assert sparsify.run(sparsify.Config(**TINY_SPARSIFY), late)["steps"] == TINY_SPARSIFY["max_steps"]
    c = load_file(str(late.out_dir / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], c[key]), key

    # the recipe changed the neurons since the checkpoint: refuse, naming the field
    shutil.rmtree(crashed.out_dir / "checkpoints" / "checkpoint-4")
    changed = {**TINY_SPARSIFY, "modules": {"in_proj": {"kind": "si_lif", "D": 2}}}
    with pytest.raises(ValueError, match="stages.sparsify.modules: the checkpoint"):
        sparsify.run(sparsify.Config(**changed), crashed)


def test_a_mamba_mlp_student_gets_ffn_neurons(tmp_path, upstream):  # noqa: F811
    # data -> teacher with an MLP per block (model.teacher.train_from_scratch.intermediate_size)
    # -> distill (mixer neurons) -> sparsify with neurons on the MLP's up/down inputs
    arch = TeacherArch(hidden_size=16, num_hidden_layers=2, state_size=4, intermediate_size=32)
    tctx = make_ctx(tmp_path, "teacher", {"data": upstream["data"]})
    tctx.model = ModelConfig(teacher=TeacherSource(train_from_scratch=arch))
    teacher.run(teacher.Config(max_steps=10, batch_size=8, save_steps=10, logging_steps=5, eval_samples=4, eval_blocks=2), tctx)
    runs = {"data": upstream["data"], "teacher": tctx.out_dir}
    dctx = make_ctx(tmp_path, "distill", runs)
    distill.run(distill.Config(**{**TINY_DISTILL, "max_steps": 2, "save_steps": 2}), dctx)
    runs["distill"] = dctx.out_dir

    ctx = make_ctx(tmp_path, "sparsify", runs)
    cfg = {**TINY_SPARSIFY, "modules": {"mlp.up": {"kind": "atmn", "T": 2}, "mlp_down": {"kind": "si_lif", "D": 2}}, "max_steps": 2}
    metrics = sparsify.run(sparsify.Config(**cfg), ctx)
    student = _assert_student(ctx.out_dir, {"in_proj": "si_lif", "out_proj": "si_lif", "mlp.up": "atmn", "mlp.down": "si_lif"})
    assert student.config.mlp_intermediate_size == 32
    assert {"firing_rate/mlp.up", "firing_rate/mlp.down", "energy_share_teacher/mlp.up", "energy_share_teacher/mlp.down"} <= set(metrics)
    assert "distilled_firing_rate/mlp.up" not in metrics  # dense in the distilled student
    # spiking the FFN saves energy on top of the distilled student's mixer spikes
    assert metrics["energy_ratio"] > metrics["distilled_energy_ratio"]


def test_bad_inputs_fail_before_training(tmp_path, distilled):
    ctx = make_ctx(tmp_path / "mlp", "sparsify", distilled)
    with pytest.raises(ValueError, match=r"stages\.sparsify\.modules\.mlp\.down"):
        sparsify.run(sparsify.Config(**{**TINY_SPARSIFY, "modules": {"mlp.down": "atmn"}}), ctx)
    assert not ctx.checkpoint_dir.exists()

    ctx = make_ctx(tmp_path / "teacher", "sparsify", distilled)
    with pytest.raises(ValueError, match="stages.sparsify.teacher"):
        sparsify.run(sparsify.Config(**TINY_SPARSIFY, teacher=str(tmp_path / "nowhere")), ctx)
    assert not ctx.checkpoint_dir.exists()

    ctx = make_ctx(tmp_path / "nodistill", "sparsify", {k: v for k, v in distilled.items() if k != "distill"})
    with pytest.raises(ValueError, match="needs the output of stage 'distill'"):
        sparsify.run(sparsify.Config(**TINY_SPARSIFY), ctx)
