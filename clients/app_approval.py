"""Which app code a site runs: a digest over an app's files, the site's approvals and its log.

A Flower App Bundle (FAB) is a zip of the app's files (``pyproject.toml``, every ``.py``,
``.yaml``, ``.md``... of the project) plus Flower's ``.info/`` metadata. Its **app digest** is
SHA-256 over the sorted lines ``path NUL sha256(file) LF`` of every file except ``.info/``: it
names the app's content, independent of zip order, timestamps and compression, so a FAB built
anywhere from the same files has the same digest, and one byte changed anywhere changes it.

A site runs a task only when the task's FAB has an approved digest (:mod:`clients.app_guard`
checks it in the ClientApp process before Flower unpacks the FAB). ``fedgov site init`` approves
the app installed at the site; ``fedgov site apps approve|revoke`` change the set.

The site's app log (``apps/app_log.jsonl`` in the site folder) is the only place approvals live:
one JSON line per event (``approve``, ``revoke``, ``refuse``), each with a sequence number, the
SHA-256 of the previous line and an Ed25519 signature by the site's key (``site_key.pem``). The
approved set is the log replayed. A line edited, removed from the middle, reordered or signed by
another key makes the log unreadable (:class:`AppLogError`), and the site then refuses every app
(fail closed). A refused FAB's bytes are kept (``apps/fabs/<digest>.fab``, never unpacked) so the
operator can review it with ``fedgov site apps show`` before approving it.

Verification is cached per FAB: ``apps/verified/<sha256 of the FAB>`` holds the app digest of
that FAB (content-addressed, so it never goes stale); a task then hashes the FAB's bytes once
(~1 ms per MB) instead of unzipping it.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedgov.atomic import atomic_write_bytes
from fedgov.errors import FedgovError
from privacy.receipts import canonical_json, load_site_key, public_key_bytes

APPS_DIR = "apps"
LOG_FILE = "app_log.jsonl"
LOCK_FILE = ".app_log.lock"
FABS_DIR = "fabs"
VERIFIED_DIR = "verified"
METADATA_PREFIX = ".info/"
APPROVE, REVOKE, REFUSE = "approve", "revoke", "refuse"
EVENTS = (APPROVE, REVOKE, REFUSE)
#: The most bytes read from one FAB (Flower's own limit is 10 MB).
MAX_FAB_BYTES = 64 * 1024 * 1024
DIGEST_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class AppLogError(FedgovError):
    """The site's app log cannot be trusted (edited, reordered, another key's): run nothing."""


class AppRefused(FedgovError):
    """This site does not run this app; ``digest`` is the app's, ``site_id`` the site's."""

    def __init__(self, site_id: str, digest: str, why: str) -> None:
        super().__init__(
            f"site {site_id} refused app {digest}: {why} "
            f"(review: fedgov site apps show {digest[:16]})"
        )
        self.site_id = site_id
        self.digest = digest
        self.why = why


# ---- the digest (pure) -----------------------------------------------------------------------


def app_digest(files: Mapping[str, bytes]) -> str:
    """SHA-256 (hex) over the sorted ``path NUL sha256(content) LF`` lines of ``files``."""
    lines = b"".join(
        path.encode("utf-8") + b"\0" + hashlib.sha256(files[path]).hexdigest().encode() + b"\n"
        for path in sorted(files)
    )
    return hashlib.sha256(lines).hexdigest()


def fab_files(fab: bytes) -> dict[str, bytes]:
    """The app files a FAB holds (``.info/`` metadata left out); ValueError on a bad FAB."""
    if len(fab) > MAX_FAB_BYTES:
        raise ValueError(f"the FAB is {len(fab)} bytes, more than {MAX_FAB_BYTES}")
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            files: dict[str, bytes] = {}
            total = 0
            for info in archive.infolist():
                if info.is_dir() or info.filename.startswith(METADATA_PREFIX):
                    continue
                total += info.file_size
                if total > MAX_FAB_BYTES:
                    raise ValueError(f"the FAB unpacks to more than {MAX_FAB_BYTES} bytes")
                if info.filename in files:
                    raise ValueError(f"the FAB holds {info.filename} twice")
                files[info.filename] = archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"the FAB is not a readable zip ({error})") from None
    return files


def fab_app_digest(fab: bytes) -> str:
    """The app digest of a FAB's files."""
    return app_digest(fab_files(fab))


#: Top-level folders Flower's FAB rules exclude whole (``FAB_EXCLUDE_PATTERNS``): not walked.
EXCLUDED_TOP_FOLDERS = frozenset(
    {
        ".flwr",
        "build",
        "eggs",
        ".eggs",
        "lib",
        "lib64",
        "parts",
        ".venv",
        "env",
        "venv",
        "ENV",
        "env.bak",
        "venv.bak",
        ".git",
    }
)


