"""The symmetries of a lensed image: the square's 4 rotations and 4 mirrors, and what each does to CosmoSim's targets.

A CosmoSim distribution draws the lens orientation and the source's direction uniformly, so a rotated or mirrored
image is another draw from it, with its targets rotated or mirrored: invariants (sigma, luminosity ...) stay, a
position (xiX, xiY) turns with the image, an angle turns or reflects, and a roulette amplitude pair
(alpha[m][s], beta[m][s]), the coefficients of cos(s phi) and sin(s phi), turns by s times the image's angle (a
mirror negates beta first). Training on random symmetries (augmentation) and averaging the predictions over all
eight (test-time augmentation) use that; tests/test_symmetry.py checks every rule against CosmoSim itself.

Coordinates are CosmoSim's planar ones: x to the right (the image column), y up (against the row).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jaxnets.data.cosmosim import ROULETTE_AMPLITUDE, cluster_parameter
from jaxnets.data.targets import TargetEncoding

# The 8 symmetries as integer 2x2 matrices acting on (x, y): rotations by k quarter turns, each also after the
# mirror y -> -y. The identity comes first.
_MIRROR = np.array([[1, 0], [0, -1]])
SYMMETRIES: tuple[np.ndarray, ...] = tuple(
    rotation @ mirror
    for rotation in (np.linalg.matrix_power(np.array([[0, -1], [1, 0]]), k) for k in range(4))
    for mirror in (np.eye(2, dtype=int), _MIRROR)
)

# CosmoSim's targets by what a symmetry does to them (its CSV columns; README "CosmoSim"). A cluster lens's
# einsteinradius[k], ellipseratio[k] and orientation[k] move as the parameter they hold.
INVARIANTS = frozenset({"sigma", "sigma2", "luminosity", "n_sersic", "einsteinradius", "ellipseratio", "R"})
POSITIONS = (("xiX", "xiY"), ("x", "y"), ("lensX", "lensY"), ("centreX", "centreY"))
ANGLES_IN_DEGREES = {"theta": 180.0, "orientation": 180.0, "phi": 360.0}  # name -> period (axis or direction)


def transform_images(images: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The images moved by `matrix` (one of SYMMETRIES): images [..., H, W, C] (square) -> the same shape.

    The value at (x, y) moves to matrix @ (x, y), about the image's centre; the identity leaves images of any shape
    as they are (one view of images that are not square)."""
    images = np.asarray(images)
    if np.array_equal(matrix, SYMMETRIES[0]):
        return images
    if images.ndim < 3 or images.shape[-3] != images.shape[-2]:
        raise ValueError(f"images must be [..., H, W, C] with H == W, got shape {images.shape}")
    if not _is_symmetry(matrix):
        raise ValueError(f"not a symmetry of the square: {np.asarray(matrix).tolist()}")
    rows, columns = images.ndim - 3, images.ndim - 2
    if matrix[0, 0] == 0:  # a quarter turn, with or without a mirror: transposing maps (x, y) to (-y, -x)
        images = np.swapaxes(images, rows, columns)
        matrix = matrix @ np.array([[0, -1], [-1, 0]])  # what is left to do: a diagonal matrix of signs
    if matrix[0, 0] < 0:
        images = np.flip(images, axis=columns)
    if matrix[1, 1] < 0:
        images = np.flip(images, axis=rows)
    return images


