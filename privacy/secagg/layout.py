"""Model weights ↔ the flat vector SecAgg+ masks: which values, in which order.

The vector is every floating-point array of the global model's ArrayRecord, flattened in the
record's order (both sides hold that record, so both derive the same layout). Non-floating arrays
(integer buffers such as a batch-norm step counter) are not averaged: the global value is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class Segment:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int
    stop: int


@dataclass(frozen=True)
class VectorLayout:
    """Where each floating-point array of a model lives in the flat vector."""

    segments: tuple[Segment, ...]
    length: int

    @classmethod
    def of(cls, arrays: ArrayRecord) -> VectorLayout:
        segments, offset = [], 0
        for name, array in arrays.items():  # from the metadata: nothing is deserialised
            dtype, shape = np.dtype(array.dtype), tuple(array.shape)
            if not np.issubdtype(dtype, np.floating):
                continue
            size = int(np.prod(shape, dtype=np.int64))
            segments.append(Segment(name, shape, dtype, offset, offset + size))
            offset += size
        return cls(tuple(segments), offset)

    def update_vector(self, local: ArrayRecord, global_arrays: ArrayRecord) -> np.ndarray:
        """local − global as one float64 vector (raises ValueError on a mismatched model)."""
        out = np.empty(self.length, dtype=np.float64)
        for segment in self.segments:
            if segment.name not in local:
                raise ValueError(f"the trained model has no array '{segment.name}'")
            trained = local[segment.name].numpy()
            if trained.shape != segment.shape:
                raise ValueError(
                    f"array '{segment.name}' has shape {trained.shape}, expected {segment.shape}"
                )
            start = global_arrays[segment.name].numpy()
            np.subtract(
                trained.ravel(),
                start.ravel(),
                out=out[segment.start : segment.stop],
                dtype=np.float64,
            )
        return out

    def apply(self, global_arrays: ArrayRecord, mean_update: np.ndarray) -> ArrayRecord:
        """global + mean update, each array back in its own dtype; other arrays unchanged."""
        by_name = {segment.name: segment for segment in self.segments}
        result: dict[str, Array] = {}
        for name, array in global_arrays.items():
            values = array.numpy()
            segment = by_name.get(name)
            if segment is not None:
                moved = values.astype(np.float64).ravel()
                moved += mean_update[segment.start : segment.stop]
                values = moved.reshape(segment.shape).astype(segment.dtype)
            result[name] = Array(np.ascontiguousarray(values))
        return ArrayRecord(result)
