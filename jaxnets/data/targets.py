"""Regression targets as the network sees them and back: angles as a (cos, sin) pair, then standardised.

An angle is periodic (theta = 179 degrees is next to theta = 1), so regressing it as a plain number teaches the
network a jump that is not there. Here a target declared an angle with period T becomes cos(2 pi v / T) and
sin(2 pi v / T), and the prediction comes back as atan2(sin, cos) * T / (2 pi) in [0, T). Every encoded column
is then standardised with the training split's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

# CosmoSim writes these in degrees: theta and orientation are axes (period 180), phi a direction (period 360).
COSMOSIM_ANGLES = ("theta:180", "orientation:180", "phi:360")


def parse_angles(declarations: Sequence[str]) -> dict[str, float]:
    """("theta:180", "phi:360") -> {"theta": 180.0, "phi": 360.0}; ValueError naming a bad declaration."""
    return _parse_named(declarations, "angle", "period", "theta:180")


def parse_weights(declarations: Sequence[str]) -> dict[str, float]:
    """Loss weights of targets: ("theta:4",) -> {"theta": 4.0}; ValueError naming a bad declaration."""
    return _parse_named(declarations, "target weight", "weight", "theta:4")


def parse_axis_ratios(declarations: Sequence[str]) -> dict[str, tuple[str, str]]:
    """("theta:sigma2/sigma",) -> {"theta": ("sigma2", "sigma")}: the angle of an ellipse's axis and the targets
    holding its minor and major axes. ValueError naming a bad declaration."""
    ratios = {}
    for declaration in declarations:
        name, _, axes = declaration.partition(":")
        minor, _, major = axes.partition("/")
        if not (name.strip() and minor.strip() and major.strip()):
            raise ValueError(f"angle axes {declaration!r}: write angle:minor/major, e.g. theta:sigma2/sigma")
        ratios[name.strip()] = (minor.strip(), major.strip())
    return ratios


def _parse_named(declarations: Sequence[str], kind: str, number: str, example: str) -> dict[str, float]:
    """("name:positive number", ...) -> {name: number}."""
    values = {}
    for declaration in declarations:
        name, _, text = declaration.partition(":")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not name.strip() or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{kind} {declaration!r}: write name:{number} with a positive {number}, e.g. {example}")
        values[name.strip()] = value
    return values


@dataclasses.dataclass(frozen=True)
class TargetEncoding:
    """How P targets become the W network outputs (W = P + number of angles) and back.

    names: the targets; periods: per target, its period if it is an angle, else None;
    mean, std: float32 [W] for standardising the encoded columns, or None to leave them as they are.
    """

    names: tuple[str, ...]
    periods: tuple[float | None, ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    axis_ratios: tuple[tuple[str, str, str], ...] = ()  # (angle, minor, major): see fit

    @classmethod
    def fit(
        cls,
        names: Sequence[str],
        angles: Mapping[str, float],
        train_targets: np.ndarray | None,
        *,
        standardize: bool,
        weights: Mapping[str, float] | None = None,
        axis_ratios: Mapping[str, tuple[str, str]] | None = None,
    ) -> TargetEncoding:
        """An encoding for targets `names` (those in `angles` are angles), standardised with the mean and std of
        the encoded train_targets [N, P] (a constant column gets std 1). standardize=False needs no targets.

        weights: {name: w} (the rest 1): the target's encoded columns are multiplied by sqrt(w), so that its
        squared errors count w times in an MSE, and its outputs are learned at that scale (decode undoes it).
        axis_ratios: {angle: (minor, major)}: the angle of an ellipse's axis is encoded as its ellipticity times
        (cos, sin), 1 - |minor/major| times them, so a round ellipse asks for (0, 0) rather than a direction it
        does not have; decode is unchanged (atan2 ignores the length). ValueError for names that are not targets.
        """
        ratios = tuple((angle, *axes) for angle, axes in (axis_ratios or {}).items())
        for angle, minor, major in ratios:
            if angle not in angles or angle not in names or minor not in names or major not in names:
                raise ValueError(
                    f"angle axes {angle}:{minor}/{major}: {angle} must be an angle and {minor}, {major} targets "
                    f"among {list(names)}"
                )
        plain = cls(tuple(names), tuple(angles.get(name) for name in names), axis_ratios=ratios)
        scale = np.sqrt(plain.column_weights(weights or {}).astype(np.float64))
        if not standardize:
            if np.all(scale == 1):
                return plain
            return dataclasses.replace(plain, mean=np.zeros_like(scale, np.float32), std=(1 / scale).astype(np.float32))
        encoded = plain.encode(np.asarray(train_targets, np.float64))
        mean, std = encoded.mean(axis=0), encoded.std(axis=0)
        std = np.where(std > 0, std, 1.0) / scale
        return dataclasses.replace(plain, mean=mean.astype(np.float32), std=std.astype(np.float32))

    @classmethod
    def standardizing(cls, mean: np.ndarray, std: np.ndarray) -> TargetEncoding:
        """Plain standardisation, (targets - mean) / std, of P unnamed targets: mean, std [P]."""
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        return cls(tuple(str(i) for i in range(mean.shape[0])), (None,) * mean.shape[0], mean, std)

    @property
    def angles(self) -> dict[str, float]:
        return {name: period for name, period in zip(self.names, self.periods, strict=True) if period is not None}

    @property
    def width(self) -> int:
        """Network outputs: one per plain target, two per angle."""
        return len(self.names) + len(self.angles)

    @property
    def encoded_names(self) -> tuple[str, ...]:
        """The output columns: "x", "theta cos", "theta sin", ..."""
        return tuple(
            column
            for name, period in zip(self.names, self.periods, strict=True)
            for column in ((name,) if period is None else (f"{name} cos", f"{name} sin"))
        )

    def column_weights(self, weights: Mapping[str, float]) -> np.ndarray:
        """Per-target weights ({name: weight}, 1 for the rest) as float32 [W]: an angle's weight on both its
        columns. ValueError for a name that is not a target."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"weights for {unknown}, which are not among the targets {list(self.names)}")
        return np.array(
            [
                weights.get(name, 1.0)
                for name, period in zip(self.names, self.periods, strict=True)
                for _ in range(1 if period is None else 2)
            ],
            np.float32,
        )

    def encode(self, targets: np.ndarray) -> np.ndarray:
        """targets [..., P] -> encoded [..., W] (float32 unless given float64)."""
        targets = np.asarray(targets)
        dtype = np.float64 if targets.dtype == np.float64 else np.float32
        columns = []
        for i, period in enumerate(self.periods):
            value = targets[..., i].astype(dtype)
            if period is None:
                columns.append(value)
            else:
                turn = value * dtype(2 * math.pi / period)
                columns += [np.cos(turn), np.sin(turn)]
        encoded = np.stack(columns, axis=-1).astype(dtype)
        for angle, minor, major in self.axis_ratios:
            cos_column = self.encoded_names.index(f"{angle} cos")
            encoded[..., cos_column : cos_column + 2] *= self._ellipticity(targets, minor, major, dtype)[..., None]
        if self.mean is not None:
            encoded = (encoded - self.mean.astype(dtype)) / self.std.astype(dtype)
        return encoded

    def _ellipticity(self, targets: np.ndarray, minor: str, major: str, dtype: type) -> np.ndarray:
        """1 - |minor / major| per row, clipped to [0, 1]; 0 where major is 0 (e.g. the zero rows that pad a batch)."""
        minor_values = targets[..., self.names.index(minor)].astype(dtype)
        major_values = targets[..., self.names.index(major)].astype(dtype)
        safe = np.where(major_values != 0, major_values, 1)
        return np.where(major_values != 0, np.clip(1 - np.abs(minor_values / safe), 0, 1), 0).astype(dtype)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        """encoded [..., W] (network outputs) -> targets [..., P]; angles in [0, period)."""
        encoded = np.asarray(encoded, np.float64)
        if self.mean is not None:
            encoded = encoded * self.std + self.mean
        values, column = [], 0
        for period in self.periods:
            if period is None:
                values.append(encoded[..., column])
                column += 1
            else:
                turn = np.arctan2(encoded[..., column + 1], encoded[..., column])
                values.append(np.mod(turn * (period / (2 * math.pi)), period))
                column += 2
        return np.stack(values, axis=-1)

    def move(self, encoded: np.ndarray, move: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The encoded outputs [..., W] of the targets moved by `move` (targets [..., P] -> [..., P], e.g. a
        rotation): each plain target moved, each angle's (cos, sin) turned to its moved angle with its length
        kept (the length says how sure the network is of the direction). float64 [..., W]."""
        encoded = np.asarray(encoded, np.float64)
        raw = encoded * self.std + self.mean if self.mean is not None else encoded
        unscaled = dataclasses.replace(self, mean=None, std=None, axis_ratios=())  # angles as unit (cos, sin)
        result = unscaled.encode(move(self.decode(encoded)))
        for angle in self.angles:
            cos_column = self.encoded_names.index(f"{angle} cos")
            length = np.hypot(raw[..., cos_column], raw[..., cos_column + 1])
            result[..., cos_column : cos_column + 2] *= length[..., None]
        return (result - self.mean) / self.std if self.mean is not None else result

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "periods": list(self.periods),
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "axis_ratios": [list(ratio) for ratio in self.axis_ratios],
        }

    @classmethod
    def from_json(cls, value: Mapping) -> TargetEncoding:
        mean, std = value.get("mean"), value.get("std")
        return cls(
            tuple(value["names"]),
            tuple(value["periods"]),
            None if mean is None else np.asarray(mean, np.float32),
            None if std is None else np.asarray(std, np.float32),
            tuple(tuple(ratio) for ratio in value.get("axis_ratios") or ()),  # none in encodings saved before
        )
