"""SpikingMambaForCausalLM: equals HF Mamba without neurons, recurrent cache, padding, generate, save/load.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_modeling.py -q
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

import spiking  # noqa: F401 - registers the Auto classes
from spiking import SpikingMambaConfig, SpikingMambaForCausalLM, calibrate, count_spikes, default_neurons

VOCAB = 40
TINY = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, pad_token_id=0, eos_token_id=1)


def teacher(seed=0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    return MambaForCausalLM(MambaConfig(**TINY)).eval()


def student(t: MambaForCausalLM | None = None, **fields) -> SpikingMambaForCausalLM:
    torch.manual_seed(1)
    model = SpikingMambaForCausalLM(SpikingMambaConfig(**TINY, **fields)).eval()
    if t is not None:
        missing, unexpected = model.load_state_dict(t.state_dict(), strict=False)
        assert not unexpected and all(".neurons." in k or "mlp" in k for k in missing)
    return model


def ids(batch=3, length=12, seed=0):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def calibrated(model):
    calibrate(model, [{"input_ids": ids(4, 16, seed=5)}])
    return model


def with_mlp_weights(model):
    """Give the (zero-initialised) MLP down projections real weights so the MLP matters."""
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mlp.down_proj.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


@torch.no_grad()
@pytest.mark.parametrize("fields", [{"neurons": {}}, {"neurons": default_neurons(), "spiking": False}])
def test_no_neurons_equals_hf_mamba(fields):
    t = teacher()
    s = student(t, **fields)
    x = ids()
    ref, out = t(x, labels=x, output_hidden_states=True), s(x, labels=x, output_hidden_states=True)
    print("max |logits - HF|", (out.logits - ref.logits).abs().max().item())
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for h, h_ref in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=0)
    kept = s(x, logits_to_keep=2).logits
    assert kept.shape == (3, 2, VOCAB)
    torch.testing.assert_close(kept, ref.logits[:, -2:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_neurons_change_logits_and_spikes_are_bounded_integers():
    t = teacher()
    s = calibrated(student(t, neurons=default_neurons(D=2)))
    x = ids()
    with count_spikes(s) as stats:
        logits = s(x).logits
    assert (logits - t(x).logits).abs().max() > 1e-3
    assert sorted(stats.by_placement()) == ["in_proj", "out_proj"]
    assert len(stats.names()) == 2 * TINY["num_hidden_layers"]
    for name, record in stats.by_name().items():
        assert isinstance(record["abs_sum"], int) and record["abs_sum"] > 0, name
        assert 0 < record["mean_abs"] <= 2, name  # |s| <= D = 2
    # the neuron's output is its integer count times its threshold
    neuron = s.backbone.layers[0].mixer.neuron("in_proj")
    h = torch.randn(5, 32) * 3
    counts = neuron.spike_counts(h)
    assert counts.abs().max() <= 2 and counts.dtype in (torch.int32, torch.int64)
    torch.testing.assert_close(neuron(h), counts * neuron.V)
    # spiking=False at run time bypasses them again
    s.config.spiking = False
    torch.testing.assert_close(s(x).logits, t(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"neurons": default_neurons()},
        {"neurons": {**default_neurons(), "x_proj": {"kind": "atmn", "T": 3}, "mlp.up": {"kind": "si_lif", "D": 3},
                     "mlp.down": {"kind": "si_lif"}}, "mlp_intermediate_size": 24},
        {"neurons": {**default_neurons(), "dt_proj": {"kind": "si_lif", "D": 2}, "head": {"kind": "atmn", "T": 2}}},
    ],
    ids=["plain", "neurons", "neurons+mlp", "neurons+dt_proj+head"],
)
def test_recurrent_cache_equals_full_forward(fields):
    s = student(teacher(), **fields)
    if "mlp_intermediate_size" in fields:
        with_mlp_weights(s)
    if fields:
        calibrated(s)
    x = ids(2, 10)
    full = s(x).logits
    out = s(x[:, :4], use_cache=True)  # prefill 4 tokens, then one token at a time
    logits, cache = [out.logits], out.cache
    for i in range(4, 10):
        out = s(x[:, i : i + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
    print("max |recurrent - full|", (torch.cat(logits, 1) - full).abs().max().item())
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-4, rtol=0)
    # a multi-token continuation from the cache also continues the SSM state (not restart at 0)
    out = s(x[:, :3], use_cache=True)
    more = s(x[:, 3:7], cache=out.cache, use_cache=True)
    torch.testing.assert_close(more.logits, full[:, 3:7], atol=1e-4, rtol=0)


@torch.no_grad()
def test_the_head_neuron_is_the_last_op_inside_the_backbone():
    # TRL's fused LM head multiplies backbone(...).last_hidden_state by the head weight itself: the
    # head neuron's spikes must already be in last_hidden_state, and logits = lm_head(last_hidden_state)
    s = calibrated(student(teacher(), neurons={**default_neurons(), "head": {"kind": "si_lif", "D": 2},
                                               "dt_proj": {"kind": "si_lif", "D": 2}}))
    x = ids(2, 7)
    out = s(x, output_hidden_states=True)
    hidden = s.backbone(x).last_hidden_state
    head = s.backbone.neuron("head")
    normed = s.backbone.norm_f(out.hidden_states[-2])  # the last block's output, through norm_f
    torch.testing.assert_close(hidden, head(normed), atol=0, rtol=0)
    torch.testing.assert_close(out.hidden_states[-1], hidden, atol=0, rtol=0)
    torch.testing.assert_close(out.logits, s.lm_head(hidden).float(), atol=0, rtol=0)
    V = head.threshold()
    assert torch.equal(hidden, (hidden / V).round() * V)  # what the head reads is spikes × threshold
    assert not torch.equal(hidden, normed)
    names = {name for name, _ in s.named_modules()}
    assert "backbone.neurons.head_input" in names and "backbone.layers.0.mixer.neurons.dt_proj_input" in names


@torch.no_grad()
@pytest.mark.parametrize("fields", [{}, {"neurons": default_neurons(), "mlp_intermediate_size": 16}])
def test_left_padding_changes_nothing(fields):
    s = student(teacher(), **fields)
    if fields:
        calibrated(with_mlp_weights(s))
    rows = [ids(1, 9, seed=1)[0], ids(1, 5, seed=2)[0], ids(1, 7, seed=3)[0]]
    batch = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, 9 - len(row) :] = row
        mask[i, 9 - len(row) :] = 1
    logits = s(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = s(row[None]).logits[0]
        torch.testing.assert_close(logits[i, 9 - len(row) :], alone, atol=1e-5, rtol=0)


@torch.no_grad()
def test_generate_greedy_equals_manual_argmax_and_sampling_runs():
    s = calibrated(student(teacher(), neurons=default_neurons()))
    prompt = ids(2, 5)
    out = s.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    manual = prompt
    for _ in range(6):
        next_token = s(manual).logits[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, next_token], dim=1)
    assert torch.equal(out, manual)
    torch.manual_seed(0)
    sampled = s.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=True,
                         top_k=0, eos_token_id=None, pad_token_id=0)
    assert sampled.shape == (2, 11) and torch.equal(sampled[:, :5], prompt)


@torch.no_grad()
def test_generate_without_neurons_equals_hf_generate():
    t = teacher()
    s = student(t)
    prompt = ids(2, 4)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    assert torch.equal(s.generate(prompt, **kw), t.generate(prompt, **kw))


def test_save_pretrained_round_trip_through_auto_class(tmp_path):
    s = calibrated(student(teacher(), neurons={**default_neurons(D=3), "x_proj": {"kind": "atmn", "T": 2}},
                           mlp_intermediate_size=16))
    with_mlp_weights(s)
    s.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SpikingMambaForCausalLM
    assert loaded.config.neurons == s.config.neurons and loaded.config.mlp_intermediate_size == 16
    # HF's "<file>.<Class>" form, the file saved beside the weights (a folder loads without spikerl)
    assert loaded.config.auto_map == {"AutoConfig": "modeling.SpikingMambaConfig",
                                      "AutoModelForCausalLM": "modeling.SpikingMambaForCausalLM"}
    assert {"modeling.py", "neurons.py", "kernels.py", "scan.py"} <= {p.name for p in tmp_path.iterdir()}
    neuron, neuron_loaded = (m.backbone.layers[1].mixer.neuron("out_proj") for m in (s, loaded))
    assert bool(neuron_loaded.calibrated)
    torch.testing.assert_close(neuron_loaded.V, neuron.V, atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embeddings.weight.data_ptr()  # still tied
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, s(x).logits, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_grads():
    s = calibrated(student(teacher(), neurons=default_neurons(), mlp_intermediate_size=16)).train()
    with_mlp_weights(s)
    x = ids()

    def grads():
        s.zero_grad()
        s(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}

    plain = grads()
    s.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(block.gradient_checkpointing for block in s.backbone.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown placement 'lm_head'"):
        SpikingMambaConfig(**TINY, neurons={"lm_head": {"kind": "si_lif"}})
    with pytest.raises(ValueError, match="mlp_intermediate_size"):
        SpikingMambaConfig(**TINY, neurons={"mlp.up": {"kind": "si_lif"}})
    with pytest.raises(ValueError, match="scan_backend"):
        SpikingMambaConfig(**TINY, scan_backend="cuda")
    with pytest.raises(ValueError, match=r"neurons\.in_proj: .*D"):
        SpikingMambaForCausalLM(SpikingMambaConfig(**TINY, neurons={"in_proj": {"kind": "si_lif", "D": 0}}))
    with pytest.raises(ValueError, match=r"neurons\.out_proj: .*kind"):
        SpikingMambaForCausalLM(SpikingMambaConfig(**TINY, neurons={"out_proj": {"kind": "relu"}}))


def test_parameter_names_match_hf_mamba():
    names = set(student(neurons=default_neurons()).state_dict())
    hf_names = set(teacher().state_dict())
    assert hf_names <= names
    assert all(".neurons." in n for n in names - hf_names)
