"""Regression and classification with the same network: one MLP trunk trained twice on the built-in lens images.

Regression: predict the Einstein radius (a real number) with the mean squared error. Classification: predict
the lens type (SIS or point mass) with the cross-entropy. Only the output layer (1 value or 2 logits) and the
loss differ. Run `python examples/regression_vs_classification.py`: under a minute on a laptop CPU; it builds a
small dataset in a temporary folder and writes examples/output/regression_vs_classification.png.
"""

import argparse
import os
import tempfile

import numpy as np
import optax
from flax import nnx

from jaxnets import losses, metrics, training
from jaxnets.data import lens, load_dataset, pipeline
from jaxnets.models import MLP

DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output")
TARGET = "einsteinR"
DISPLAY_NAMES = {"sis": "SIS", "point_mass": "point-mass"}


def train_and_test(
    dataset, hidden: tuple[int, ...], epochs: int, batch_size: int, learning_rate: float, seed: int
) -> dict:
    """Trains an MLP with Adam on dataset's train split; returns its learning curves and test predictions.

    Regression trains on the standardised target (mean 0, std 1 over the training split) and reports
    predictions in the original units. Returns {"train_loss": [epochs], "validation_loss": [epochs],
    "test_loss", "predictions": [N, outputs], "targets": [N, 1] or labels [N]}.
    """
    regression = dataset.task == "regression"
    loss_fn = losses.mse if regression else losses.cross_entropy
    outputs = len(dataset.target_names) if regression else dataset.num_classes
    model = MLP(int(np.prod(dataset.image_shape)), hidden, outputs, rngs=nnx.Rngs(seed))
    state = training.TrainState.create(model, optax.adam(learning_rate))
    standardize = dataset.target_stats() if regression else None

    def train_batches(epoch):
        return pipeline.batches(
            dataset, "train", batch_size, train=True, seed=seed, epoch=epoch, standardize=standardize
        )

    def evaluation_batches(split):
        return pipeline.batches(dataset, split, batch_size, train=False, standardize=standardize)

    history = {"train_loss": [], "validation_loss": []}
    # The loop leaves `trained` at the last epoch's state, evaluated below.
    for _, trained, epoch_metrics in training.fit(  # noqa: B007
        state, train_batches, epochs, loss_fn, validation_batches=lambda: evaluation_batches("validation")
    ):
        history["train_loss"].append(epoch_metrics["loss"])
        history["validation_loss"].append(epoch_metrics["validation_loss"])

    test = training.evaluate(
        trained,
        evaluation_batches("test"),
        training.make_eval_step(loss_fn, with_predictions=True),
        training.data_mesh(),
        with_predictions=True,
    )
    predictions, targets = test["predictions"], test["targets"]
    if regression:
        predictions, targets = (pipeline.destandardize(a, standardize) for a in (predictions, targets))
    return dict(history, test_loss=test["loss"], predictions=predictions, targets=targets)