def project_files(root: Path) -> dict[str, Path]:
    """Flower's ``collect_files`` (regular files inside ``root``, no symlinks), without walking
    folders whose every file Flower's FAB rules exclude anyway (a virtual environment: seconds)."""
    resolved = root.resolve()
    files: dict[str, Path] = {}
    for folder, subfolders, names in os.walk(resolved, followlinks=False):
        here = Path(folder)
        subfolders[:] = [
            name
            for name in subfolders
            if name != "__pycache__" and not (here == resolved and name in EXCLUDED_TOP_FOLDERS)
        ]
        for name in names:
            path = here / name
            if not path.is_symlink():
                files[path.relative_to(resolved).as_posix()] = path
    return files


def copy_project(root: Path, into: Path) -> Path:
    """``into`` holding a copy of :func:`project_files` of ``root`` (same relative paths and
    bytes), so that ``flwr run into`` builds byte for byte the FAB ``flwr run root`` builds,
    without walking the virtual environment inside ``root`` (Flower's ``collect_files`` resolves
    every one of its ~50,000 files: 4-12 s per ``flwr run`` on a 2-core machine)."""
    for relative, path in project_files(root).items():
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return into


def installed_app_fab() -> bytes:
    """The FAB Flower builds from the fedgov app installed here (``flwr run`` builds the same
    from the project folder), so its digest is the installed app's."""
    import warnings

    from flwr.cli.build import build_fab_from_files

    from fedgov.project import app_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pathspec's, inside Flower's build
        return build_fab_from_files(project_files(app_dir()))[0]


def diff_files(
    approved: Mapping[str, bytes], candidate: Mapping[str, bytes], max_lines: int = 200
) -> list[str]:
    """What ``candidate`` adds, removes and changes against ``approved``: summary lines, then a
    unified diff of each changed text file (at most ``max_lines`` lines in all)."""
    added = sorted(set(candidate) - set(approved))
    removed = sorted(set(approved) - set(candidate))
    changed = sorted(p for p in set(approved) & set(candidate) if approved[p] != candidate[p])
    lines = [f"+ {p}" for p in added] + [f"- {p}" for p in removed]
    lines += [f"~ {p}" for p in changed]
    for path in changed:
        try:
            before = approved[path].decode("utf-8").splitlines()
            after = candidate[path].decode("utf-8").splitlines()
        except UnicodeDecodeError:
            lines.append(f"  {path}: binary content differs")
            continue
        lines += difflib.unified_diff(before, after, f"approved/{path}", f"fab/{path}", lineterm="")
    if len(lines) > max_lines:
        lines = [*lines[:max_lines], f"... {len(lines) - max_lines} more lines"]
    return lines


# ---- the signed, append-only log ---------------------------------------------------------------


@dataclass(frozen=True)
class LogEntry:
    """One verified line of the app log."""

    seq: int
    event: str
    digest: str
    site: str
    at: float
    comment: str
    run: str
    line_sha256: str  # SHA-256 of the whole line: the next entry's ``prev``


