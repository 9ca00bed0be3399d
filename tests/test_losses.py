import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import losses
from jaxnets.config import Config


def test_mse_and_l1_closed_form():
    predictions = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    targets = jnp.array([[1.0, 0.0], [0.0, 4.0]])
    assert float(losses.mse(predictions, targets)) == pytest.approx((4 + 9) / 4)
    assert float(losses.l1(predictions, targets)) == pytest.approx((2 + 3) / 4)
    # Errors 0, 2, 3, 0: beyond delta 1 the Huber loss is |e| - 1/2.
    assert float(losses.huber(predictions, targets)) == pytest.approx((1.5 + 2.5) / 4)
    assert float(losses.huber(jnp.array([0.5]), jnp.array([0.0]))) == pytest.approx(0.125)


def test_huber_bounds_the_pull_of_an_outlier():
    predictions, targets = jnp.zeros((2, 1)), jnp.array([[0.5], [30.0]])
    np.testing.assert_allclose(jax.grad(losses.huber)(predictions, targets), [[-0.25], [-0.5]])
    np.testing.assert_allclose(jax.grad(losses.mse)(predictions, targets), [[-0.5], [-30.0]])


def test_cross_entropy_hand_computed():
    logits = jnp.array([[2.0, 1.0, 0.1]])
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + np.exp(0.1)))
    assert float(losses.cross_entropy(logits, jnp.array([0]))) == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_finite_for_huge_logits():
    logits = jnp.array([[1e4, -1e4], [-1e4, 1e4]])
    loss = losses.cross_entropy(logits, jnp.array([1, 1]))
    assert float(loss) == pytest.approx(1e4, rel=1e-6)
    assert np.all(np.isfinite(jax.grad(losses.cross_entropy)(logits, jnp.array([1, 1]))))


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "cross_entropy"])
def test_mask_ignores_padded_rows(name):
    rng = np.random.default_rng(0)
    loss_fn = losses.LOSSES[name]
    predictions = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    if name == "cross_entropy":
        targets = jnp.asarray(rng.integers(0, 3, size=6), jnp.int32)
    else:
        targets = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
    expected = loss_fn(predictions[:4], targets[:4])
    # Garbage in the padded rows must change nothing, gradients included.
    garbage = predictions.at[4:].set(1e3)
    np.testing.assert_allclose(loss_fn(garbage, targets, mask), expected, rtol=1e-6)
    gradient = jax.grad(loss_fn)(garbage, targets, mask)
    np.testing.assert_array_equal(gradient[4:], 0.0)


def test_all_padding_batch_gives_zero_not_nan():
    loss = losses.mse(jnp.ones((2, 1)), jnp.zeros((2, 1)), jnp.zeros(2))
    assert float(loss) == 0.0


@pytest.mark.parametrize("name", ["mse", "l1", "huber", "cross_entropy"])
def test_parity_with_torch_values_and_gradients(torch, name):
    functional = torch.nn.functional
    torch_fn = {
        "mse": functional.mse_loss,
        "l1": functional.l1_loss,
        "huber": functional.huber_loss,
        "cross_entropy": functional.cross_entropy,
    }[name]
    rng = np.random.default_rng(1)
    predictions = rng.normal(size=(16, 5)).astype(np.float32)
    if name == "cross_entropy":
        targets = rng.integers(0, 5, size=16)
        torch_targets = torch.from_numpy(targets)
    else:
        targets = (2 * rng.normal(size=(16, 5))).astype(np.float32)  # errors on both sides of Huber's delta
        torch_targets = torch.from_numpy(targets)
    torch_predictions = torch.from_numpy(predictions).requires_grad_(True)
    torch_loss = torch_fn(torch_predictions, torch_targets)
    torch_loss.backward()
    loss, gradient = jax.value_and_grad(losses.LOSSES[name])(jnp.asarray(predictions), jnp.asarray(targets))
    np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-6)
    np.testing.assert_allclose(gradient, torch_predictions.grad.numpy(), rtol=1e-6, atol=1e-9)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"predictions \(4, 1\) and targets \(4,\)"):
        losses.mse(jnp.ones((4, 1)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4,\)"):
        losses.l1(jnp.ones((4, 1)), jnp.ones(4))
    with pytest.raises(ValueError, match=r"logits \(4,\) and labels \(4,\)"):
        losses.cross_entropy(jnp.ones(4), jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        losses.mse(jnp.ones((4, 1)), jnp.ones((4, 1)), jnp.ones(3))


def test_the_cli_offers_exactly_the_losses_there_are():
    # config.py lists --loss's choices itself (it does not import JAX); a loss added to one must reach the other.
    loss_field = next(field for field in dataclasses.fields(Config) if field.name == "loss")
    assert set(loss_field.metadata["choices"]) == set(losses.LOSSES)
