"""Turning ``POST /v1/predict`` instances into model inputs, as training saw them (pure).

Tabular instances are rows of raw feature values, either a list in the schema's feature order or an
object keyed by feature name; each is normalised with the published constants exactly as
``fedgov.datasets.normalise_frame`` does (float64: log1p where set, minus mean, over std; then
float32), so a served row and a training row give the model identical bits. Image instances are
pixel arrays in [0, 1] of the manifest's shape (or its H×W, or flat), normalised with the
published mean and std. Values that are finite as given but overflow after normalisation or
the float32 conversion are refused like any other bad value. Messages name the instance and the
feature but never repeat the input's values (:func:`bounded` caps their length).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_MESSAGE = 300  # characters of an error message, at most
FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputError(ValueError):
    """An instance does not fit the input schema; the message names the instance and field."""


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` on one line, at most ``limit`` characters, control characters escaped."""
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class InputSpec:
    """What one instance must look like, and how it is normalised."""

    kind: str  # "tabular" | "image"
    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()
    feature_dtypes: tuple[str, ...] = ()
    means: tuple[float, ...] = ()
    stds: tuple[float, ...] = ()
    log1p: tuple[bool, ...] = ()
    pixel_mean: float = 0.0
    pixel_std: float = 1.0

    @classmethod
    def from_manifest(cls, input_schema: Mapping[str, Any]) -> InputSpec:
        shape = tuple(int(d) for d in input_schema["input_shape"])
        if input_schema["kind"] == "tabular":
            features = input_schema["features"]
            return cls(
                "tabular",
                shape,
                tuple(f["name"] for f in features),
                tuple(f["dtype"] for f in features),
                tuple(float(f["mean"]) for f in features),
                tuple(float(f["std"]) for f in features),
                tuple(bool(f["log1p"]) for f in features),
            )
        pre = input_schema["preprocessing"]
        return cls("image", shape, pixel_mean=float(pre["mean"]), pixel_std=float(pre["std"]))

    def describe(self) -> dict[str, Any]:
        """The expected instance format, for ``GET /v1/model``."""
        if self.kind == "tabular":
            return {
                "kind": "tabular",
                "instance": "a list of the feature values in this order, or an object by name",
                "features": [
                    {"name": n, "dtype": d}
                    for n, d in zip(self.feature_names, self.feature_dtypes, strict=True)
                ],
            }
        return {
            "kind": "image",
            "instance": f"pixels in [0, 1], nested lists of shape {list(self.input_shape)}",
            "input_shape": list(self.input_shape),
        }

    def prepare(self, instances: Sequence[Any]) -> np.ndarray:
        """The normalised float32 batch for ``instances``; InputError names the first bad one."""
        if not instances:
            raise InputError("instances: expected at least one instance")
        if self.kind == "tabular":
            rows = np.array([self._row(i, inst) for i, inst in enumerate(instances)], np.float64)
            for j, transformed in enumerate(self.log1p):
                if transformed:
                    bad = np.flatnonzero(rows[:, j] <= -1)
                    if bad.size:
                        raise InputError(
                            f"instances[{int(bad[0])}]: feature '{self.feature_names[j]}' "
                            "must be > -1 (it is log1p-transformed)"
                        )
                    rows[:, j] = np.log1p(rows[:, j])
            means = np.asarray(self.means, np.float64)
            stds = np.asarray(self.stds, np.float64)
            # Column by column, as normalise_frame computes it: identical float64 results.
            columns = [(rows[:, j] - means[j]) / stds[j] for j in range(rows.shape[1])]
            normalised = np.stack(columns, axis=1)
            overflow = ~(np.abs(normalised) <= FLOAT32_MAX)  # also catches inf and NaN
            if overflow.any():
                i, j = (int(k) for k in np.argwhere(overflow)[0])
                raise InputError(
                    f"instances[{i}]: feature '{self.feature_names[j]}' is out of range: it "
                    "overflows float32 after normalisation"
                )
            return normalised.astype(np.float32)
        images = np.stack([self._image(i, inst) for i, inst in enumerate(instances)])
        return ((images - self.pixel_mean) / self.pixel_std).astype(np.float32)

    def _row(self, index: int, instance: Any) -> list[float]:
        where = f"instances[{index}]"
        count = len(self.feature_names)
        if isinstance(instance, Mapping):
            missing = [n for n in self.feature_names if n not in instance]
            extra = [k for k in instance if k not in self.feature_names]
            if missing or extra:
                parts = []
                if missing:
                    parts.append("missing feature " + ", ".join(f"'{n}'" for n in missing))
                if extra:
                    parts.append(f"{len(extra)} unknown feature name(s)")
                raise InputError(f"{where}: {'; '.join(parts)}")
            values = [instance[n] for n in self.feature_names]
        elif isinstance(instance, list | tuple):
            if len(instance) != count:
                raise InputError(
                    f"{where}: expected {count} feature values "
                    f"({', '.join(self.feature_names)}), got {len(instance)}"
                )
            values = list(instance)
        else:
            raise InputError(
                f"{where}: expected a list of {count} numbers or an object keyed by feature name, "
                f"got {type(instance).__name__}"
            )
        out = []
        for name, dtype, value in zip(self.feature_names, self.feature_dtypes, values, strict=True):
            out.append(_number(f"{where}: feature '{name}'", value, whole=dtype == "int"))
        return out

    def _image(self, index: int, instance: Any) -> np.ndarray:
        where = f"instances[{index}]"
        try:
            array = np.asarray(instance, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise InputError(f"{where}: expected nested lists of numbers (pixels)") from None
        if array.dtype == object or not np.all(np.isfinite(array)):
            raise InputError(f"{where}: expected finite numbers (pixels in [0, 1])")
        if isinstance(instance, list) and _has_bool(instance):
            raise InputError(f"{where}: expected numbers, got a boolean")
        size = math.prod(self.input_shape)
        if array.size != size or array.shape not in (
            self.input_shape,
            self.input_shape[1:],
            (size,),
        ):
            raise InputError(
                f"{where}: expected an image of shape {list(self.input_shape)} (or "
                f"{list(self.input_shape[1:])}, or {size} values), got shape {list(array.shape)}"
            )
        if array.min() < 0 or array.max() > 1:
            raise InputError(f"{where}: pixels must lie in [0, 1]")
        return array.reshape(self.input_shape)


def _number(where: str, value: Any, whole: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"{where}: expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        raise InputError(f"{where}: out of range (beyond float64)") from None
    if not math.isfinite(number):
        raise InputError(f"{where}: expected a finite number")
    if whole and not number.is_integer():
        raise InputError(f"{where}: expected a whole number")
    return number


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, list):
        return any(_has_bool(v) for v in value)
    return False
