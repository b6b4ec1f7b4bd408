"""A site's privacy ledger: every sample-level spend the site has made, kept in its own directory.

The ledger is the site's, not the server's: it lives in the site's directory (node config
``site-dir``) next to its signing key, and the site checks it before every round. Rules:

- **Atomic**: every change rewrites ``privacy_ledger.json`` through a temporary file, ``fsync`` and
  ``os.replace`` (and an fsync of the folder), under an exclusive ``flock``; a crash leaves the old
  ledger or the new one, never a mix.
- **Write-ahead**: a spend is written as ``pending`` *before* training and becomes ``released`` with
  the receipt's signature just before the update leaves the site. A pending spend counts in ε like
  a released one, so a crash between training and reply never under-counts. A retry of the same
  (run, round, input weights) replaces its own pending entry instead of adding a second one (that
  attempt released nothing: ``released`` is written before any reply), so nothing is counted twice.
- **Retried releases**: a round asked again after its update left the site (the coordinator died
  before it used the reply and resumed from its last checkpoint) has the same (run, round, input
  weights) and the same ``release_sha256`` (every other input of the release: σ, q, steps, C,
  δ, the training settings, the model, the site's rows). The site trains it again with the same
  secret seeds (clients/site_privacy.py derives them from its key and ``release_sha256``), so it
  releases the same bits: the ledger keeps the one spend and records the update's SHA-256 to
  check it. If the retry's update differs (the same bits could not be reproduced), it is a new
  release and a new spend. A request for the round with any other input (another σ, clipping
  norm, learning rate...) is a new release: fresh seeds, a new spend.
- **Fail closed**: a ledger that is unreadable (bad JSON, wrong format, checksum mismatch, another
  site's or key's ledger) or missing while the site's key exists (the key proves the site was
  initialised, hence may have history) raises :class:`LedgerError`; the site then declines every
  round with that message until an operator restores the ledger. It never starts over at zero.

The file holds a SHA-256 checksum of its own canonical content (damage), an Ed25519 signature
by the site's key (``site_key.pem``) over it once the key exists (an edit with the checksum
recomputed: spends removed, ε lowered), and a sequence number ``seq`` that every write
increments. Beside it, ``privacy_ledger.journal`` is an append-only log: one line per write
(``seq``, the ledger's SHA-256, the previous line's SHA-256, signed). A ledger older than its
journal (a copy restored from an old backup: fewer spends) or one that does not match the
journal's entry for its ``seq`` is refused; the only way back is the explicit, journalled
``fedgov site ledger restore`` (:meth:`SiteLedger.restore`). Every receipt carries the ``seq``
and SHA-256 of the ledger state that reserved its spend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.accounting import HistoryEntry, epsilon, epsilon_after, normalise_history

LEDGER_FILE = "privacy_ledger.json"
JOURNAL_FILE = "privacy_ledger.journal"
LOCK_FILE = ".privacy_ledger.lock"
LEDGER_FORMAT = "fedgov-privacy-ledger"
LEDGER_VERSION = 2
PENDING, RELEASED = "pending", "released"


class LedgerError(Exception):
    """The ledger cannot be trusted (unreadable, missing with history, someone else's)."""


@dataclass
class Spend:
    """One round's DP-SGD at the site: what it spends and whether the update left the site."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    epsilon_after: float  # ε of the whole ledger once this spend is composed
    input_sha256: str  # the global weights trained from (identifies a retry of the same round)
    status: str = PENDING
    signature: str = ""  # the receipt's signature (hex) once released
    recorded_at: float = field(default_factory=time.time)
    update_sha256: str = ""  # the released update's hash (checks a retry released the same bits)
    # Everything the release depends on (clients/site_privacy.py: release_sha256): a retry is the
    # same release only with the same value; its DP randomness is derived from it.
    release_sha256: str = ""
    # The ledger write this spend was reserved against (its seq and SHA-256, in the journal):
    # the receipt names it, so a ledger rolled back behind it is provably older.
    ledger_seq: int = 0
    ledger_sha256: str = ""

    @property
    def entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class Decline:
    """A round the site refused, and why."""

    run_id: str
    round: int
    reason: str
    epsilon_spent: float
    cap: float
    recorded_at: float = field(default_factory=time.time)


@dataclass
class LedgerState:
    """The ledger's content."""

    site_id: str
    public_key: str = ""  # hex of the site's Ed25519 public key, bound at initialisation
    spends: list[Spend] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    seq: int = 0  # incremented by every write (the journal records each)
    prev_sha256: str = ""  # the digest of the state this one replaced
    signature: str = ""  # hex Ed25519 signature by the site's key over the body ("" before it)

    @property
    def sha256(self) -> str:
        """The digest of this state's signed body (receipts and the journal name it)."""
        return _checksum(self.body())

    def body(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "site_id": self.site_id,
            "public_key": self.public_key,
            "seq": self.seq,
            "prev_sha256": self.prev_sha256,
            "spends": [asdict(s) for s in self.spends],
            "declines": [asdict(d) for d in self.declines],
        }

    def history(self) -> list[HistoryEntry]:
        """Every spend (pending ones included) as Opacus accountant history."""
        return normalise_history(spend.entry for spend in self.spends)

    def to_json(self) -> dict[str, Any]:
        body = self.body()
        return {**body, "checksum": _checksum(body), "signature": self.signature}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> LedgerState:
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"privacy ledger {where} is not a fedgov ledger")
        if data.get("version") != LEDGER_VERSION:
            raise LedgerError(f"privacy ledger {where} has unknown version {data.get('version')}")
        body = {k: v for k, v in data.items() if k not in ("checksum", "signature")}
        if data.get("checksum") != _checksum(body):
            raise LedgerError(f"privacy ledger {where} fails its checksum (damaged or edited)")
        try:
            return cls(
                site_id=str(data["site_id"]),
                public_key=str(data["public_key"]),
                spends=[Spend(**s) for s in data["spends"]],
                declines=[Decline(**d) for d in data["declines"]],
                seq=int(data["seq"]),
                prev_sha256=str(data["prev_sha256"]),
                signature=str(data.get("signature", "")),
            )
        except (KeyError, TypeError) as error:
            raise LedgerError(f"privacy ledger {where} is malformed ({error})") from None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical(body)).hexdigest()