def plot(
    regression: dict,
    classification: dict,
    example_images: np.ndarray,
    einstein_radius: float,
    class_names: tuple[str, ...],
    path: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 9.5), gridspec_kw={"width_ratios": [1.3, 1, 0.9]})
    rows = (
        ("regression of einsteinR, MSE loss", regression),
        ("classification of the lens type, cross-entropy loss", classification),
    )
    for row, (title, result) in enumerate(rows):
        epochs = np.arange(1, len(result["train_loss"]) + 1)
        axes[row, 0].plot(epochs, result["train_loss"], "o-", label="training")
        axes[row, 0].plot(epochs, result["validation_loss"], "s--", label="validation")
        axes[row, 0].set(
            title=title,
            xlabel="epoch",
            yscale="log",
            ylabel="MSE of the standardised einsteinR" if row == 0 else "cross-entropy",
        )
        axes[row, 0].legend()

    true, predicted = regression["targets"][:, 0], regression["predictions"][:, 0]
    ax = axes[0, 1]
    ax.scatter(true, predicted, s=6, alpha=0.5)
    limits = (min(true.min(), predicted.min()), max(true.max(), predicted.max()))
    ax.plot(limits, limits, "k--", lw=1, label="predicted = true")
    ax.set(
        title=f"test set: R² = {regression['r2']:.3f}",
        xlabel="true einsteinR (pixels)",
        ylabel="predicted einsteinR (pixels)",
        aspect="equal",
    )
    ax.legend(loc="upper left")

    ax = axes[1, 1]
    confusion = np.asarray(classification["confusion_matrix"])
    ax.imshow(confusion, cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(
            j,
            i,
            str(count),
            ha="center",
            va="center",
            color="white" if count > confusion.max() / 2 else "black",
            fontsize=14,
        )
    ax.set(
        title=f"test set: accuracy = {classification['accuracy']:.1%}",
        xlabel="predicted",
        ylabel="true",
        xticks=range(len(class_names)),
        yticks=range(len(class_names)),
        xticklabels=[DISPLAY_NAMES.get(n, n) for n in class_names],
        yticklabels=[DISPLAY_NAMES.get(n, n) for n in class_names],
    )

    # The input both networks see: the same source behind each lens type.
    for row, (image, name) in enumerate(zip(example_images, class_names, strict=True)):
        axes[row, 2].imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=255)
        axes[row, 2].set(
            title=f"input: {DISPLAY_NAMES.get(name, name)} lens\neinsteinR = {einstein_radius:.1f} px",
            xticks=[],
            yticks=[],
        )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(
    image_size: int = 32,
    num_train: int = 4000,
    num_validation: int = 500,
    num_test: int = 500,
    epochs: int = 15,
    batch_size: int = 64,
    hidden: tuple[int, ...] = (256, 128),
    learning_rate: float = 1e-3,
    seed: int = 0,
    data_dir: str | None = None,
    output_dir: str = DEFAULT_OUTPUT_DIR,
) -> dict:
    """Trains the regression and the classification network; prints, plots and returns their outcomes.

    data_dir: where the lens dataset is built (a temporary folder, removed afterwards, when None).
    Returns {"regression": {"train_loss", "validation_loss", "test_loss", "r2", ...},
    "classification": {"train_loss", "validation_loss", "test_loss", "accuracy", "confusion_matrix", ...},
    "figure"}.
    """
    with tempfile.TemporaryDirectory(prefix="jaxnets-lens-") as temporary:
        sizes = dict(
            image_size=image_size,
            num_train=num_train,
            num_validation=num_validation,
            num_test=num_test,
            seed=seed,
            data_dir=data_dir or temporary,
        )
        # Both tasks read the same images: one build, two views (parameters or lens type).
        regression_data = load_dataset("lens", task="regression", targets=[TARGET], **sizes)
        classification_data = load_dataset("lens", task="classification", **sizes)
        print(
            f"lens dataset {image_size}x{image_size}: {num_train} training, {num_validation} validation, "
            f"{num_test} test images; MLP {int(np.prod(regression_data.image_shape))} -> "
            f"{' -> '.join(map(str, hidden))} -> outputs, Adam lr {learning_rate:g}, {epochs} epochs"
        )
        regression = train_and_test(regression_data, hidden, epochs, batch_size, learning_rate, seed)
        classification = train_and_test(classification_data, hidden, epochs, batch_size, learning_rate, seed)

    regression["r2"] = metrics.regression_report(regression["targets"], regression["predictions"], [TARGET])[
        "parameters"
    ][TARGET]["r2"]
    class_names = tuple(classification_data.target_names)
    classification.update(
        metrics.classification_report(classification["targets"], classification["predictions"], class_names)
    )

    for name, result in (("regression (MSE)", regression), ("classification (cross-entropy)", classification)):
        curve = ", ".join(f"{loss:.4f}" for loss in result["train_loss"])
        print(f"{name}: training loss per epoch {curve}")
        print(
            f"{' ' * len(name)}  validation loss {result['validation_loss'][0]:.4f} -> "
            f"{result['validation_loss'][-1]:.4f}, test loss {result['test_loss']:.4f}"
        )
    print(f"regression: test R² of {TARGET} = {regression['r2']:.4f}")
    print(
        f"classification: test accuracy = {classification['accuracy']:.1%} (chance 50%), confusion matrix "
        f"(rows true {'/'.join(class_names)}) = {classification['confusion_matrix']}"
    )

    # The same source behind an SIS and a point-mass lens, for the figure.
    params = np.array(
        [[0.05 * image_size, 0.03 * image_size, 0.16 * image_size, 0.05 * image_size, 0.04 * image_size, 0.5]],
        np.float32,
    )
    examples = np.concatenate([lens.render(params, np.array([kind]), image_size) for kind in range(2)])

    os.makedirs(output_dir, exist_ok=True)
    figure = os.path.join(output_dir, "regression_vs_classification.png")
    plot(regression, classification, examples, float(params[0, 2]), class_names, figure)
    print(f"saved {figure}")
    return {"regression": regression, "classification": classification, "figure": figure}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help="folder for the PNG")
    parser.add_argument("--data-dir", help="TFDS folder to build the lens dataset in (default: a temporary one)")
    arguments = parser.parse_args()
    main(data_dir=arguments.data_dir, output_dir=arguments.output_dir)
