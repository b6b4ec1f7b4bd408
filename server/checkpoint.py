"""Round checkpoints: everything the server needs to resume a run after a crash.

After every completed round the ServerApp writes ``<run dir>/checkpoint.pkl`` atomically (a temp
file, fsync, rename): the round number, the global weights, the strategy object (FedAdam's
moments live there), the privacy state (accountants, receipts, the site-sampling RNG), the round
records so far and the run config. A crash leaves the previous round's checkpoint intact.

The file is the server's own state, read back only by the server that wrote it (pickle).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord

from fedgov.config import RunConfig, to_flower_config
from fedgov.errors import FedgovError
from fedgov.records import arrays_to_numpy, atomic_write_bytes, numpy_to_array_record

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT_VERSION = 1
# Keys that may differ between the interrupted run and its resumption.
RESUMABLE_DIFFERENCES = frozenset({"resume", "progress"})


@dataclass
class Checkpoint:
    """The server's state after ``completed_round`` rounds."""

    completed_round: int
    arrays: ArrayRecord
    strategy: Any
    privacy: Any
    records: list[Any]
    sites: dict[str, Any]
    run_id: str
    config: dict[str, bool | int | float | str]


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_FILE


def save_checkpoint(run_dir: str | Path, state: Checkpoint) -> Path:
    """Atomically replace the run's checkpoint with ``state``."""
    payload = {
        "format": FORMAT_VERSION,
        "completed_round": state.completed_round,
        "arrays": dict(arrays_to_numpy(state.arrays)),
        "strategy": state.strategy,
        "privacy": state.privacy,
        "records": state.records,
        "sites": state.sites,
        "run_id": state.run_id,
        "config": state.config,
    }
    path = checkpoint_path(run_dir)
    atomic_write_bytes(path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def _read_payload(run_dir: str | Path) -> dict[str, Any]:
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise FedgovError(f"resume: {path} does not exist (no round of this run completed)")
    try:
        payload = pickle.loads(path.read_bytes())
    except Exception as error:  # a truncated or foreign file: say so, do not guess
        raise FedgovError(f"resume: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise FedgovError(f"resume: {path} is not a fedgov checkpoint of format {FORMAT_VERSION}")
    return payload


def saved_run_config(run_dir: str | Path) -> dict[str, bool | int | float | str]:
    """The flat run config an interrupted run started with."""
    return _read_payload(run_dir)["config"]


def load_checkpoint(run_dir: str | Path, cfg: RunConfig) -> Checkpoint:
    """Read the run's checkpoint and check it belongs to this run config."""
    payload = _read_payload(run_dir)
    saved, now = payload["config"], to_flower_config(cfg)
    changed = sorted(
        k
        for k in set(saved) | set(now)
        if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now.get(k)
    )
    if changed:
        key = changed[0]
        raise FedgovError(
            f"resume: '{key}' was {saved.get(key)!r} in the interrupted run and is "
            f"{now.get(key)!r} now; a run resumes only with the config it started with"
        )
    return Checkpoint(
        completed_round=int(payload["completed_round"]),
        arrays=numpy_to_array_record(payload["arrays"]),
        strategy=payload["strategy"],
        privacy=payload["privacy"],
        records=payload["records"],
        sites=payload["sites"],
        run_id=str(payload["run_id"]),
        config=saved,
    )
