"""The built-in `lens` dataset: gravitational-lens images from a vectorised NumPy ray tracer.

`render` draws lensed sources, `sample_parameters` draws their parameters, and `Lens` is the TFDS builder.

Physics (in the spirit of CosmoSim's Raytrace model). Every image pixel has a position theta in pixels,
origin at the image centre, x to the right and y up. Its light ray reaches the source plane at

    beta = theta - alpha(theta)

with the deflection of a singular isothermal sphere (SIS), alpha = R_E theta/|theta|, or of a point mass,
alpha = R_E^2 theta/|theta|^2 (R_E = `einsteinR`, the Einstein radius). The pixel shows the source's
surface brightness at beta (lensing conserves surface brightness): an elliptical Gaussian centred at
(x, y), with standard deviation `sigma` along the axis at angle `theta` (radians, counter-clockwise from
the x axis) and `sigma2` across it,

    I = exp(-u^2/(2 sigma^2) - v^2/(2 sigma2^2)),   (u, v) = beta - (x, y) rotated by -theta,

stored as round(255 I) in a single uint8 channel. A source right behind the lens (x = y = 0) becomes a
ring of radius R_E for both lens models.

Parameter ranges, for an image of S x S pixels (all lengths in pixels, so they scale with S):

    x, y       uniform in [-0.12 S, 0.12 S]   source position; images stay inside the frame
    einsteinR  uniform in [0.10 S, 0.22 S]    a ring 6 to 14 pixels in radius even at S = 64
    sigma      uniform in [0.03 S, 0.08 S]    never below 1.9 pixels at S = 64, so the source is resolved
    sigma2     sigma * uniform [0.5, 1]       minor axis; 1 means a round Gaussian
    theta      uniform in [0, pi)             orientation; invisible when sigma2 is close to sigma
    lens       0 = SIS, 1 = point mass, with equal probability

x, y, einsteinR and sigma change every image visibly (arc positions, ring size, arc width), so a CNN
can learn them; sigma2 and theta are harder by design (theta is an angle and unobservable for round
sources), the non-trivial part of the regression.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxnets.config import LENS_IMAGE_SIZE, Config
from jaxnets.data.info import LocalDatasetInfo

DEFAULTS = Config()  # lens dataset sizes default to the run's defaults
PARAM_NAMES = ("x", "y", "einsteinR", "sigma", "sigma2", "theta")
LENS_NAMES = ("sis", "point_mass")
SPLIT_NAMES = ("train", "validation", "test")

# Ranges as fractions of the image size (see the module docstring); theta in radians.
POSITION_RANGE = (-0.12, 0.12)
EINSTEIN_RADIUS_RANGE = (0.10, 0.22)
SIGMA_RANGE = (0.03, 0.08)
SIGMA2_RATIO_RANGE = (0.5, 1.0)
THETA_RANGE = (0.0, np.pi)
# The loss weights train.py uses on this dataset (--target-weights): with theta's cos and sin weighing 1 like the
# other targets, the default run learns theta poorly (21 degrees off without dropout, ~40 with it; chance 45);
# weighing 2, it learns it to ~3 degrees and every other target too (docs/default_run.md). Without lensing
# theta is learned at weight 1: the lens makes it the hard target.
LOSS_WEIGHTS = ("theta:2",)
# And theta is trained as the source's ellipticity 1 - sigma2/sigma times (cos, sin) (--angle-axes): a round source
# then asks for no direction instead of a random one, and the default run learns theta to ~3 degrees.
ANGLE_AXES = ("theta:sigma2/sigma",)

# Images rendered per vectorised step: 64 x 128^2 float32 is 4 MiB per temporary, which stays in cache
# (of 16, 64 and 256 images per step, 64 rendered fastest).
CHUNK_PIXELS = 64 * 128 * 128


def pixel_grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre positions theta_x, theta_y: each float32 [S, S], origin at the centre, y up."""
    centres = np.arange(image_size, dtype=np.float32) - np.float32((image_size - 1) / 2)
    theta_x = np.broadcast_to(centres[None, :], (image_size, image_size))
    theta_y = np.broadcast_to(-centres[:, None], (image_size, image_size))  # row 0 is the top
    return np.ascontiguousarray(theta_x), np.ascontiguousarray(theta_y)


