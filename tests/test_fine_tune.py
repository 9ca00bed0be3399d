"""--init-from and --fine-tune: a same-shape PyTorch Inception3 checkpoint, or torchvision's ImageNet one with the
first convolution adapted and a new head; what each refusal says. The ImageNet file cannot be downloaded here:
a randomly initialised torchvision inception_v3() (3 channels, 1,000 classes, aux head) saved the same way
stands in for it."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import TINY, cli_args, run_in_process
from jaxnets import convert, evaluation, experiment, training
from jaxnets.checkpoint import Checkpointer
from jaxnets.config import Config
from jaxnets.experiment import RunError
from jaxnets.models import Inception3

# Inception3 on the smallest images it takes, with a small head: the tiny lens run otherwise as in TINY.
SMALL_INCEPTION = {**TINY, "model": "inception3", "image_size": 80, "head_features": (16,)}
FIRST_CONV = "Conv2d_1a_3x3.conv.weight"


@pytest.fixture(scope="module")
def imagenet_state_dict(torch):
    """torchvision's inception_v3() as its ImageNet file has it, BatchNorm statistics away from 0/1."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=True, init_weights=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(7)
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def imagenet_file(torch, imagenet_state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "inception_v3_imagenet_like.pth"
    torch.save({name: torch.from_numpy(value) for name, value in imagenet_state_dict.items()}, path)
    return path


def backbone_names(state_dict):
    return [name for name in state_dict if not name.startswith(("fc.", "AuxLogits.")) and name != FIRST_CONV]


def test_adapt_input_conv_sums_rgb_for_grey_and_repeats_it_for_more_channels():
    weight = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    grey = convert.adapt_input_conv(weight, 1)
    # A grey image g gives the RGB network's response to (g, g, g): w_r g + w_g g + w_b g.
    np.testing.assert_array_equal(grey, weight[:, 0:1] + weight[:, 1:2] + weight[:, 2:3])
    five = convert.adapt_input_conv(weight, 5)
    np.testing.assert_allclose(five, np.concatenate([weight, weight[:, :2]], axis=1) * 3 / 5, rtol=1e-6)
    assert convert.adapt_input_conv(weight, 3) is weight
    with pytest.raises(ValueError, match="takes 2-channel images; only an RGB"):
        convert.adapt_input_conv(weight[:, :2], 1)


@pytest.mark.parametrize("aux_logits", [False, True])
def test_fine_tuning_keeps_every_backbone_array_and_builds_a_new_head(imagenet_state_dict, aux_logits):
    model = convert.inception3_for_fine_tuning(
        imagenet_state_dict, 5, in_channels=1, head_features=(16,), aux_logits=aux_logits, rngs=nnx.Rngs(0)
    )
    exported = {name: value.numpy() for name, value in convert.export_to_torch_state_dict(model).items()}
    for name in backbone_names(imagenet_state_dict):  # weights and BatchNorm running statistics
        np.testing.assert_array_equal(exported[name], imagenet_state_dict[name], err_msg=name)
    np.testing.assert_array_equal(exported[FIRST_CONV], imagenet_state_dict[FIRST_CONV].sum(axis=1, keepdims=True))
    assert exported["Mixed_7c.branch_pool.bn.num_batches_tracked"] == 7
    assert exported["fc.0.weight"].shape == (16, 2048) and exported["fc.2.weight"].shape == (5, 16)
    aux = sorted(name for name in exported if name.startswith("AuxLogits."))
    if aux_logits:
        assert exported["AuxLogits.fc.weight"].shape == (5, 768)
        for name in aux:
            if not name.startswith("AuxLogits.fc."):
                np.testing.assert_array_equal(exported[name], imagenet_state_dict[name], err_msg=name)
    else:
        assert aux == []


def test_fine_tuning_names_what_a_state_dict_lacks(imagenet_state_dict):
    partial = {name: value for name, value in imagenet_state_dict.items() if not name.startswith("Mixed_7c.")}
    with pytest.raises(ValueError, match=r"no Inception3 backbone to fine-tune:\n  missing keys \(\d+\): Mixed_7c"):
        convert.inception3_for_fine_tuning(partial, 5, in_channels=1, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_fine_tune_trains_the_head_alone_then_the_whole_network(
    tmp_path, data_dir, imagenet_file, imagenet_state_dict, capsys
):
    workdir, pth = tmp_path / "run", tmp_path / "inception_v3_google.pth"
    shutil.copy(imagenet_file, pth)
    args = cli_args(**SMALL_INCEPTION, workdir=workdir, data_dir=data_dir, init_from=pth)
    # In-process: the models built below then reuse the compiled initialisers.
    result = run_in_process(capsys, "train.py", *args, "--fine-tune", "--freeze-backbone-epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Epoch 2: Loss = " in result.stdout

    config = Config.load(str(workdir))
    assert config.fine_tune and config.freeze_backbone_epochs == 1
    dataset = experiment.load_data(config)
    template = training.TrainState.create(
        experiment.build_model(dataclasses.replace(config, init_from=None), dataset),
        experiment.build_optimizer(config, 6),
    )
    checkpointer = Checkpointer(str(workdir), read_only=True)
    assert checkpointer.steps() == [6, 12]
    states = {step: checkpointer.restore(template, step)[0] for step in (6, 12)}
    checkpointer.close()
    initial = training.TrainState.create(experiment.build_model(config, dataset), experiment.build_optimizer(config, 6))

    def exported(state):
        return {name: value.numpy() for name, value in convert.export_to_torch_state_dict(state.model()).items()}

    start, after_frozen, after_all = exported(initial), exported(states[6]), exported(states[12])
    weights = [name for name in backbone_names(imagenet_state_dict) if "running" not in name and "batches" not in name]
    for name in [*weights, FIRST_CONV]:  # epoch 1: the backbone exactly as loaded, grey first convolution
        np.testing.assert_array_equal(after_frozen[name], start[name], err_msg=name)
    np.testing.assert_array_equal(start[FIRST_CONV], imagenet_state_dict[FIRST_CONV].sum(axis=1, keepdims=True))
    assert not np.array_equal(after_frozen["fc.2.weight"], start["fc.2.weight"])  # the head trained
    changed = [name for name in weights if not np.array_equal(after_all[name], after_frozen[name])]
    assert len(changed) == len(weights)  # epoch 2: everything trains

    pth.unlink()
    evaluated = evaluation.evaluate_run(str(workdir))  # evaluate.py's work, from the checkpoint alone: no .pth
    assert evaluated["count"] == 20 and evaluated["step"] == 12


@pytest.fixture(scope="module")
def lens_outputs(data_dir):
    return experiment.num_outputs(experiment.load_data(Config(**SMALL_INCEPTION, data_dir=data_dir)))


def jaxnets_inception_file(torch, path, num_outputs):
    """A 1-channel Inception3 with SMALL_INCEPTION's head, saved as a PyTorch state_dict."""
    model = Inception3(num_outputs, in_channels=1, head_features=(16,), rngs=nnx.Rngs(3))
    torch.save(convert.export_to_torch_state_dict(model), path)
    return model


def test_init_from_a_same_shape_state_dict_starts_from_its_weights(tmp_path, data_dir, torch, lens_outputs):
    path = tmp_path / "inception3.pth"
    expected = jaxnets_inception_file(torch, path, lens_outputs)
    config = Config(**SMALL_INCEPTION, init_from=str(path), data_dir=data_dir)
    model = experiment.build_model(config, experiment.load_data(config))  # what train.py starts from
    _, expected_params, expected_rest = nnx.split(expected, nnx.Param, ...)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    for (key, a), b in zip(
        jax.tree_util.tree_leaves_with_path((expected_params, expected_rest)),
        jax.tree.leaves((params, rest)),
        strict=True,
    ):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            continue  # the dropout stream: seeded from --seed, not stored in the file
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(key))


@pytest.mark.slow
def test_init_from_refusals_name_the_fix_and_write_nothing(
    tmp_path, data_dir, torch, imagenet_file, lens_outputs, capsys
):
    wrong_outputs = tmp_path / "seven.pth"
    jaxnets_inception_file(torch, wrong_outputs, lens_outputs + 2)
    cases = [
        (imagenet_file, "its first convolution takes 3-channel images; the dataset's have 1. Add --fine-tune"),
        (wrong_outputs, f"has {lens_outputs + 2} outputs; the dataset needs {lens_outputs} (x, y,"),
    ]
    for path, message in cases:
        workdir = tmp_path / "run"
        result = run_in_process(
            capsys, "train.py", *cli_args(**SMALL_INCEPTION, init_from=path, workdir=workdir, data_dir=data_dir)
        )
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr
        assert not os.path.exists(workdir)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(model="mlp", init_from="x.pth"), "--init-from loads an Inception3; --model is mlp"),
        (dict(fine_tune=True), "--fine-tune needs --init-from"),
        (dict(init_from="x.pth", freeze_backbone_epochs=2), "--freeze-backbone-epochs needs --fine-tune"),
    ],
)
def test_option_combinations_that_cannot_work_are_refused(options, message):
    with pytest.raises(RunError, match=message):
        experiment.check_options(Config(**options))
