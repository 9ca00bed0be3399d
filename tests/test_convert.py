"""jaxnets.convert: torchvision state_dicts in and out exactly, checkpoints read safely, bad keys reported.

No full forward passes here (tests/test_inception.py checks the converted function): only weights and layouts.
"""

import importlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxnets.convert
from jaxnets.convert import export_to_torch_state_dict, inception3_from_torch, load_torch_checkpoint


@pytest.fixture(scope="module")
def torchvision_model(torch):
    """torchvision's Inception3 (aux head, 10 outputs) with BatchNorm statistics away from 0/1 and 1 batch seen."""
    from torchvision.models import Inception3 as TorchInception3

    torch.manual_seed(0)
    model = TorchInception3(num_classes=10, aux_logits=True, init_weights=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def cosmoml_model(torch):
    """The lens users' variant: 1-channel first conv, no aux, fc = Linear-ReLU-Linear-ReLU-Linear to 4 outputs."""
    from torchvision.models import Inception3 as TorchInception3

    torch.manual_seed(1)
    model = TorchInception3(num_classes=4, aux_logits=False, init_weights=True)
    model.Conv2d_1a_3x3.conv = torch.nn.Conv2d(1, 32, kernel_size=3, stride=2, bias=False)
    model.fc = torch.nn.Sequential(
        torch.nn.Linear(2048, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 4),
    )
    return model


@pytest.fixture(scope="module")
def converted(torchvision_model):
    return inception3_from_torch(torchvision_model.state_dict())


@pytest.fixture(scope="module")
def converted_cosmoml(cosmoml_model):
    return inception3_from_torch(cosmoml_model.state_dict())


def assert_state_dicts_equal(torch, actual, expected):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def test_round_trip_reproduces_torchvision_state_dict_exactly(torch, torchvision_model, converted):
    expected, model = torchvision_model.state_dict(), converted
    assert (model.in_channels, model.num_outputs, model.aux_logits, model.head_features) == (3, 10, True, ())
    exported = export_to_torch_state_dict(model)
    assert_state_dicts_equal(torch, exported, expected)
    torchvision_model.load_state_dict(exported, strict=True)


def test_layouts_and_batchnorm_statistics_land_where_torch_has_them(torchvision_model, converted):
    state, model = torchvision_model.state_dict(), converted
    conv = state["Mixed_6b.branch7x7_2.conv.weight"].numpy()  # [out, in, 1, 7]
    kernel = np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel[...])  # [1, 7, in, out]
    assert kernel.shape == (1, 7, 128, 128)
    assert kernel[0, 5, 3, 2] == conv[2, 3, 0, 5]
    np.testing.assert_array_equal(model.fc.kernel[...], state["fc.weight"].numpy().T)
    bn = model.AuxLogits.conv1.bn
    np.testing.assert_array_equal(bn.scale[...], state["AuxLogits.conv1.bn.weight"].numpy())
    np.testing.assert_array_equal(bn.mean[...], state["AuxLogits.conv1.bn.running_mean"].numpy())
    np.testing.assert_array_equal(bn.var[...], state["AuxLogits.conv1.bn.running_var"].numpy())
    assert int(bn.num_batches_tracked[...]) == 7


