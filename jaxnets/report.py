"""Reports for people: the printed evaluation table, the predictions CSV, and plots.

All file and terminal output of evaluation lives here; the numbers come from jaxnets.metrics.
"""

import csv
import json
import os

import numpy as np


def format_report(report: dict) -> str:
    """A plain-text table of a regression or classification report."""
    lines = [f"examples: {report['count']}   loss per sample: {report.get('loss', float('nan')):.6g}"]
    if report["task"] == "regression":
        width = max([12] + [len(name) + 2 for name in report["parameters"]])  # alpha[10][11] and the like
        lines.append(f"{'parameter':<{width}}{'MAE ± std':>24}{'mean error ± std':>26}{'RMSE':>12}{'R²':>9}")
        for name, p in report["parameters"].items():
            name = f"{name}*" if "period" in p else name
            lines.append(
                f"{name:<{width}}{p['mae']:>12.4g} ± {p['mae_std']:<9.3g}{p['bias']:>13.4g} ± "
                f"{p['bias_std']:<10.3g}{p['rmse']:>12.4g}{p['r2']:>9.4f}"
            )
        angles = [f"{name} (period {p['period']:g})" for name, p in report["parameters"].items() if "period" in p]
        if angles:
            lines.append(f"* angle, errors the shorter way round the circle: {', '.join(angles)}")
        lines.append(f"overall MSE {report['mse']:.6g}   MAE {report['mae']:.6g}")
    else:
        lines.append(f"accuracy {report['accuracy']:.4f}")
        for name, accuracy in report["per_class_accuracy"].items():
            lines.append(f"  {name:<20}{accuracy:.4f}")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.extend("  " + " ".join(f"{n:6d}" for n in row) for row in report["confusion_matrix"])
    return "\n".join(lines)


def describe_checkpoint(report: dict) -> str:
    """Which checkpoint a report comes from: 'best checkpoint step 20 (validation loss 1.207)'."""
    kind = {"best": "best checkpoint", "latest": "latest checkpoint"}.get(report.get("checkpoint"), "checkpoint")
    loss = report.get("validation_loss")
    detail = "no validation loss: saved mid-epoch" if loss is None else f"validation loss {loss:.6g}"
    return f"{kind} step {report['step']} ({detail})"


def write_json(path: str, value: dict) -> None:
    """Writes value as indented JSON, atomically (temp file + rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_predictions(path: str, index: np.ndarray, true: np.ndarray, predicted: np.ndarray, names: list[str]) -> None:
    """CSV `index, <name> (true), <name> (predicted), ...`, one row per example."""
    true, predicted = np.atleast_2d(true.T).T, np.atleast_2d(predicted.T).T
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index"] + [f"{n} ({kind})" for n in names for kind in ("true", "predicted")])
        for i in range(len(index)):
            writer.writerow(
                [int(index[i])] + [f"{v:.7g}" for pair in zip(true[i], predicted[i], strict=True) for v in pair]
            )
    os.replace(path + ".tmp", path)


def plot_predictions(path: str, true: np.ndarray, predicted: np.ndarray, report: dict) -> None:
    """Predicted-vs-true scatter plots, one panel per parameter, with the y = x line and R²."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["parameters"])
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4 * rows), squeeze=False)
    for i, name in enumerate(names):
        axis = axes[i // columns][i % columns]
        axis.scatter(true[:, i], predicted[:, i], s=4, alpha=0.5)
        low, high = float(np.min(true[:, i])), float(np.max(true[:, i]))
        axis.plot([low, high], [low, high], "k--", linewidth=1)
        axis.set(title=f"{name}  R² = {report['parameters'][name]['r2']:.3f}", xlabel="true", ylabel="predicted")
    for j in range(len(names), rows * columns):
        axes[j // columns][j % columns].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_loss_curve(path: str, history: list[dict]) -> None:
    """Training and validation loss per epoch (log scale) from metrics.jsonl records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    axis.plot(epochs, [h["loss"] for h in history], "o-", label="training loss")
    if all("validation_loss" in h for h in history):
        axis.plot(epochs, [h["validation_loss"] for h in history], "s-", label="validation loss")
    axis.set(xlabel="epoch", ylabel="loss", yscale="log", title="Loss per epoch")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
