"""Reports for people: the printed evaluation table, the predictions CSV, and plots.

All file and terminal output of evaluation lives here; the numbers come from jaxnets.metrics.
"""

import csv
import json
import os

import numpy as np

from jaxnets.metrics import circular_difference


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
        for name, p in report["parameters"].items():
            if "elongated" in p:
                e = p["elongated"]
                lines.append(
                    f"{name} over the {e['count']} elongated sources (axis ratio sigma2/sigma <= "
                    f"{e['axis_ratio_max']:g}): MAE {e['mae']:.4g}, RMSE {e['rmse']:.4g}"
                )
        lines.append(f"overall MSE {report['mse']:.6g}   MAE {report['mae']:.6g}")
    else:
        lines.append(f"accuracy {report['accuracy']:.4f}")
        for name, accuracy in report["per_class_accuracy"].items():
            lines.append(f"  {name:<20}{accuracy:.4f}")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        lines.extend("  " + " ".join(f"{n:6d}" for n in row) for row in report["confusion_matrix"])
    return "\n".join(lines)


def describe_checkpoint(report: dict) -> str:
    """Which checkpoint a report comes from: 'best checkpoint step 20 (validation loss 1.207)', and whether its head
    was refitted (train.py --refit-head)."""
    kind = {"best": "best checkpoint", "latest": "latest checkpoint"}.get(report.get("checkpoint"), "checkpoint")
    loss = report.get("validation_loss")
    detail = "no validation loss: saved mid-epoch" if loss is None else f"validation loss {loss:.6g}"
    return f"{kind} step {report['step']} ({detail}){describe_refit(report.get('refitted_head'), ', ')}"


def describe_refit(record: dict | None, prefix: str = "") -> str:
    """How train.py --refit-head refitted the head, from its record: 'last layer refitted by least squares (ridge
    0.0001)' or 'head fine-tuned on its features for 30 epochs'; "" for None."""
    if record is None:
        return ""
    if record.get("method") == "fine-tuned":
        return f"{prefix}head fine-tuned on its features for {record['epochs']} epoch{'s' * (record['epochs'] != 1)}"
    return f"{prefix}last layer refitted by least squares (ridge {record['ridge']:g})"


def write_json(path: str, value: dict) -> None:
    """Writes value as indented JSON, atomically (temp file + rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def write_predictions(
    path: str,
    index: np.ndarray,
    true: np.ndarray,
    predicted: np.ndarray,
    names: list[str],
    identifiers: list[str] | None = None,
) -> None:
    """CSV `index, [filename,] <name> (true), <name> (predicted), ...`, one row per example; `filename`
    (identifiers[index]) names the image behind each row when the dataset keeps one."""
    true, predicted = np.atleast_2d(true.T).T, np.atleast_2d(predicted.T).T
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        named = ["filename"] if identifiers is not None else []
        writer.writerow(["index", *named] + [f"{n} ({kind})" for n in names for kind in ("true", "predicted")])
        for i in range(len(index)):
            named = [identifiers[int(index[i])]] if identifiers is not None else []
            writer.writerow(
                [int(index[i]), *named] + [f"{v:.7g}" for pair in zip(true[i], predicted[i], strict=True) for v in pair]
            )
    os.replace(path + ".tmp", path)


def residuals(true: np.ndarray, predicted: np.ndarray, report: dict) -> np.ndarray:
    """predicted - true per parameter; for an angle the shorter way round its circle."""
    result = predicted - true
    for i, p in enumerate(report["parameters"].values()):
        if "period" in p:
            result[:, i] = circular_difference(predicted[:, i], true[:, i], p["period"])
    return result


def plot_predictions(path: str, true: np.ndarray, predicted: np.ndarray, report: dict) -> None:
    """Per parameter, side by side: predicted against true (with y = x and R²), and the residual (error)
    against the true value (with y = 0 and the MAE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["parameters"])
    errors = residuals(true, predicted, report)
    pairs = min(2, len(names))  # parameters per row, each a scatter and a residual panel
    rows = -(-len(names) // pairs)
    figure, axes = plt.subplots(rows, 2 * pairs, figsize=(7 * pairs, 3.3 * rows), squeeze=False)
    for i, name in enumerate(names):
        scatter, residual = axes[i // pairs][2 * (i % pairs)], axes[i // pairs][2 * (i % pairs) + 1]
        p = report["parameters"][name]
        low, high = float(np.min(true[:, i])), float(np.max(true[:, i]))
        scatter.scatter(true[:, i], predicted[:, i], s=4, alpha=0.5)
        scatter.plot([low, high], [low, high], "k--", linewidth=1)
        scatter.set(title=f"{name}  R² = {p['r2']:.3f}", xlabel="true", ylabel="predicted")
        residual.scatter(true[:, i], errors[:, i], s=4, alpha=0.5, color="tab:red")
        residual.axhline(0.0, color="k", linestyle="--", linewidth=1)
        kind = "circular error" if "period" in p else "error"
        residual.set(title=f"{name}  MAE = {p['mae']:.3g}", xlabel="true", ylabel=f"{kind} (predicted − true)")
    for j in range(len(names), rows * pairs):
        axes[j // pairs][2 * (j % pairs)].axis("off")
        axes[j // pairs][2 * (j % pairs) + 1].axis("off")
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
