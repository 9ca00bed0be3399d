"""Regression targets as the network sees them and back: angles as a (cos, sin) pair, amplitude pairs optionally
in polar form, then standardised.

An angle is periodic (theta = 179 degrees is next to theta = 1), so regressing it as a plain number teaches the
network a jump that is not there. Here a target declared an angle with period T becomes cos(2 pi v / T) and
sin(2 pi v / T), and the prediction comes back as atan2(sin, cos) * T / (2 pi) in [0, T).

A pair of amplitudes (a, b), the coefficients of cos(s phi) and sin(s phi) such as CosmoSim's roulette amplitudes
alpha[m][s] and beta[m][s], can be trained in polar form: log |(a, b)| and the direction (a, b) / |(a, b)|. Their
size spans orders of magnitude and follows the lens smoothly in the logarithm, while the direction turns with the
image. A lone amplitude (its partner always 0) becomes log |a| and its sign. The prediction comes back as
exp(log) times the predicted direction, whose length (under 1 where the network is unsure) shrinks it.

Every encoded column is then standardised with the training split's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from jaxnets.data.cosmosim import ROULETTE_AMPLITUDE

# CosmoSim writes these in degrees: theta and orientation are axes (period 180), phi a direction (period 360).
COSMOSIM_ANGLES = ("theta:180", "orientation:180", "phi:360")
_SMALLEST_MAGNITUDE = 1e-30  # the logarithm of 0 (e.g. in the zero rows that pad a batch) is taken as this one's

Polar = tuple[str, str | None]  # (a, b) trained as log |(a, b)| and its direction; (a, None): log |a| and its sign


def roulette_pairs(names: Sequence[str]) -> tuple[Polar, ...]:
    """CosmoSim's roulette amplitudes among names as polar pairs: (alpha[m][s], beta[m][s]) where both are
    targets, (alpha[m][s], None) or (beta[m][s], None) where only one is (beta[m][0], always 0, is often left out)."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    for name in names:
        match = ROULETTE_AMPLITUDE.fullmatch(name)
        if match:
            found.setdefault((match[2], match[3]), {})[match[1]] = name
    return tuple(
        (kinds["alpha"], kinds.get("beta")) if "alpha" in kinds else (kinds["beta"], None) for kinds in found.values()
    )


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
    """How P targets become the W network outputs and back (W = P + one per angle + one per polar pair and lone
    polar amplitude).

    names: the targets; periods: per target, its period if it is an angle, else None;
    mean, std: float32 [W] for standardising the encoded columns, or None to leave them as they are;
    polar: amplitude pairs trained in polar form (see the module's docstring).
    """

    names: tuple[str, ...]
    periods: tuple[float | None, ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    axis_ratios: tuple[tuple[str, str, str], ...] = ()  # (angle, minor, major): see fit
    polar: tuple[Polar, ...] = ()

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
        polar: Sequence[Polar] = (),
    ) -> TargetEncoding:
        """An encoding for targets `names` (those in `angles` are angles), standardised with the mean and std of
        the encoded train_targets [N, P] (a constant column gets std 1). standardize=False needs no targets.

        weights: {name: w} (the rest 1): the target's encoded columns are multiplied by sqrt(w), so that its
        squared errors count w times in an MSE, and its outputs are learned at that scale (decode undoes it).
        axis_ratios: {angle: (minor, major)}: the angle of an ellipse's axis is encoded as its ellipticity times
        (cos, sin), 1 - |minor/major| times them, so a round ellipse asks for (0, 0) rather than a direction it
        does not have; decode is unchanged (atan2 ignores the length).
        polar: pairs (a, b) of plain targets trained as log |(a, b)| and direction, (a, None) as log |a| and sign.
        ValueError for names that are not targets or cannot be so encoded.
        """
        ratios = tuple((angle, *axes) for angle, axes in (axis_ratios or {}).items())
        for angle, minor, major in ratios:
            if angle not in angles or angle not in names or minor not in names or major not in names:
                raise ValueError(
                    f"angle axes {angle}:{minor}/{major}: {angle} must be an angle and {minor}, {major} targets "
                    f"among {list(names)}"
                )
        polar = tuple((a, b) for a, b in polar)
        in_polar = [name for pair in polar for name in pair if name is not None]
        if any(name not in names or name in angles for name in in_polar) or len(set(in_polar)) < len(in_polar):
            raise ValueError(
                f"polar amplitudes {list(polar)}: each must be a target among {list(names)}, not an "
                f"angle, and in one pair only"
            )
        plain = cls(tuple(names), tuple(angles.get(name) for name in names), axis_ratios=ratios, polar=polar)
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

    @functools.cached_property
    def _groups(self) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
        """(kind, target indices, column names) in column order: "plain" and "angle" per target, "polar" per pair at
        the place of its first target. Worked out once per encoding (encode runs on every batch)."""
        index = {name: i for i, name in enumerate(self.names)}
        polar_of = {name: pair for pair in self.polar for name in pair if name is not None}
        groups = []
        for i, (name, period) in enumerate(zip(self.names, self.periods, strict=True)):
            if name in polar_of:
                a, b = polar_of[name]
                if b is None:
                    groups.append(("polar", (i,), (f"{a} log magnitude", f"{a} sign")))
                elif min(index[a], index[b]) == i:
                    pair = f"{a}, {b}"
                    groups.append(
                        (
                            "polar",
                            (index[a], index[b]),
                            tuple(f"{pair} {part}" for part in ("log magnitude", "cos", "sin")),
                        )
                    )
            elif period is None:
                groups.append(("plain", (i,), (name,)))
            else:
                groups.append(("angle", (i,), (f"{name} cos", f"{name} sin")))
        return groups

    @property
    def width(self) -> int:
        """Network outputs: one per plain target, two per angle and lone polar amplitude, three per polar pair."""
        return len(self.encoded_names)

    @property
    def encoded_names(self) -> tuple[str, ...]:
        """The output columns: "x", "theta cos", "theta sin", ..."""
        return tuple(column for _, _, columns in self._groups for column in columns)

    def column_weights(self, weights: Mapping[str, float]) -> np.ndarray:
        """Per-target weights ({name: weight}, 1 for the rest) as float32 [W]: an angle's weight on both its
        columns, a polar pair's (given for either target) on all three. ValueError for a name that is not a target,
        or for a polar pair given two different weights."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"weights for {unknown}, which are not among the targets {list(self.names)}")
        columns = []
        for _, indices, names in self._groups:
            given = {weights[self.names[i]] for i in indices if self.names[i] in weights}
            if len(given) > 1:
                raise ValueError(f"{[self.names[i] for i in indices]} are trained together: give them one weight")
            columns += [given.pop() if given else 1.0] * len(names)
        return np.array(columns, np.float32)

    def encode(self, targets: np.ndarray) -> np.ndarray:
        """targets [..., P] -> encoded [..., W] (float32 unless given float64)."""
        targets = np.asarray(targets)
        dtype = np.float64 if targets.dtype == np.float64 else np.float32
        columns = []
        for kind, indices, _ in self._groups:
            values = [targets[..., i].astype(dtype) for i in indices]
            if kind == "plain":
                columns += values
            elif kind == "angle":
                turn = values[0] * dtype(2 * math.pi / self.periods[indices[0]])
                columns += [np.cos(turn), np.sin(turn)]
            else:
                magnitude = np.hypot(values[0], values[1]) if len(values) == 2 else np.abs(values[0])
                safe = np.where(magnitude > 0, magnitude, 1)
                columns.append(np.log(np.maximum(magnitude, _SMALLEST_MAGNITUDE)))
                columns += [value / safe for value in values]
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
        values = [None] * len(self.names)
        column = 0
        for kind, indices, names in self._groups:
            if kind == "plain":
                values[indices[0]] = encoded[..., column]
            elif kind == "angle":
                turn = np.arctan2(encoded[..., column + 1], encoded[..., column])
                period = self.periods[indices[0]]
                values[indices[0]] = np.mod(turn * (period / (2 * math.pi)), period)
            else:
                magnitude = np.exp(encoded[..., column])
                for offset, i in enumerate(indices, start=1):
                    values[i] = magnitude * encoded[..., column + offset]
            column += len(names)
        return np.stack(values, axis=-1)

    def move(self, encoded: np.ndarray, move: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The encoded outputs [..., W] of the targets moved by `move` (targets [..., P] -> [..., P], e.g. a
        rotation): each plain target moved, each angle's (cos, sin) turned to its moved angle with its length
        kept (the length says how sure the network is of the direction), and so each polar direction, its log
        magnitude kept. float64 [..., W]."""
        encoded = np.asarray(encoded, np.float64)
        raw = encoded * self.std + self.mean if self.mean is not None else encoded
        unscaled = dataclasses.replace(self, mean=None, std=None, axis_ratios=())  # angles as unit (cos, sin)
        result = unscaled.encode(move(self.decode(encoded)))
        column = 0
        for kind, _, names in self._groups:
            if kind != "plain":
                direction = slice(column + 1, column + len(names)) if kind == "polar" else slice(column, column + 2)
                length = np.sqrt(np.sum(raw[..., direction] ** 2, axis=-1))
                result[..., direction] *= length[..., None]
                if kind == "polar":  # the magnitude moved with the direction's length: set it back
                    result[..., column] = raw[..., column]
            column += len(names)
        return (result - self.mean) / self.std if self.mean is not None else result

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "periods": list(self.periods),
            "mean": None if self.mean is None else self.mean.tolist(),
            "std": None if self.std is None else self.std.tolist(),
            "axis_ratios": [list(ratio) for ratio in self.axis_ratios],
            "polar": [list(pair) for pair in self.polar],
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
            tuple((a, b) for a, b in value.get("polar") or ()),
        )
