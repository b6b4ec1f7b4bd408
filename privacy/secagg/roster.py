"""The federation roster: which site id holds which long-term identity key, signed by governance.

SecAgg+ against a coordinator that substitutes keys (Bonawitz et al. 2017, §4 "malicious"
variant) needs the sites to know each other's identity keys from someone other than the
coordinator. Here that is governance:

- a **trust anchor** (``secagg_anchor.json`` in the site's ``site-dir``, installed by the site's
  operator, e.g. ``fedgov site init --governance-anchor FILE`` with the file governance gives
  out of band): the site's own id, the governance Ed25519 public keys and the quorum of them
  that must sign a roster;
- a **roster** (site id → the site's Ed25519 identity key, the key of ``site_key.pem`` that also
  signs its DP receipts, plus a version), signed by governance keys; the coordinator only
  distributes it (in the setup request). A site accepts a roster only with ``quorum`` valid
  signatures of distinct anchor keys, and never one older than the last it accepted.

Per round a site signs its key advertisement (round id, index, site id, both public keys) and,
with its masked input, a contribution statement (round id, index, global-model digest, run-config
digest), which the server checks before the input enters the sum; and, once the survivors are
known, a consistency statement (round id, index, survivor set, global-model digest, run-config
digest; Bonawitz et al. §6). Peers check the advert against the roster before sharing secrets,
and at least t consistency statements over the same tuple from their share group before
revealing any share (client.py). All signatures are Ed25519 over
domain-separated bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.receipts import canonical_json, public_key_bytes

ANCHOR_FILE = "secagg_anchor.json"
_ADVERT = b"fedgov-secagg/v1/key-advert"
_CONTRIBUTION = b"fedgov-secagg/v1/contribution"
_CONSISTENCY = b"fedgov-secagg/v1/consistency"
MAX_ROSTER_BYTES = 4 << 20  # a roster larger than this is refused unread


class RosterError(ValueError):
    """A roster, anchor or signature that does not verify; the message says which and why."""


@dataclass(frozen=True)
class TrustAnchor:
    """What a site trusts: its own id, the governance keys and how many must sign a roster."""

    site_id: str
    governance_keys: tuple[bytes, ...]
    quorum: int

    def to_json(self) -> dict[str, object]:
        return {
            "site_id": self.site_id,
            "governance_keys": [key.hex() for key in self.governance_keys],
            "quorum": self.quorum,
        }

    @classmethod
    def from_json(cls, data: object) -> TrustAnchor:
        if not isinstance(data, dict):
            raise RosterError("the trust anchor is not a JSON object")
        try:
            keys = tuple(bytes.fromhex(k) for k in data["governance_keys"])
            anchor = cls(str(data["site_id"]), keys, int(data["quorum"]))
        except (KeyError, TypeError, ValueError) as error:
            raise RosterError(f"unreadable trust anchor: {error!r}") from None
        if len(set(keys)) != len(keys) or any(len(k) != 32 for k in keys):
            raise RosterError("trust anchor: governance keys must be distinct 32-byte keys")
        if not 1 <= anchor.quorum <= len(keys):
            raise RosterError(f"trust anchor: quorum {anchor.quorum} of {len(keys)} keys")
        return anchor


def save_anchor(site_dir: str | Path, anchor: TrustAnchor) -> Path:
    """Write ``anchor`` atomically to ``site_dir/secagg_anchor.json``."""
    from fedgov.atomic import atomic_write_bytes

    TrustAnchor.from_json(anchor.to_json())  # refuse to install an unusable anchor
    path = Path(site_dir) / ANCHOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(anchor.to_json(), indent=2).encode())
    return path


def load_anchor(site_dir: str | Path | None) -> TrustAnchor | None:
    """The site's trust anchor, or None when it has none (no roster is then enforced)."""
    if not site_dir:
        return None
    path = Path(site_dir) / ANCHOR_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RosterError(f"{path}: unreadable trust anchor ({error})") from None
    return TrustAnchor.from_json(data)


def governance_anchor_json(governance_keys: tuple[bytes, ...], quorum: int) -> bytes:
    """The file governance hands every new site: its public keys and the quorum a roster needs
    (a trust anchor without the site's id)."""
    TrustAnchor.from_json(TrustAnchor("-", governance_keys, quorum).to_json())  # usable?
    return json.dumps(
        {"governance_keys": [key.hex() for key in governance_keys], "quorum": quorum}, indent=2
    ).encode()


def read_governance_anchor(path: str | Path, site_id: str) -> TrustAnchor:
    """The trust anchor of site ``site_id`` from governance's file (``governance_anchor_json``);
    :class:`RosterError` naming what is wrong with it."""
    try:
        text = Path(path).read_bytes()[:MAX_ROSTER_BYTES]
        data = json.loads(text)
    except (OSError, ValueError) as error:
        raise RosterError(f"{path}: unreadable governance anchor ({error})") from None
    if not isinstance(data, dict) or not {"governance_keys", "quorum"} <= set(data):
        raise RosterError(f"{path}: expected a JSON object with governance_keys and quorum")
    try:
        return TrustAnchor.from_json({**data, "site_id": site_id})
    except RosterError as error:
        raise RosterError(f"{path}: {error}") from None


