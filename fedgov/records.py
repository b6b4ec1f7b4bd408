"""Weights across the wire and on disk: Flower ArrayRecords and safetensors files."""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save_file

# Callers that already hold torch and Flower import these from here too.
from fedgov.atomic import atomic_write_bytes as atomic_write_bytes
from fedgov.atomic import atomic_write_json as atomic_write_json


def load_array_record(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load weights from the server into ``model`` (strict: names and shapes must match)."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def arrays_to_numpy(arrays: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """Name → numpy array, in the record's order."""
    return OrderedDict((name, array.numpy()) for name, array in arrays.items())


def numpy_to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Name → numpy array (in order) as an ArrayRecord: the inverse of ``arrays_to_numpy``."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def save_safetensors(
    path: str | Path, arrays: ArrayRecord, metadata: dict[str, str] | None = None
) -> None:
    """Atomically save weights as a safetensors file (tensor names = state-dict keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.ascontiguousarray(a) for name, a in arrays_to_numpy(arrays).items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Load a safetensors weights file as name → numpy array."""
    return load_file(str(path))