@dataclasses.dataclass(frozen=True)
class TargetSymmetry:
    """How the symmetries move a dataset's targets: `apply(targets, matrix)`.

    names: the targets, in column order; build with `for_targets`, which refuses targets without a rule.
    """

    names: tuple[str, ...]

    @functools.cached_property
    def _angle_periods(self) -> dict[str, float]:
        """The targets that are angles and their periods in degrees (a cluster lens's orientation[k] included)."""
        periods = {name: ANGLES_IN_DEGREES.get(cluster_parameter(name)) for name in self.names}
        return {name: period for name, period in periods.items() if period is not None}

    @classmethod
    def for_targets(cls, names: Sequence[str], angles: Mapping[str, float] | None = None) -> TargetSymmetry:
        """The symmetry of CosmoSim targets `names`; ValueError naming those without a known rule (a position
        without its partner, an amplitude without its pair's alpha, an angle declared with another period)."""
        names = tuple(names)
        present = set(names)
        unknown = []
        for name in names:
            amplitude = ROULETTE_AMPLITUDE.fullmatch(name)
            parameter = cluster_parameter(name)
            if parameter in INVARIANTS:
                continue
            if parameter in ANGLES_IN_DEGREES:
                period = ANGLES_IN_DEGREES[parameter]
                if angles and name in angles and angles[name] != period:
                    unknown.append(f"{name} (period {angles[name]:g}, not CosmoSim's {period:g})")
                continue
            pair = next((pair for pair in POSITIONS if name in pair), None)
            if pair is not None:
                if not set(pair) <= present:
                    unknown.append(f"{name} (without {(set(pair) - {name}).pop()})")
                continue
            if amplitude is not None:
                kind, order, harmonic = amplitude.groups()
                partner = f"{'beta' if kind == 'alpha' else 'alpha'}[{order}][{harmonic}]"
                if harmonic != "0" and partner not in present:  # beta[m][0] is always 0; alpha[m][0] never turns
                    unknown.append(f"{name} (without {partner})")
                continue
            unknown.append(name)
        if unknown:
            raise ValueError(
                f"no rotation or mirror rule for the targets {', '.join(unknown)}: rotations and mirrors apply to "
                "CosmoSim's targets (invariants such as sigma, positions such as xiX/xiY, the angles theta, "
                "orientation, phi in degrees and the roulette amplitudes alpha/beta[m][s])"
            )
        return cls(names)

    def apply(self, targets: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """The targets of the image moved by `matrix` (one of SYMMETRIES): targets [..., P] -> float64 [..., P]."""
        if not _is_symmetry(matrix):
            raise ValueError(f"not a symmetry of the square: {np.asarray(matrix).tolist()}")
        targets = np.asarray(targets, np.float64)
        if targets.shape[-1] != len(self.names):
            raise ValueError(f"targets must be [..., {len(self.names)}] ({', '.join(self.names)}), got {targets.shape}")
        column = {name: i for i, name in enumerate(self.names)}
        out = targets.copy()
        mirrored = round(np.linalg.det(matrix)) < 0
        rotation = matrix @ _MIRROR if mirrored else matrix
        turn = math.atan2(rotation[1, 0], rotation[0, 0])
        for x_name, y_name in POSITIONS:
            if x_name in column:
                x, y = targets[..., column[x_name]], targets[..., column[y_name]]
                out[..., column[x_name]] = matrix[0, 0] * x + matrix[0, 1] * y
                out[..., column[y_name]] = matrix[1, 0] * x + matrix[1, 1] * y
        for name, period in self._angle_periods.items():  # an axis or a direction: reflect, turn; in [0, period)
            angle = targets[..., column[name]]
            out[..., column[name]] = np.mod((-angle if mirrored else angle) + math.degrees(turn), period)
        for name in self.names:
            amplitude = ROULETTE_AMPLITUDE.fullmatch(name)
            if amplitude is None or amplitude.group(1) != "alpha":
                continue
            harmonic = int(amplitude.group(3))
            beta_name = f"beta[{amplitude.group(2)}][{harmonic}]"
            alpha = targets[..., column[name]]
            beta = targets[..., column[beta_name]] if beta_name in column else np.zeros_like(alpha)
            if mirrored:  # y -> -y takes phi to -phi: cos(s phi) stays, sin(s phi) changes sign
                beta = -beta
            cos, sin = math.cos(harmonic * turn), math.sin(harmonic * turn)
            out[..., column[name]] = alpha * cos - beta * sin
            if beta_name in column:
                out[..., column[beta_name]] = alpha * sin + beta * cos
        return out

    def average_outputs(
        self, encoding: TargetEncoding, outputs: Sequence[np.ndarray], views: Sequence[np.ndarray]
    ) -> np.ndarray:
        """Test-time augmentation's answer: outputs[v] [N, W] are the network's (encoded) outputs for the images
        moved by views[v]; each is moved back by the view's inverse (angles keep their length: the network's
        certainty) and their mean returned, float64 [N, W], to decode or score as one view's outputs."""
        moved_back = [
            encoding.move(output, functools.partial(self.apply, matrix=inverse(view)))
            for output, view in zip(outputs, views, strict=True)
        ]
        return np.mean(moved_back, axis=0)


def inverse(matrix: np.ndarray) -> np.ndarray:
    """The symmetry that undoes `matrix`: its transpose (they are orthogonal)."""
    return np.asarray(matrix).T


def _is_symmetry(matrix: np.ndarray) -> bool:
    matrix = np.asarray(matrix)
    return matrix.shape == (2, 2) and any(np.array_equal(matrix, symmetry) for symmetry in SYMMETRIES)


__all__ = ["SYMMETRIES", "TargetSymmetry", "inverse", "transform_images"]
