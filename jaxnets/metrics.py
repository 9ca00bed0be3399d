"""Numbers that say how good a model is: per-parameter regression errors and R², classification accuracy.

Pure NumPy functions of true and predicted values, in the units the caller gives them.
"""

import numpy as np


def regression_report(
    true: np.ndarray,
    predicted: np.ndarray,
    names: tuple[str, ...] | list[str],
    *,
    periods: tuple[float | None, ...] | None = None,
) -> dict:
    """Per parameter and overall errors. true, predicted: [examples, parameters].

    For each parameter: mae and mae_std (mean and std of |error|), bias and bias_std (mean and std
    of the signed error predicted - true), rmse, and r2 = 1 - sum(error^2) / sum((true - mean)^2).
    periods: per parameter, the period of an angle (else None). An angle's error is the circular one, the shorter
    way round (179 vs 1 degree is 2 degrees off for period 360), and its r2 uses deviations from the circular
    mean; the entry carries "period". Overall: mse and mae over all parameters, and the example count.
    """
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    if true.shape != predicted.shape or true.ndim != 2 or true.shape[1] != len(names):
        raise ValueError(
            f"expected true and predicted [examples, {len(names)}]; got {true.shape} and {predicted.shape}"
        )
    periods = tuple(periods) if periods is not None else (None,) * len(names)
    error, spread = predicted - true, true - true.mean(axis=0)
    for i, period in enumerate(periods):
        if period is not None:
            error[:, i] = circular_difference(predicted[:, i], true[:, i], period)
            spread[:, i] = circular_difference(true[:, i], circular_mean(true[:, i], period), period)
    variance = np.sum(np.square(spread), axis=0)
    r2 = 1.0 - np.sum(np.square(error), axis=0) / np.where(variance > 0, variance, np.nan)
    parameters = {}
    for i, name in enumerate(names):
        parameters[name] = {
            "mae": float(np.mean(np.abs(error[:, i]))),
            "mae_std": float(np.std(np.abs(error[:, i]))),
            "bias": float(np.mean(error[:, i])),
            "bias_std": float(np.std(error[:, i])),
            "rmse": float(np.sqrt(np.mean(np.square(error[:, i])))),
            "r2": float(r2[i]),
        }
        if periods[i] is not None:
            parameters[name]["period"] = float(periods[i])
            if "sigma" in names and "sigma2" in names:
                parameters[name]["elongated"] = _elongated(true, error[:, i], list(names))
    return {
        "task": "regression",
        "count": int(true.shape[0]),
        "parameters": parameters,
        "mse": float(np.mean(np.square(error))),
        "mae": float(np.mean(np.abs(error))),
    }


# A source's orientation is invisible when it is round: angle errors are also reported over the sources whose
# axis ratio (minor over major of sigma and sigma2) is at most this.
ELONGATED_AXIS_RATIO = 0.8


def _elongated(true: np.ndarray, error: np.ndarray, names: list[str]) -> dict:
    """An angle's MAE and RMSE over the elongated sources only (axis ratio <= ELONGATED_AXIS_RATIO)."""
    sigma, sigma2 = np.abs(true[:, names.index("sigma")]), np.abs(true[:, names.index("sigma2")])
    ratio = np.minimum(sigma, sigma2) / np.maximum(np.maximum(sigma, sigma2), 1e-12)
    chosen = error[ratio <= ELONGATED_AXIS_RATIO]
    return {
        "axis_ratio_max": ELONGATED_AXIS_RATIO,
        "count": int(chosen.size),
        "mae": float(np.mean(np.abs(chosen))) if chosen.size else float("nan"),
        "rmse": float(np.sqrt(np.mean(np.square(chosen)))) if chosen.size else float("nan"),
    }


def circular_difference(predicted: np.ndarray, true: np.ndarray, period: float) -> np.ndarray:
    """predicted - true wrapped into [-period / 2, period / 2): the shorter way round the circle."""
    half = period / 2
    return np.mod(np.asarray(predicted) - np.asarray(true) + half, period) - half


def circular_mean(angles: np.ndarray, period: float) -> float:
    """The mean direction of angles with the given period, in [0, period)."""
    turn = np.asarray(angles, np.float64) * (2 * np.pi / period)
    mean = np.arctan2(np.mean(np.sin(turn)), np.mean(np.cos(turn)))
    return float(np.mod(mean * period / (2 * np.pi), period))


def classification_report(labels: np.ndarray, logits: np.ndarray, class_names: tuple[str, ...] | list[str]) -> dict:
    """Accuracy, per-class accuracy (recall) and the confusion matrix [true class, predicted class].

    labels: [examples] integers; logits: [examples, classes].
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    predicted = np.asarray(logits).argmax(axis=-1)
    classes = len(class_names)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "task": "classification",
        "count": int(labels.size),
        "accuracy": float(np.mean(predicted == labels)) if labels.size else float("nan"),
        "per_class_accuracy": {name: float(per_class[i]) for i, name in enumerate(class_names)},
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }
