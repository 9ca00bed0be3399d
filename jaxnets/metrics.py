"""Numbers that say how good a model is: per-parameter regression errors and R², classification accuracy.

Pure NumPy functions of true and predicted values, in the units the caller gives them.
"""

import numpy as np


def regression_report(true: np.ndarray, predicted: np.ndarray, names: tuple[str, ...] | list[str]) -> dict:
    """Per parameter and overall errors. true, predicted: [examples, parameters].

    For each parameter: mae and mae_std (mean and std of |error|), bias and bias_std (mean and std
    of the signed error predicted - true), rmse, and r2 = 1 - sum(error^2) / sum((true - mean)^2).
    Overall: mse and mae over all parameters, and the example count.
    """
    true, predicted = np.asarray(true, np.float64), np.asarray(predicted, np.float64)
    if true.shape != predicted.shape or true.ndim != 2 or true.shape[1] != len(names):
        raise ValueError(
            f"expected true and predicted [examples, {len(names)}]; got {true.shape} and {predicted.shape}"
        )
    error = predicted - true
    variance = np.sum(np.square(true - true.mean(axis=0)), axis=0)
    r2 = 1.0 - np.sum(np.square(error), axis=0) / np.where(variance > 0, variance, np.nan)
    parameters = {
        name: {
            "mae": float(np.mean(np.abs(error[:, i]))),
            "mae_std": float(np.std(np.abs(error[:, i]))),
            "bias": float(np.mean(error[:, i])),
            "bias_std": float(np.std(error[:, i])),
            "rmse": float(np.sqrt(np.mean(np.square(error[:, i])))),
            "r2": float(r2[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "task": "regression",
        "count": int(true.shape[0]),
        "parameters": parameters,
        "mse": float(np.mean(np.square(error))),
        "mae": float(np.mean(np.abs(error))),
    }


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
