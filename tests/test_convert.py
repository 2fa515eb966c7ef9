"""Teacher -> student conversion, calibration, and the way back to HF Mamba.

Run: OMP_NUM_THREADS=1 python -m pytest tests/test_convert.py -q
"""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from spiking import SpikingMambaForCausalLM, calibrate, default_neurons, from_teacher, iter_neurons, to_hf_mamba

TINY = dict(vocab_size=40, hidden_size=32, state_size=8, num_hidden_layers=2, pad_token_id=0)


def teacher() -> MambaForCausalLM:
    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(**TINY)).eval()


def batches(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 40, (3, 10), generator=gen), "attention_mask": torch.ones(3, 10)}
            for _ in range(n)]


@torch.no_grad()
def test_from_teacher_instance_and_folder_copy_weights(tmp_path):
    t = teacher()
    x = batches()[0]["input_ids"]
    plain = from_teacher(t).eval()
    assert plain.config.neurons == {} and plain.config.hidden_size == 32
    torch.testing.assert_close(plain(x).logits, t(x).logits, atol=1e-5, rtol=0)
    t.save_pretrained(tmp_path)
    from_folder = from_teacher(tmp_path, neurons=default_neurons(), spiking=False).eval()
    torch.testing.assert_close(from_folder(x).logits, t(x).logits, atol=1e-5, rtol=0)
    assert len(list(iter_neurons(from_folder))) == 4


@torch.no_grad()
def test_calibration_uses_teacher_activations_and_real_tokens_only():
    t = teacher()
    s = from_teacher(t, neurons=default_neurons(D=4), calibration_batches=batches()).eval()
    assert all(bool(n.calibrated) for _, n in iter_neurons(s))
    # expected threshold of layer 0's in_proj neuron: 99.9th pct of |normed embeddings| / D
    block = t.backbone.layers[0]
    inputs = torch.cat([block.norm(t.backbone.embeddings(b["input_ids"])).reshape(-1, 32) for b in batches()])
    expected = torch.quantile(inputs.abs(), 0.999, dim=0) / 4
    torch.testing.assert_close(s.backbone.layers[0].mixer.neuron("in_proj").V, expected, atol=1e-5, rtol=1e-4)
    # padded rows are left out: padding half of a batch gives the thresholds of the unpadded half
    padded = [{"input_ids": b["input_ids"], "attention_mask": torch.cat([torch.zeros(3, 5), torch.ones(3, 5)], 1)}
              for b in batches()]
    s2 = from_teacher(t, neurons={"in_proj": {"kind": "si_lif", "D": 4}}, calibration_batches=padded)
    tail = torch.cat([block.norm(t.backbone.embeddings(b["input_ids"][:, 5:])).reshape(-1, 32) for b in batches()])
    torch.testing.assert_close(
        s2.backbone.layers[0].mixer.neuron("in_proj").V, torch.quantile(tail.abs(), 0.999, dim=0) / 4,
        atol=1e-5, rtol=1e-4,
    )


def test_calibrate_restores_modes_and_can_skip_calibrated():
    s = from_teacher(teacher(), neurons=default_neurons(), spiking=False).train()
    assert calibrate(s, batches()) == 4
    assert s.training and s.config.spiking is False
    neuron = s.backbone.layers[0].mixer.neuron("out_proj")
    before = neuron.V.clone()
    assert calibrate(s, batches(seed=9), skip_calibrated=True) == 0
    torch.testing.assert_close(neuron.V, before, atol=0, rtol=0)
    assert calibrate(s, batches(seed=9)) == 4
    assert not torch.equal(neuron.V, before)
    with pytest.raises(ValueError, match="no batches"):
        calibrate(s, [])


def test_non_llama_transformers_and_mamba2_teachers_are_refused(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=16))
    with pytest.raises(ValueError, match="model_type .gpt2. is not supported.*Llama-layout"):
        from_teacher(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        from_teacher(tmp_path / "gpt2")
    mamba2 = Mamba2ForCausalLM(
        Mamba2Config(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_heads=2, head_dim=16, state_size=8,
                     n_groups=1)
    )
    with pytest.raises(NotImplementedError, match="Mamba2 teachers are not supported yet"):
        from_teacher(mamba2)
    mamba2.save_pretrained(tmp_path / "mamba2")
    with pytest.raises(NotImplementedError, match="Mamba2"):
        from_teacher(tmp_path / "mamba2")
    with pytest.raises(ValueError, match="unknown config override 'hidden'"):
        from_teacher(teacher(), hidden=3)


@torch.no_grad()
def test_to_hf_mamba_round_trip(tmp_path):
    t = teacher()
    s = from_teacher(t)
    with torch.no_grad():  # make the student differ from the teacher, as after training
        s.backbone.layers[1].mixer.out_proj.weight.mul_(1.5)
    back = to_hf_mamba(s).eval()
    assert type(back) is MambaForCausalLM and back.config.model_type == "mamba"
    x = batches()[0]["input_ids"]
    torch.testing.assert_close(back(x).logits, s.eval()(x).logits, atol=1e-5, rtol=0)
    back.save_pretrained(tmp_path)
    again = MambaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(x).logits, back(x).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="neurons"):
        to_hf_mamba(from_teacher(t, neurons=default_neurons()))
    with pytest.raises(ValueError, match="MLP"):
        to_hf_mamba(from_teacher(t, mlp_intermediate_size=8))


def test_added_mlp_starts_as_a_no_op():
    t = teacher()
    s = from_teacher(t, mlp_intermediate_size=16).eval()
    assert isinstance(s, SpikingMambaForCausalLM)
    x = batches()[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(s(x).logits, t(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_folder_saved_before_the_neuron_rename_is_refused_then_upgraded(tmp_path):
    """Old folders held `mixer.neurons.in_proj.*` / `mlp.neurons.up.*` and `auto_map` pointing into
    the installed package: load_deployed refuses them (the thresholds would load as fresh ones),
    upgrade_folder renames the tensors and re-saves with the code; then the same logits."""
    import json

    from safetensors.torch import load_file, save_file

    from spiking import load_deployed, upgrade_folder

    neurons = {**default_neurons(D=3), "x_proj": {"kind": "atmn", "T": 2}, "mlp.up": {"kind": "si_lif", "D": 2},
               "mlp.down": {"kind": "atmn", "T": 2}}
    student = from_teacher(teacher(), neurons=neurons, mlp_intermediate_size=16, calibration_batches=batches())
    student.save_pretrained(tmp_path)
    x = batches()[0]["input_ids"]
    expected = load_deployed(tmp_path)(x).logits
    # make it the old layout
    weights = load_file(str(tmp_path / "model.safetensors"))
    old_names = {"in_proj_input": "in_proj", "x_proj_input": "x_proj", "out_proj_input": "out_proj",
                 "up_input": "up", "down_input": "down"}
    old = {}
    for key, value in weights.items():
        for new_name, old_name in old_names.items():
            key = key.replace(f".neurons.{new_name}.", f".neurons.{old_name}.")
        old[key] = value
    assert sum(k != o for k, o in zip(weights, old)) == 5 * 2 * 2  # 5 neurons x 2 blocks x (threshold, calibrated)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "spiking.modeling.SpikingMambaConfig",
                          "AutoModelForCausalLM": "spiking.modeling.SpikingMambaForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for code in tmp_path.glob("*.py"):
        code.unlink()

    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.neurons\.in_proj\.\S+ is now .*in_proj_input.*"
                                         r"spiking\.upgrade_folder"):
        load_deployed(tmp_path)
    assert upgrade_folder(tmp_path) == 20
    assert upgrade_folder(tmp_path) == 0  # already new
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == \
        "modeling.SpikingMambaForCausalLM"
    assert (tmp_path / "modeling.py").is_file() and (tmp_path / "neurons.py").is_file()
    torch.testing.assert_close(load_deployed(tmp_path)(x).logits, expected, atol=0, rtol=0)
