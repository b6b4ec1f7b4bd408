"""Model weights ↔ the flat vector SecAgg+ masks: which values, in which order.

The vector is every floating-point array of the global model's ArrayRecord, flattened in the
record's order (both sides hold that record, so both derive the same layout). Non-floating arrays
(integer buffers such as a batch-norm step counter) are not averaged: the global value is kept.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of a Flower :class:`Array`'s bytes (``Array.numpy()`` copies)."""
    if array.stype != "numpy.ndarray":
        return array.numpy()
    stream = io.BytesIO(array.data)
    version = np.lib.format.read_magic(stream)
    read_header = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("an array of Python objects")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def npy_array(values: np.ndarray) -> Array:
    """A Flower :class:`Array` of ``values`` (``numpy.ndarray`` bytes, as ``Array(values)``
    makes) with one copy of the data; ``Array(values)`` copies it twice via ``np.save``."""
    values = np.ascontiguousarray(values)
    if values.dtype.hasobject:
        raise ValueError(f"an array of dtype {values.dtype}")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header,
        {
            "descr": np.lib.format.dtype_to_descr(values.dtype),
            "fortran_order": False,
            "shape": values.shape,
        },
    )
    data = b"".join((header.getvalue(), memoryview(values).cast("B")))
    return Array(dtype=str(values.dtype), shape=values.shape, stype="numpy.ndarray", data=data)


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
        begin = 0
        for chunk in self.update_chunks(local, global_arrays):
            out[begin : begin + len(chunk)] = chunk
            begin += len(chunk)
        return out

    def update_chunks(
        self, local: ArrayRecord, global_arrays: ArrayRecord, chunk_values: int = 1 << 15
    ) -> Iterator[np.ndarray]:
        """local − global in float64 (exact for float32 weights), ``chunk_values`` at a time in
        vector order, read straight from the records' bytes: no whole copy of either model.

        Each chunk is a view of one reused buffer, valid until the next is asked for.
        """
        scratch = np.empty(min(chunk_values, max(self.length, 1)), dtype=np.float64)
        for segment in self.segments:
            if segment.name not in local:
                raise ValueError(f"the trained model has no array '{segment.name}'")
            trained = array_view(local[segment.name])
            if trained.shape != segment.shape:
                raise ValueError(
                    f"array '{segment.name}' has shape {trained.shape}, expected {segment.shape}"
                )
            trained = trained.reshape(-1)
            start = array_view(global_arrays[segment.name]).reshape(-1)
            for begin in range(0, len(trained), len(scratch)):
                stop = min(begin + len(scratch), len(trained))
                out = scratch[: stop - begin]
                np.subtract(trained[begin:stop], start[begin:stop], out=out, dtype=np.float64)
                yield out

    def apply(self, global_arrays: ArrayRecord, mean_update: np.ndarray) -> ArrayRecord:
        """global + mean update, each array back in its own dtype; other arrays unchanged."""
        by_name = {segment.name: segment for segment in self.segments}
        result: dict[str, Array] = {}
        for name, array in global_arrays.items():
            segment = by_name.get(name)
            if segment is None:
                result[name] = array  # unchanged (Arrays are immutable bytes)
                continue
            moved = array_view(array).astype(np.float64).ravel()
            moved += mean_update[segment.start : segment.stop]
            result[name] = npy_array(moved.reshape(segment.shape).astype(segment.dtype))
        return ArrayRecord(result)