def sample_parameters(rng: np.random.Generator, num_images: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws lens and source parameters from the documented ranges.

    Returns params float32 [N, 6] in PARAM_NAMES order (lengths in pixels) and lens int64 [N] (0 SIS, 1 point mass).
    """
    size = np.float64(image_size)
    x = rng.uniform(*POSITION_RANGE, num_images) * size
    y = rng.uniform(*POSITION_RANGE, num_images) * size
    einstein_radius = rng.uniform(*EINSTEIN_RADIUS_RANGE, num_images) * size
    sigma = rng.uniform(*SIGMA_RANGE, num_images) * size
    sigma2 = sigma * rng.uniform(*SIGMA2_RATIO_RANGE, num_images)
    theta = rng.uniform(*THETA_RANGE, num_images)
    lens = rng.integers(0, len(LENS_NAMES), num_images)
    params = np.stack([x, y, einstein_radius, sigma, sigma2, theta], axis=1).astype(np.float32)
    return params, lens.astype(np.int64)


def render(params: np.ndarray, lens: np.ndarray, image_size: int) -> np.ndarray:
    """Ray-traces lensed images.

    params: float32 [N, 6] in PARAM_NAMES order; lens: int [N] (0 SIS, 1 point mass).
    Returns uint8 [N, S, S, 1] = round(255 I), I the source brightness at beta = theta - alpha(theta).
    """
    params = np.asarray(params, dtype=np.float32)
    lens = np.asarray(lens)
    if params.ndim != 2 or params.shape[1] != len(PARAM_NAMES) or lens.shape != params.shape[:1]:
        raise ValueError(f"expected params [N, {len(PARAM_NAMES)}] and lens [N], got {params.shape} and {lens.shape}")
    theta_x, theta_y = pixel_grid(image_size)
    # alpha = k * g with a per-image scalar k and a fixed field g: SIS k = R_E, g = theta/|theta|;
    # point mass k = R_E^2, g = theta/|theta|^2. Precomputing g makes a ray trace two multiply-adds.
    radius2 = np.maximum(theta_x * theta_x + theta_y * theta_y, np.float32(1e-12))  # odd S puts a pixel at 0
    radius = np.sqrt(radius2)
    fields = np.stack(
        [np.stack([theta_x / radius, theta_y / radius]), np.stack([theta_x / radius2, theta_y / radius2])]
    )  # [lens, xy, S, S]

    images = np.empty((len(params), image_size, image_size, 1), np.uint8)
    chunk = max(1, CHUNK_PIXELS // (image_size * image_size))
    for start in range(0, len(params), chunk):
        p = params[start : start + chunk]
        kind = lens[start : start + chunk]
        x, y, einstein_radius, sigma, sigma2, angle = (p[:, i, None, None] for i in range(6))
        k = np.where(kind == 1, p[:, 2] * p[:, 2], p[:, 2])[:, None, None]
        field = fields[kind]  # [n, xy, S, S]
        dx = theta_x - x - k * field[:, 0]  # beta - (x, y): the ray's offset from the source centre
        dy = theta_y - y - k * field[:, 1]
        # u^2/(2 sigma^2) + v^2/(2 sigma2^2) as the quadratic form a dx^2 + 2 b dx dy + c dy^2.
        cos, sin = np.cos(angle), np.sin(angle)
        inv_major, inv_minor = 0.5 / (sigma * sigma), 0.5 / (sigma2 * sigma2)
        a = cos * cos * inv_major + sin * sin * inv_minor
        b = cos * sin * (inv_major - inv_minor)
        c = sin * sin * inv_major + cos * cos * inv_minor
        exponent = dx * dx
        exponent *= a
        dx *= dy
        dx *= 2 * b
        exponent += dx
        dy *= dy
        dy *= c
        exponent += dy
        np.negative(exponent, out=exponent)
        np.exp(exponent, out=exponent)
        exponent *= np.float32(255)
        exponent += np.float32(0.5)
        images[start : start + chunk, :, :, 0] = exponent  # truncation of x + 0.5 rounds; x <= 255.5
    return images


def generate(
    num_images: int, image_size: int, seed: int | np.random.SeedSequence
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples and renders `num_images` examples: (images uint8 [N,S,S,1], params float32 [N,6], lens int64 [N])."""
    params, lens = sample_parameters(np.random.default_rng(seed), num_images, image_size)
    return render(params, lens, image_size), params, lens


@dataclasses.dataclass(eq=False)
class LensConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed; all are in the name, so a cache is never reused for other sizes."""

    image_size: int = LENS_IMAGE_SIZE
    num_train: int = DEFAULTS.num_train
    num_validation: int = DEFAULTS.num_validation
    num_test: int = DEFAULTS.num_test
    seed: int = DEFAULTS.seed

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}


def lens_config(
    image_size: int = LENS_IMAGE_SIZE,
    num_train: int = DEFAULTS.num_train,
    num_validation: int = DEFAULTS.num_validation,
    num_test: int = DEFAULTS.num_test,
    seed: int = DEFAULTS.seed,
) -> LensConfig:
    """A LensConfig named like `s75_n6400-1000-1000_seed0`."""
    for label, value in (
        ("image_size", image_size),
        ("num_train", num_train),
        ("num_validation", num_validation),
        ("num_test", num_test),
        ("seed", seed),
    ):
        if not isinstance(value, (int, np.integer)) or value < 0 or (label == "image_size" and value < 2):
            raise ValueError(f"lens dataset: {label} must be a non-negative integer (image_size >= 2), got {value!r}")
    name = f"s{image_size}_n{num_train}-{num_validation}-{num_test}_seed{seed}"
    return LensConfig(
        name=name,
        description=f"{image_size}x{image_size} lens images, splits "
        f"{num_train}/{num_validation}/{num_test}, seed {seed}",
        image_size=int(image_size),
        num_train=int(num_train),
        num_validation=int(num_validation),
        num_test=int(num_test),
        seed=int(seed),
    )


class Lens(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Gravitational-lens images with their parameters (regression) and lens model (classification).

    Features: image uint8 [S, S, 1]; params float32 [6] in PARAM_NAMES order; lens ClassLabel(sis, point_mass).
    Each split draws from its own seed stream (seed, split number), so changing one split's size leaves
    the others unchanged, and rebuilding gives identical bytes.
    """

    name = "lens"
    # TFDS derives code_path from the package and, for an editable install, then needs the undeclared
    # `importlib_resources` backport; naming this file directly avoids that lookup.
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "SIS and point-mass lenses, elliptical Gaussian sources."}
    BUILDER_CONFIGS = [lens_config(), *(lens_config(size) for size in (64, 128, 256, 512))]
    DEFAULT_CONFIG_NAME = lens_config().name

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return LocalDatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor + ZLIB rather than Image: Image encoding needs TensorFlow (shared/NOTES.md).
                    "image": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                    ),
                    "params": tfds.features.Tensor(
                        shape=(len(PARAM_NAMES),),
                        dtype=np.float32,
                        doc="x, y, einsteinR, sigma, sigma2 (pixels), theta (radians)",
                    ),
                    "lens": tfds.features.ClassLabel(names=LENS_NAMES),
                }
            ),
            supervised_keys=("image", "params"),
            # Written in generation order: the order is already random and the bytes stay reproducible.
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(param_names=list(PARAM_NAMES)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is simulated
        sizes = self.builder_config.split_sizes()
        return {
            name: self._generate_examples(split_number, sizes[name])
            for split_number, name in enumerate(SPLIT_NAMES)
            if sizes[name] > 0
        }

    def _generate_examples(self, split_number: int, num_examples: int):
        config = self.builder_config
        rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(split_number,)))
        params, lens = sample_parameters(rng, num_examples, config.image_size)
        # Render a few hundred at a time (vectorised, without a whole 512^2 split in memory), the next
        # batch in a background thread while TFDS compresses this one: NumPy and zlib both release the GIL,
        # so the two cores overlap and the build runs at about the speed of zlib alone.
        step = max(1, (256 * 128 * 128) // (config.image_size**2))
        starts = range(0, num_examples, step)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:

            def render_from(start):
                return pool.submit(render, params[start : start + step], lens[start : start + step], config.image_size)

            pending = render_from(0)
            for start in starts:
                images = pending.result()
                if start + step < num_examples:
                    pending = render_from(start + step)
                for offset, image in enumerate(images):
                    index = start + offset
                    yield index, {"image": image, "params": params[index], "lens": lens[index]}


def build(
    image_size: int = LENS_IMAGE_SIZE,
    num_train: int = DEFAULTS.num_train,
    num_validation: int = DEFAULTS.num_validation,
    num_test: int = DEFAULTS.num_test,
    seed: int = DEFAULTS.seed,
    data_dir: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds the dataset into `data_dir` (TFDS default ~/tensorflow_datasets) once; later calls reuse it."""
    config = lens_config(image_size, num_train, num_validation, num_test, seed)
    # A predefined config is passed by name: TFDS warns about every custom config object.
    predefined = {c.name for c in Lens.BUILDER_CONFIGS}
    builder = Lens(
        config=config.name if config.name in predefined else config, data_dir=data_dir, file_format="array_record"
    )
    try:
        builder.download_and_prepare(file_format="array_record")
    except OSError:
        # Another process (e.g. a second JAX process) renamed the same deterministic build into place
        # first; TFDS has removed our copy, so use theirs.
        if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
            raise
        builder = Lens(config=builder.builder_config, data_dir=data_dir, file_format="array_record")
    return builder