class AppLog:
    """A site's app log (``<site_dir>/apps/app_log.jsonl``) and its stored FABs."""

    def __init__(self, site_dir: str | Path, site_id: str) -> None:
        self.site_dir = Path(site_dir)
        self.site_id = site_id
        self.folder = self.site_dir / APPS_DIR
        self.path = self.folder / LOG_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _key(self) -> Ed25519PrivateKey:
        try:
            return load_site_key(self.site_dir)
        except (OSError, ValueError) as error:
            raise AppLogError(
                f"site {self.site_id}: the site key in {self.site_dir} is unreadable ({error})"
            ) from None

    def entries(self, public_key: Ed25519PublicKey | None = None) -> list[LogEntry]:
        """Every entry, each checked: signature by the site key, sequence, chain to the previous."""
        if not self.path.exists():
            return []
        public_key = public_key or self._key().public_key()
        entries: list[LogEntry] = []
        previous = ""
        for number, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            where = f"{self.path} line {number}"
            try:
                line = json.loads(raw)
                body, signature = line["entry"], bytes.fromhex(line["signature"])
                public_key.verify(signature, canonical_json(body))
            except InvalidSignature:
                raise AppLogError(f"{where}: not signed by this site's key") from None
            except (ValueError, KeyError, TypeError) as error:
                raise AppLogError(f"{where}: unreadable ({error})") from None
            if body.get("seq") != len(entries) + 1 or body.get("prev") != previous:
                raise AppLogError(f"{where}: out of sequence (entries removed or reordered)")
            if body.get("event") not in EVENTS or not DIGEST_PATTERN.match(str(body.get("digest"))):
                raise AppLogError(f"{where}: unknown event or digest")
            previous = hashlib.sha256(raw).hexdigest()
            entries.append(
                LogEntry(
                    int(body["seq"]),
                    str(body["event"]),
                    str(body["digest"]),
                    str(body.get("site", "")),
                    float(body.get("at", 0.0)),
                    str(body.get("comment", "")),
                    str(body.get("run", "")),
                    previous,
                )
            )
        return entries

    def approved(self, entries: list[LogEntry] | None = None) -> dict[str, LogEntry]:
        """{digest: its approving entry} of the apps approved now (the log replayed)."""
        current: dict[str, LogEntry] = {}
        for entry in self.entries() if entries is None else entries:
            if entry.event == APPROVE:
                current[entry.digest] = entry
            elif entry.event == REVOKE:
                current.pop(entry.digest, None)
        return current

    def append(self, event: str, digest: str, comment: str = "", run: str = "") -> LogEntry:
        """Sign and append one entry (under the lock, after checking the whole log)."""
        if event not in EVENTS or not DIGEST_PATTERN.match(digest):
            raise ValueError(f"bad log entry: {event} {digest}")
        key = self._key()
        with self.locked():
            entries = self.entries(key.public_key())
            body = {
                "seq": len(entries) + 1,
                "prev": entries[-1].line_sha256 if entries else "",
                "at": round(time.time(), 3),
                "site": self.site_id,
                "event": event,
                "digest": digest,
                "comment": comment,
                "run": run,
                "public_key": public_key_bytes(key).hex(),
            }
            line = json.dumps(
                {"entry": body, "signature": key.sign(canonical_json(body)).hex()},
                sort_keys=True,
                separators=(",", ":"),
            ).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        return self.entries(key.public_key())[-1]

    # ---- stored FABs and the per-FAB cache ---------------------------------------------------
    def keep_fab(self, fab: bytes, digest: str) -> Path:
        """Keep a FAB's bytes for review (never unpacked)."""
        path = self.folder / FABS_DIR / f"{digest}.fab"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, fab)
        return path

    def stored_fab(self, digest_or_prefix: str) -> tuple[str, bytes] | None:
        """(digest, FAB bytes) of a kept FAB whose digest starts with the given hex."""
        prefix = digest_or_prefix.lower()
        found = sorted((self.folder / FABS_DIR).glob(f"{prefix}*.fab")) if prefix else []
        if len(found) != 1:
            return None
        return found[0].stem, found[0].read_bytes()

    def digest_of(self, fab: bytes) -> str:
        """The FAB's app digest, from the per-FAB cache when this FAB was seen before."""
        fab_sha256 = hashlib.sha256(fab).hexdigest()
        cached = self.folder / VERIFIED_DIR / fab_sha256
        with contextlib.suppress(OSError):
            digest = cached.read_text().strip()
            if DIGEST_PATTERN.match(digest):
                return digest
        digest = fab_app_digest(fab)
        with contextlib.suppress(OSError):
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cached, digest.encode())
        return digest


# ---- the check a task goes through ----------------------------------------------------------


def refuse_unapproved_app(site_dir: str | Path, site_id: str, fab: bytes, run: str = "") -> str:
    """The FAB's app digest when the site approved it; else log the refusal, keep the FAB for
    review and raise :class:`AppRefused` (also when the log cannot be trusted)."""
    log = AppLog(site_dir, site_id)
    try:
        digest = log.digest_of(fab)
    except ValueError as error:
        fab_sha256 = hashlib.sha256(fab).hexdigest()
        raise AppRefused(site_id, fab_sha256, f"unreadable FAB: {error}") from None
    try:
        entries = log.entries()
    except AppLogError as error:
        why = f"the site's app log cannot be trusted ({error})"
        raise AppRefused(site_id, digest, why) from None
    if digest in log.approved(entries):
        return digest
    log.keep_fab(fab, digest)
    refused_before = any(e.event == REFUSE and e.digest == digest and e.run == run for e in entries)
    if not refused_before:
        with contextlib.suppress(AppLogError, OSError):
            log.append(REFUSE, digest, run=run)
    raise AppRefused(site_id, digest, "not approved at this site")


def approve_installed_app(site_dir: str | Path, site_id: str, comment: str) -> str:
    """Approve the fedgov app installed here (``fedgov site init``); returns its digest."""
    fab = installed_app_fab()
    log = AppLog(site_dir, site_id)
    digest = fab_app_digest(fab)
    log.keep_fab(fab, digest)
    if digest not in log.approved():
        log.append(APPROVE, digest, comment=comment)
    return digest


def entry_as_dict(entry: LogEntry) -> dict[str, Any]:
    """A log entry as plain data (``fedgov site apps list --json``)."""
    return {
        "seq": entry.seq,
        "event": entry.event,
        "digest": entry.digest,
        "at": entry.at,
        "comment": entry.comment,
        "run": entry.run,
    }