def test_cosmoml_variant_is_inferred_and_round_trips(torch, cosmoml_model, converted_cosmoml):
    expected, model = cosmoml_model.state_dict(), converted_cosmoml
    inferred = (model.in_channels, model.num_outputs, model.aux_logits, model.head_features)
    assert inferred == (1, 4, False, (1024, 512))
    assert_state_dicts_equal(torch, export_to_torch_state_dict(model), expected)
    # The head computes what torch's does (the trunk's parity is tests/test_inception.py's job).
    features = np.random.default_rng(0).normal(size=(3, 2048)).astype(np.float32)
    with torch.no_grad():
        head_outputs = cosmoml_model.fc(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(model.fc(jnp.asarray(features)), head_outputs, rtol=1e-5, atol=1e-6)


def test_numpy_inputs_model_kwargs_and_optional_batch_counter(cosmoml_model):
    arrays = {
        name: value.numpy()
        for name, value in cosmoml_model.state_dict().items()
        if not name.endswith("num_batches_tracked")  # written by torch in train mode, never read: optional
    }
    model = inception3_from_torch(arrays, dropout=0.2, dtype=jnp.bfloat16, rngs=nnx.Rngs(dropout=3))
    assert model.dropout.rate == 0.2 and model.dtype == jnp.bfloat16
    assert model.training  # like a fresh torch module
    first_conv = arrays["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(model.Conv2d_1a_3x3.conv.kernel[...], first_conv)
    assert int(model.Mixed_5b.branch1x1.bn.num_batches_tracked[...]) == 0


def test_bad_keys_are_all_listed(torchvision_model):
    state = dict(torchvision_model.state_dict())
    state["Mixed_8a.branch1x1.conv.weight"] = state.pop("Mixed_5b.branch1x1.conv.weight")
    state["AuxLogits.fc.bias"] = state["AuxLogits.fc.bias"][:3]
    del state["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(ValueError) as error:
        inception3_from_torch(state)
    message = str(error.value)
    assert "unknown keys (1): Mixed_8a.branch1x1.conv.weight" in message
    assert "missing keys (2): Mixed_5b.branch1x1.conv.weight, Mixed_7c.branch_pool.bn.running_var" in message
    assert "AuxLogits.fc.bias: (3,), expected (10,)" in message


def test_conflicting_model_kwargs_show_as_misshaped(cosmoml_model):
    with pytest.raises(ValueError, match=r"Conv2d_1a_3x3.conv.weight: \(32, 1, 3, 3\), expected \(32, 3, 3, 3\)"):
        inception3_from_torch(cosmoml_model.state_dict(), in_channels=3)


def test_not_an_inception3_state_dict():
    with pytest.raises(ValueError, match="neither fc.weight nor fc.0.weight"):
        inception3_from_torch({"conv1.weight": np.zeros((64, 3, 7, 7))})
    with pytest.raises(ValueError, match="Linear layers at 0, 2, 4"):
        inception3_from_torch({"fc.0.weight": np.zeros((8, 2048)), "fc.1.weight": np.zeros((4, 8))})


def test_load_torch_checkpoint_finds_the_state_dict(torch, tmp_path, cosmoml_model):
    state = cosmoml_model.state_dict()
    layouts = {
        "bare.pt": state,
        "training.pt": {"epoch": 3, "model": state, "optimizer": {"lr": 1e-3}},
        "lightning.pth": {"state_dict": state},
        "dataparallel.pt": {"module." + name: value for name, value in state.items()},
        "bf16.pt": {name: value.bfloat16() if value.is_floating_point() else value for name, value in state.items()},
    }
    for filename, content in layouts.items():
        torch.save(content, tmp_path / filename)
        loaded = load_torch_checkpoint(tmp_path / filename)
        assert set(loaded) == set(state), filename
        assert isinstance(loaded["fc.4.bias"], np.ndarray) and loaded["fc.4.bias"].dtype == np.float32
    loaded = load_torch_checkpoint(tmp_path / "training.pt")
    for name, value in state.items():
        np.testing.assert_array_equal(loaded[name], value.numpy(), err_msg=name)


def test_load_torch_checkpoint_refuses_what_is_not_a_state_dict(torch, tmp_path):
    torch.save(torch.nn.Linear(2, 3), tmp_path / "whole_model.pt")  # a pickled module, not tensors
    with pytest.raises(ValueError, match=r"save model.state_dict\(\) instead"):
        load_torch_checkpoint(tmp_path / "whole_model.pt")
    torch.save({"epoch": 3, "loss": 0.5}, tmp_path / "metrics.pt")
    with pytest.raises(ValueError, match="holds no state_dict.*keys epoch, loss"):
        load_torch_checkpoint(tmp_path / "metrics.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_torch_checkpoint(tmp_path / "notes.txt")


def test_export_gives_numpy_without_torch_and_torch_is_imported_lazily(monkeypatch, converted):
    model = converted
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    importlib.reload(jaxnets.convert)  # importing the module must not need torch
    try:
        exported = jaxnets.convert.export_to_torch_state_dict(model)
    finally:
        monkeypatch.undo()
        importlib.reload(jaxnets.convert)
    assert isinstance(exported["fc.weight"], np.ndarray) and exported["fc.weight"].shape == (10, 2048)
    assert exported["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype == np.int64