@dataclass(frozen=True)
class Roster:
    """Site id → raw Ed25519 identity key, at a version (higher replaces lower)."""

    version: int
    sites: dict[str, bytes]

    def payload(self) -> bytes:
        return canonical_json(
            {"version": self.version, "sites": {s: k.hex() for s, k in sorted(self.sites.items())}}
        )


def sign_roster(roster: Roster, governance: list[Ed25519PrivateKey]) -> bytes:
    """The signed roster as distributed: JSON with the payload and one signature per key."""
    payload = roster.payload()
    signatures = [
        {"key": public_key_bytes(k).hex(), "signature": k.sign(payload).hex()} for k in governance
    ]
    return json.dumps({"roster": payload.decode(), "signatures": signatures}).encode()


def add_signatures(signed: bytes, governance: list[Ed25519PrivateKey]) -> bytes:
    """``signed`` with more governance signatures over the same payload (quorum by parts)."""
    document = json.loads(signed)
    payload = document["roster"].encode()
    for key in governance:
        document["signatures"].append(
            {"key": public_key_bytes(key).hex(), "signature": key.sign(payload).hex()}
        )
    return json.dumps(document).encode()


def verify_roster(signed: bytes, anchor: TrustAnchor, min_version: int = 0) -> Roster:
    """The roster ``signed`` holds, if ``anchor.quorum`` distinct anchor keys signed it and its
    version is at least ``min_version``; else :class:`RosterError`."""
    if not isinstance(signed, bytes) or not signed:
        raise RosterError("no roster: this site accepts only a governance-signed roster")
    if len(signed) > MAX_ROSTER_BYTES:
        raise RosterError(f"roster of {len(signed)} bytes, more than {MAX_ROSTER_BYTES}")
    try:
        document = json.loads(signed)
        payload = document["roster"].encode()
        entries = [
            (bytes.fromhex(s["key"]), bytes.fromhex(s["signature"])) for s in document["signatures"]
        ]
        body = json.loads(payload)
        roster = Roster(
            int(body["version"]), {str(s): bytes.fromhex(k) for s, k in body["sites"].items()}
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RosterError(f"unreadable roster: {error!r}"[:200]) from None
    if payload != roster.payload():
        raise RosterError("the roster payload is not in canonical form")
    trusted = set(anchor.governance_keys)
    valid = {key for key, sig in entries if key in trusted and _ok(key, sig, payload)}
    if len(valid) < anchor.quorum:
        raise RosterError(
            f"roster v{roster.version} carries {len(valid)} valid governance signature(s), "
            f"the trust anchor needs {anchor.quorum}"
        )
    if roster.version < min_version:
        raise RosterError(
            f"roster v{roster.version} is older than v{min_version}, the last this site accepted"
        )
    return roster


def advert_message(
    round_id: bytes, index: int, site_id: str, enc_key: bytes, mask_key: bytes
) -> bytes:
    """The bytes a site signs to advertise this round's public keys."""
    site = site_id.encode()
    return _ADVERT + round_id + struct.pack(">QI", index, len(site)) + site + enc_key + mask_key


def contribution_message(
    round_id: bytes, index: int, model_digest: bytes, config_digest: bytes
) -> bytes:
    """The bytes a site signs with its masked input: it took part in this round, with this
    global model and this run configuration."""
    return _CONTRIBUTION + round_id + struct.pack(">Q", index) + model_digest + config_digest


def consistency_message(
    round_id: bytes,
    index: int,
    survivors: Iterable[int],
    model_digest: bytes,
    config_digest: bytes,
) -> bytes:
    """The bytes a survivor signs in the consistency check: this round's survivor set (sorted
    indices), with this global model and this run configuration."""
    members = sorted(survivors)
    return (
        _CONSISTENCY
        + round_id
        + struct.pack(f">QI{len(members)}Q", index, len(members), *members)
        + model_digest
        + config_digest
    )


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    return isinstance(signature, bytes) and _ok(public_key, signature, message)


def model_digest(arrays: Iterable[tuple[str, np.ndarray]]) -> bytes:
    """SHA-256 of a model's arrays in record order: name, dtype, shape and bytes of each."""
    digest = hashlib.sha256(b"fedgov-secagg/v1/model")
    for name, array in arrays:
        array = np.ascontiguousarray(array)
        header = json.dumps([name, str(array.dtype), list(array.shape)]).encode()
        digest.update(struct.pack(">I", len(header)) + header)
        digest.update(memoryview(array.reshape(-1)).cast("B"))  # its bytes, not a copy of them
    return digest.digest()


def config_digest(config: Mapping[str, object]) -> bytes:
    """SHA-256 of a round's train configuration (sorted keys; bytes as hex)."""
    text = json.dumps(
        {k: config[k] for k in sorted(config)},
        sort_keys=True,
        separators=(",", ":"),
        default=lambda value: value.hex() if isinstance(value, bytes) else str(value),
    )
    return hashlib.sha256(b"fedgov-secagg/v1/config" + text.encode()).digest()


def roster_sites(signed: bytes) -> dict[str, bytes]:
    """The site → key map of a signed roster, unverified (the coordinator's own copy)."""
    try:
        body = json.loads(json.loads(signed)["roster"])
        return {str(s): bytes.fromhex(k) for s, k in body["sites"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise RosterError(f"unreadable roster: {error!r}"[:200]) from None


def _ok(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
