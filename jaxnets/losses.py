"""Loss functions: mean squared error, mean absolute error, Huber and cross-entropy.

Each returns the mean over the unmasked examples, as PyTorch's MSELoss, L1Loss, HuberLoss and
CrossEntropyLoss do with reduction='mean'; a mask of 0 leaves padded rows out of sum and count.
"""

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike


def _check_same_shape(predictions: jax.Array, targets: jax.Array) -> None:
    # Broadcasting [B, 1] against [B] would silently give a [B, B] loss: refuse it.
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions and targets must have the same shape; got predictions "
            f"{predictions.shape} and targets {targets.shape}"
        )


def _masked_mean(per_example: jax.Array, mask: ArrayLike | None) -> jax.Array:
    """Mean of per_example [B] over the rows where mask [B] is 1."""
    if mask is None:
        return jnp.mean(per_example)
    mask = jnp.asarray(mask, per_example.dtype)
    if mask.shape != per_example.shape[:1]:
        raise ValueError(f"mask must have shape [batch] = {per_example.shape[:1]}; got {mask.shape}")
    # max(count, 1) keeps an all-padding batch at loss 0 instead of NaN.
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _per_example(errors: jax.Array) -> jax.Array:
    """Mean of errors [B, ...] over all but the batch axis: [B]."""
    return errors.reshape(errors.shape[0], -1).mean(axis=1) if errors.ndim > 1 else errors


def mse(predictions: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """Mean squared error: L = mean((predictions - targets)^2).

    predictions, targets: [batch, ...] of the same shape; mask: [batch] of 0/1 or None.
    Equals torch.nn.MSELoss() when mask is None: the mean over every element.
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _check_same_shape(predictions, targets)
    return _masked_mean(_per_example(jnp.square(predictions - targets)), mask)


def l1(predictions: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """Mean absolute error: L = mean(|predictions - targets|), as torch.nn.L1Loss().

    Shapes as in mse. The gradient of |e| at e = 0 is 0 in JAX (torch.sign(0) = 0 too).
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _check_same_shape(predictions, targets)
    return _masked_mean(_per_example(jnp.abs(predictions - targets)), mask)


def huber(predictions: ArrayLike, targets: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """Huber loss with delta 1, as torch.nn.HuberLoss(): per element e = predictions - targets,
    L = mean(e^2 / 2 where |e| <= 1, else |e| - 1/2).

    Shapes as in mse. Quadratic near 0 like MSE, linear in the tails like L1: an error of 30 pulls with 1, not 30,
    so a few outlying targets (the roulette amplitudes near a critical curve, standardised) cannot take over a
    batch's gradient. (optax.losses.huber_loss per element.)
    """
    predictions, targets = jnp.asarray(predictions), jnp.asarray(targets)
    _check_same_shape(predictions, targets)
    return _masked_mean(_per_example(optax.losses.huber_loss(predictions, targets, delta=1.0)), mask)


def cross_entropy(logits: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> jax.Array:
    """Cross-entropy of integer labels: L = -mean(log(exp(x_y) / sum_i exp(x_i))).

    logits: [batch, classes]; labels: [batch] integers in [0, classes); mask: [batch] or None.
    The lecture writes the log-likelihood log(exp x_y / sum_i exp x_i), which training maximises;
    the loss minimised here, as torch.nn.CrossEntropyLoss, is its negative. log-sum-exp keeps it
    finite for logits of any size.
    """
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy expects logits [batch, classes] and labels [batch]; got logits "
            f"{logits.shape} and labels {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    log_probabilities = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
    per_example = -jnp.take_along_axis(log_probabilities, labels[:, None], axis=1)[:, 0]
    return _masked_mean(per_example, mask)


LOSSES = {"mse": mse, "l1": l1, "huber": huber, "cross_entropy": cross_entropy}