@dataclass(frozen=True)
class Reservation:
    """The outcome of :meth:`SiteLedger.reserve`: the pending spend (None when over the cap), the
    ε spent before it, the ε it would bring the site to, and the history behind the latter."""

    spend: Spend | None
    epsilon_spent: float
    epsilon_after: float
    history: list[HistoryEntry]  # the ledger's history (with the spend when reserved)
    # The ledger state this reservation left (or found, for a repeat): its seq and digest.
    ledger_seq: int = 0
    ledger_sha256: str = ""
    # True: ``spend`` is an already released spend of the same (run, round, input): a retry that
    # spends nothing new as long as it releases the same update (:meth:`SiteLedger.release_again`).
    repeat: bool = False
    # Why nothing was reserved when it is not the site's overall cap (e.g. its per-run limit).
    reason: str = ""


class SiteLedger:
    """The ledger file of one site directory; every method re-reads it under the lock."""

    def __init__(self, site_dir: str | Path, site_id: str, key_file: str) -> None:
        self.site_dir = Path(site_dir)
        self.site_id = site_id
        self.path = self.site_dir / LEDGER_FILE
        self._key_path = self.site_dir / key_file

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive access to the ledger across processes (an flock on a side file)."""
        self.site_dir.mkdir(parents=True, exist_ok=True)
        with open(self.site_dir / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> LedgerState:
        """The ledger's state; raises :class:`LedgerError` instead of ever starting over."""
        if not self.path.exists():
            if self._key_path.exists():
                raise LedgerError(
                    f"privacy ledger {self.path} is missing but the site's key exists, so the "
                    "site may have spent budget before; restore the ledger from a backup"
                )
            return LedgerState(site_id=self.site_id)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({error})") from None
        state = LedgerState.from_json(data, self.path)
        if state.site_id != self.site_id:
            raise LedgerError(
                f"privacy ledger {self.path} belongs to site '{state.site_id}', "
                f"not '{self.site_id}'"
            )
        self._check_signature(state)
        self._check_journal(state)
        return state

    # ---- the site key's signature and the journal -------------------------------------------
    def _key(self) -> Ed25519PrivateKey | None:
        """The site's key, once it exists (before ``open_site_state`` made it: None)."""
        if not self._key_path.exists():
            return None
        try:
            key = serialization.load_pem_private_key(self._key_path.read_bytes(), password=None)
        except (OSError, ValueError) as error:
            raise LedgerError(f"site key {self._key_path} is unreadable ({error})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"site key {self._key_path} is not an Ed25519 key")
        return key

    def _check_signature(self, state: LedgerState) -> None:
        key = self._key()
        if key is None:
            return  # not initialised yet: open_site_state refuses spends without a key
        if not state.signature and not state.public_key and not state.spends:
            return  # written empty just before the key was made, not yet bound to it
        try:
            key.public_key().verify(bytes.fromhex(state.signature), _canonical(state.body()))
        except (InvalidSignature, ValueError):
            raise LedgerError(
                f"privacy ledger {self.path} is not signed by this site's key (edited: spends "
                "removed or changed?)"
            ) from None

    def journal(self) -> list[dict[str, Any]]:
        """The journal's entries, each checked: chained to the one before, signed once keyed."""
        path = self.site_dir / JOURNAL_FILE
        if not path.exists():
            return []
        key = self._key()
        entries: list[dict[str, Any]] = []
        previous = ""
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = json.loads(raw)
                entry, signature = line["entry"], str(line.get("signature", ""))
                if key is not None and signature:
                    key.public_key().verify(bytes.fromhex(signature), _canonical(entry))
                elif key is not None and entries and entries[-1].get("signed"):
                    raise ValueError("unsigned after signed entries")
            except (InvalidSignature, ValueError, KeyError, TypeError) as error:
                raise LedgerError(
                    f"ledger journal {path} line {number} is not valid ({error})"
                ) from None
            if entry.get("prev") != previous or (entries and entry["seq"] <= entries[-1]["seq"]):
                raise LedgerError(f"ledger journal {path} line {number} is out of sequence")
            previous = hashlib.sha256(raw).hexdigest()
            entries.append({**entry, "signed": bool(signature), "line_sha256": previous})
        return entries

    def _check_journal(self, state: LedgerState) -> None:
        """The ledger must be the state the journal last recorded (or the write just after it)."""
        entries = self.journal()
        if not entries:
            if state.seq > 1:
                raise LedgerError(
                    f"privacy ledger {self.path} is at write {state.seq} but its journal "
                    f"{JOURNAL_FILE} is missing; restore both from the same backup"
                )
            return
        last = entries[-1]
        if state.seq == last["seq"] and state.sha256 == last["sha256"]:
            return
        if state.seq > last["seq"] and state.prev_sha256 == last["sha256"]:
            return  # written, then stopped before its journal line: the next write adds one
        if state.seq < last["seq"]:
            raise LedgerError(
                f"privacy ledger {self.path} is an older copy: it is at write {state.seq} but "
                f"its journal records write {last['seq']} (restored from an old backup?); "
                "restore explicitly with `fedgov site ledger restore`"
            )
        raise LedgerError(
            f"privacy ledger {self.path} does not match its journal at write {state.seq} "
            "(replaced or edited?)"
        )

    def _append_journal(self, entry: dict[str, Any], key: Ed25519PrivateKey | None) -> None:
        entries = self.journal()
        body = {
            **entry,
            "prev": entries[-1]["line_sha256"] if entries else "",
            "at": round(time.time(), 3),
        }
        line = {"entry": body, "signature": key.sign(_canonical(body)).hex() if key else ""}
        fd = os.open(self.site_dir / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, json.dumps(line, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def write(self, state: LedgerState, event: str = "write", reason: str = "") -> None:
        """Atomically replace the ledger (temporary file, fsync, rename, fsync of the folder) as
        the next write: ``seq`` + 1, signed with the site's key, then journalled."""
        from fedgov.atomic import atomic_write_bytes

        entries = self.journal()
        on_disk: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            on_disk = json.loads(self.path.read_text(encoding="utf-8"))
        on_disk = on_disk if isinstance(on_disk, dict) else {}
        seqs = [state.seq, entries[-1]["seq"] if entries else 0]
        if isinstance(on_disk.get("seq"), int):
            seqs.append(on_disk["seq"])
        state.seq = max(seqs) + 1
        state.prev_sha256 = str(on_disk.get("checksum", ""))  # the digest of the state replaced
        key = self._key()
        state.signature = key.sign(_canonical(state.body())).hex() if key else ""
        payload = json.dumps(state.to_json(), indent=1, allow_nan=False) + "\n"
        atomic_write_bytes(self.path, payload.encode("utf-8"))
        directory = os.open(self.site_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        journal = {"seq": state.seq, "sha256": state.sha256, "event": event, "reason": reason}
        self._append_journal(journal, key)

    def restore(self, backup: str | Path, reason: str) -> LedgerState:
        """Make a backup copy of this site's ledger the current one, explicitly: it must be this
        site's, signed by its key; it becomes the next write, journalled as a restore."""
        backup = Path(backup)
        try:
            data = json.loads(backup.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerError(f"ledger backup {backup} is unreadable ({error})") from None
        restored = LedgerState.from_json(data, backup)
        if restored.site_id != self.site_id:
            raise LedgerError(f"ledger backup {backup} belongs to site '{restored.site_id}'")
        self._check_signature(restored)
        if not reason.strip():
            raise LedgerError("a restore needs a reason (it is kept in the ledger's journal)")
        with self.locked():
            from_seq = restored.seq
            self.write(restored, event="restore", reason=f"from write {from_seq}: {reason}")
        return restored

    def reserve(self, spend: Spend, cap: float, run_cap: float | None = None) -> Reservation:
        """Check ``spend`` against ``cap`` and, if it fits, write it as pending — one locked step.

        ``spend.epsilon_after`` is recomputed here from the ledger's own history (a pending entry
        of the same attempt is replaced, not added to). Over the cap, the decline is recorded and
        nothing is reserved.
        """
        with self.locked():
            state = self.read()
            spend.ledger_seq, spend.ledger_sha256 = state.seq, (state.sha256 if state.seq else "")
            state.spends = [s for s in state.spends if not _same_attempt(s, spend)]
            history = state.history()
            spent = epsilon(history, spend.delta, spend.accountant)
            released = _released_before(state, spend)
            if released is not None:  # a retry of a release: nothing new unless the bits differ
                return _repeat(state, released, spent)
            return self._reserve_new(state, spend, spent, cap, run_cap)

    def release(self, spend: Spend, signature: str, update_sha256: str = "") -> None:
        """Mark ``spend`` released with its receipt's signature (before the reply leaves)."""
        with self.locked():
            state = self.read()
            for entry in state.spends:
                if _same_attempt(entry, spend) and entry.recorded_at == spend.recorded_at:
                    entry.status, entry.signature = RELEASED, signature
                    entry.update_sha256 = update_sha256
                    spend.status, spend.signature = RELEASED, signature
                    spend.update_sha256 = update_sha256
                    break
            else:
                raise LedgerError(
                    f"privacy ledger {self.path} lost the pending spend of round {spend.round}"
                )
            self.write(state)

    def release_again(
        self, released: Spend, update_sha256: str, cap: float, run_cap: float | None = None
    ) -> Reservation:
        """A retried round (``reserve`` returned ``repeat``) is about to release ``update_sha256``.

        The same bits as ``released``: nothing new is spent (``repeat`` again, with that spend and
        the history at its release, for the same receipt). Other bits: a new pending spend,
        checked against ``cap`` like any other (``spend`` None and a decline when over it).
        """
        with self.locked():
            state = self.read()
            history = state.history()
            spent = epsilon(history, released.delta, released.accountant)
            if update_sha256 and update_sha256 == released.update_sha256:
                return _repeat(state, released, spent)
            fresh = dataclasses.replace(
                released,
                status=PENDING,
                signature="",
                update_sha256="",
                recorded_at=time.time(),
                ledger_seq=state.seq,
                ledger_sha256=state.sha256,
            )
            return self._reserve_new(state, fresh, spent, cap, run_cap)

    def _reserve_new(
        self,
        state: LedgerState,
        spend: Spend,
        spent: float,
        cap: float,
        run_cap: float | None = None,
    ) -> Reservation:
        """Write ``spend`` ahead as pending, or a decline when it would take ε (``spent`` now)
        above ``cap`` or the run's own ε above ``run_cap`` (the site's per-run limit); the caller
        holds the lock and read ``state``."""
        history = state.history()
        spend.epsilon_after = epsilon_after(history, spend.entry, spend.delta, spend.accountant)
        if run_cap is not None:
            run_history = [s.entry for s in state.spends if s.run_id == spend.run_id]
            run_after = epsilon_after(run_history, spend.entry, spend.delta, spend.accountant)
            if run_after > run_cap:
                reason = f"max_epsilon_per_run: run {spend.run_id} would reach ε = {run_after:.4g}"
                state.declines.append(Decline(spend.run_id, spend.round, reason, spent, run_cap))
                self.write(state)
                return Reservation(
                    None, spent, run_after, history, state.seq, state.sha256, reason=reason
                )
        if spend.epsilon_after > cap:
            state.declines.append(
                Decline(spend.run_id, spend.round, "privacy budget exhausted", spent, cap)
            )
            self.write(state)
            return Reservation(None, spent, spend.epsilon_after, history, state.seq, state.sha256)
        state.spends.append(spend)
        self.write(state)
        return Reservation(
            spend, spent, spend.epsilon_after, state.history(), state.seq, state.sha256
        )


def _released_before(state: LedgerState, new: Spend) -> Spend | None:
    """The latest released spend of the same run, round and input as ``new``, if any."""
    for existing in reversed(state.spends):
        if (
            existing.status == RELEASED
            and _same_round(existing, new)
            and (existing.entry, existing.delta, existing.accountant)
            == (new.entry, new.delta, new.accountant)
        ):
            return existing
    return None


def _repeat(state: LedgerState, released: Spend, spent: float) -> Reservation:
    """A retry of ``released``: nothing new spent; the history its receipt stated."""
    return Reservation(
        released,
        spent,
        released.epsilon_after,
        _history_until(state, released),
        state.seq,
        state.sha256,
        repeat=True,
    )


def _history_until(state: LedgerState, spend: Spend) -> list[HistoryEntry]:
    """The ledger's history up to and including ``spend`` (what its receipt stated)."""
    index = next(
        i
        for i, s in enumerate(state.spends)
        if s.recorded_at == spend.recorded_at
        and s.round == spend.round
        and s.run_id == spend.run_id
    )
    return normalise_history(s.entry for s in state.spends[: index + 1])


def _same_attempt(existing: Spend, new: Spend) -> bool:
    """A pending spend of the same run, round and input: a retry after a crash, never released."""
    return existing.status == PENDING and _same_round(existing, new)


def _same_round(existing: Spend, new: Spend) -> bool:
    """The same run, round, input weights and every other input of the release: the same round
    asked again, byte for byte (any other request for the round is a new release)."""
    return (
        existing.run_id == new.run_id
        and existing.round == new.round
        and existing.input_sha256 == new.input_sha256
        and existing.release_sha256 == new.release_sha256
    )
