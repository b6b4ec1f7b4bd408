"""SecAgg+ on the wire: every stage's request and reply as Flower records, with documented keys.

Message types (``<category>.<action>``, routed by the ClientApp): ``train.secagg_setup``,
``train.secagg_share_keys``, ``train.secagg_masked_input``, ``train.secagg_consistency``,
``train.secagg_unmask``.

Every request and reply carries the ConfigRecord ``SECAGG`` (``"secagg"``) with the header
``stage`` (str), ``round-id`` (16 bytes, fresh per round) and, in replies, ``index`` (the site's
index in the round). The rest of ``SECAGG`` by stage:

- setup request: ``server-round``, ``num-sites``, ``threshold``, ``weight-scale`` (int),
  ``neighbours`` (list[int]), ``roster`` (bytes: the governance-signed roster, empty without);
  reply: ``enc-key``, ``mask-key`` (32-byte X25519 public keys), ``commitment`` (32 bytes),
  ``site-id`` (str) and ``signature`` (bytes, Ed25519 over the advert; both empty without roster).
- share_keys request: ``peers`` (list[int]), ``peer-enc-keys``, ``peer-mask-keys``,
  ``peer-signatures`` (list[bytes]), ``peer-site-ids`` (list[str]);
  reply: ``recipients`` (list[int]) and ``ciphertexts`` (list[bytes], AES-GCM, one per recipient).
- masked_input request: ``senders`` (list[int]), ``ciphertexts`` (list[bytes]); the message also
  holds the strategy's ``arrays`` (global weights) and ``config`` records, as a plain train message.
  Reply: ``weight`` (int), ``clipped`` (int), ``bad-senders`` (list[int]), ``bad-reasons``
  (list[str]), ``accusation-proof`` (bytes: the site's share-encryption private key of the
  round when it accuses a sender, else empty), ``contribution`` (bytes: its signed contribution
  statement, empty without a roster); the ArrayRecord ``MASKED`` (``"secagg-masked"``)
  with the one array ``"masked"`` (uint32 or uint64, the model's floating-point values flattened
  in record order); the MetricRecord ``metrics`` (the site's train metrics) and the ConfigRecord
  ``site``.
  A site that declines sends ``decline`` (see fedgov.messages) instead of the input.
- consistency request (to each survivor): ``survivors`` (list[int], U3); reply: ``signature``
  (bytes: Ed25519 over roster.consistency_message, empty without a roster).
- unmask request: ``survivors``, ``dropped`` (list[int]), ``survivor-signatures`` (list[bytes],
  one per survivor: its consistency signature, empty for one that did not sign); reply:
  ``seed-share-owners``, ``key-share-owners`` (list[int]), ``seed-shares``, ``key-shares``
  (list[bytes], 66 bytes each).
- pipelining: a masked_input request may also carry the ConfigRecord ``NEXT``
  (``"secagg-next"``), the setup request of the site's next round, and a consistency request
  the next round's share_keys request; the reply then carries the next round's advert or
  ciphertexts (or refusal) under ``NEXT`` too. The two halves are independent: each is parsed,
  refused and checked on its own.
- abort notice (``train.secagg_abort``, after an aborted round): ``reason`` (str); reply: the
  header only, once the site has wiped the round's secrets.

A site that refuses a request replies with the header and ``refused`` (str, the reason).
Parsing never trusts a reply: anything missing, mistyped or from another round or stage raises
:class:`MalformedReply`, which the server records as that site's dropout reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from privacy.secagg.layout import array_view, npy_array
from privacy.secagg.protocol import (
    ABORT,
    CONSISTENCY,
    MASKED_INPUT,
    SETUP,
    SHARE_KEYS,
    UNMASK,
    ConsistencyRequest,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)

SECAGG = "secagg"
MASKED = "secagg-masked"
NEXT = "secagg-next"  # the next round's key stage, riding on this round's message
MASKED_ARRAY = "masked"
STATE = "secagg-state"  # the site's per-round secrets in context.state: the current round
STATE_NEXT = "secagg-state-next"  # the next round, set up ahead while the current one runs

MESSAGE_TYPES = {
    SETUP: "train.secagg_setup",
    SHARE_KEYS: "train.secagg_share_keys",
    MASKED_INPUT: "train.secagg_masked_input",
    CONSISTENCY: "train.secagg_consistency",
    UNMASK: "train.secagg_unmask",
    ABORT: "train.secagg_abort",
}
ACTIONS = {stage: message_type.split(".", 1)[1] for stage, message_type in MESSAGE_TYPES.items()}


class MalformedReply(ValueError):
    """A reply (or request) that does not follow the protocol; the message says how."""


class SiteRefused(MalformedReply):
    """The site refused the request; the message is its reason."""


# ---- requests (server → site) --------------------------------------------------------------------
def setup_request_record(request: SetupRequest) -> ConfigRecord:
    return ConfigRecord(
        {
            **_header(SETUP, request.round_id),
            "server-round": request.server_round,
            "index": request.index,
            "num-sites": request.num_sites,
            "threshold": request.threshold,
            "neighbours": list(request.neighbours),
            "weight-scale": request.weight_scale,
            "roster": request.roster,
        }
    )


def parse_setup_request(content: RecordDict) -> SetupRequest:
    record = _secagg(content, SETUP)
    return SetupRequest(
        round_id=_bytes(record, "round-id"),
        server_round=_int(record, "server-round"),
        index=_int(record, "index"),
        num_sites=_int(record, "num-sites"),
        threshold=_int(record, "threshold"),
        neighbours=tuple(_ints(record, "neighbours")),
        weight_scale=_int(record, "weight-scale"),
        roster=_bytes(record, "roster"),
    )


def share_keys_request_record(request: ShareKeysRequest) -> ConfigRecord:
    peers = sorted(request.peers)
    return ConfigRecord(
        {
            **_header(SHARE_KEYS, request.round_id),
            "peers": peers,
            "peer-enc-keys": [request.peers[p].enc_key for p in peers],
            "peer-mask-keys": [request.peers[p].mask_key for p in peers],
            "peer-signatures": [request.peers[p].signature for p in peers],
            "peer-site-ids": [request.peers[p].site_id for p in peers],
        }
    )


def parse_share_keys_request(content: RecordDict) -> ShareKeysRequest:
    record = _secagg(content, SHARE_KEYS)
    peers = _zip(
        _ints(record, "peers"),
        _bytes_list(record, "peer-enc-keys"),
        _bytes_list(record, "peer-mask-keys"),
        _bytes_list(record, "peer-signatures"),
        _strs(record, "peer-site-ids"),
    )
    return ShareKeysRequest(
        round_id=_bytes(record, "round-id"),
        peers={p: KeyAdvert(enc, mask, b"", site, sig) for p, enc, mask, sig, site in peers},
    )


def masked_input_request_record(request: MaskedInputRequest) -> ConfigRecord:
    senders = sorted(request.shares)
    return ConfigRecord(
        {
            **_header(MASKED_INPUT, request.round_id),
            "senders": senders,
            "ciphertexts": [request.shares[s] for s in senders],
            "expected": list(request.expected),
        }
    )


def parse_masked_input_request(content: RecordDict) -> MaskedInputRequest:
    record = _secagg(content, MASKED_INPUT)
    pairs = _zip(_ints(record, "senders"), _bytes_list(record, "ciphertexts"))
    expected = _ints(record, "expected") if "expected" in record else []
    if len(set(expected)) != len(expected):
        raise MalformedReply("a site expected twice")
    return MaskedInputRequest(
        round_id=_bytes(record, "round-id"), shares=dict(pairs), expected=tuple(expected)
    )


def consistency_request_record(request: ConsistencyRequest) -> ConfigRecord:
    return ConfigRecord(
        {**_header(CONSISTENCY, request.round_id), "survivors": list(request.survivors)}
    )


def parse_consistency_request(content: RecordDict) -> ConsistencyRequest:
    record = _secagg(content, CONSISTENCY)
    survivors = _ints(record, "survivors")
    if len(set(survivors)) != len(survivors):
        raise MalformedReply("a survivor listed twice")
    return ConsistencyRequest(round_id=_bytes(record, "round-id"), survivors=tuple(survivors))


def unmask_request_record(request: UnmaskRequest) -> ConfigRecord:
    return ConfigRecord(
        {
            **_header(UNMASK, request.round_id),
            "survivors": list(request.survivors),
            "dropped": list(request.dropped),
            "survivor-signatures": [request.signatures.get(i, b"") for i in request.survivors],
        }
    )


def parse_unmask_request(content: RecordDict) -> UnmaskRequest:
    record = _secagg(content, UNMASK)
    survivors = _zip(_ints(record, "survivors"), _bytes_list(record, "survivor-signatures"))
    return UnmaskRequest(
        round_id=_bytes(record, "round-id"),
        survivors=tuple(i for i, _ in survivors),
        dropped=tuple(_ints(record, "dropped")),
        signatures=dict(survivors),
    )


def abort_record(round_id: bytes, reason: str) -> ConfigRecord:
    return ConfigRecord({**_header(ABORT, round_id), "reason": reason})


def parse_abort(content: RecordDict) -> tuple[bytes, str]:
    record = _secagg(content, ABORT)
    return _bytes(record, "round-id"), str(_value(record, "reason"))


def request_round_id(content: RecordDict) -> bytes:
    """The round id a request carries (for refusal replies to malformed requests)."""
    record = content.config_records.get(SECAGG)
    value = record.get("round-id") if record is not None else None
    return value if isinstance(value, bytes) else b""


# ---- replies (site → server) ---------------------------------------------------------------------
def reply_header(stage: str, round_id: bytes, index: int) -> dict[str, Any]:
    return {**_header(stage, round_id), "index": index}


def refusal_record(stage: str, round_id: bytes, index: int, reason: str) -> ConfigRecord:
    return ConfigRecord({**reply_header(stage, round_id, index), "refused": reason})


def advert_record(round_id: bytes, index: int, advert: KeyAdvert) -> ConfigRecord:
    return ConfigRecord(
        {
            **reply_header(SETUP, round_id, index),
            "enc-key": advert.enc_key,
            "mask-key": advert.mask_key,
            "commitment": advert.commitment,
            "site-id": advert.site_id,
            "signature": advert.signature,
        }
    )


def parse_advert(content: RecordDict, round_id: bytes, index: int) -> KeyAdvert:
    record = _reply(content, SETUP, round_id, index)
    return KeyAdvert(
        enc_key=_bytes(record, "enc-key"),
        mask_key=_bytes(record, "mask-key"),
        commitment=_bytes(record, "commitment"),
        site_id=_str(record, "site-id"),
        signature=_bytes(record, "signature"),
    )


def ciphertexts_record(round_id: bytes, index: int, ciphertexts: dict[int, bytes]) -> ConfigRecord:
    recipients = sorted(ciphertexts)
    return ConfigRecord(
        {
            **reply_header(SHARE_KEYS, round_id, index),
            "recipients": recipients,
            "ciphertexts": [ciphertexts[r] for r in recipients],
        }
    )


def parse_ciphertexts(content: RecordDict, round_id: bytes, index: int) -> dict[int, bytes]:
    record = _reply(content, SHARE_KEYS, round_id, index)
    pairs = _zip(_ints(record, "recipients"), _bytes_list(record, "ciphertexts"))
    recipients = [r for r, _ in pairs]
    if len(set(recipients)) != len(recipients):
        raise MalformedReply("the same recipient twice in the encrypted shares")
    return dict(pairs)


def masked_input_records(
    round_id: bytes, index: int, masked: MaskedInput
) -> tuple[ConfigRecord, ArrayRecord]:
    bad = sorted(masked.bad_shares)
    config = ConfigRecord(
        {
            **reply_header(MASKED_INPUT, round_id, index),
            "weight": masked.weight,
            "clipped": masked.clipped,
            "bad-senders": bad,
            "bad-reasons": [masked.bad_shares[s] for s in bad],
            "accusation-proof": masked.proof,
            "contribution": masked.contribution,
            "early-signature": masked.early_signature,
        }
    )
    arrays = ArrayRecord({MASKED_ARRAY: npy_array(masked.vector)})
    return config, arrays


def parse_masked_input(content: RecordDict, round_id: bytes, index: int) -> MaskedInput:
    record = _reply(content, MASKED_INPUT, round_id, index)
    arrays = content.array_records.get(MASKED)
    if arrays is None or list(arrays.keys()) != [MASKED_ARRAY]:
        raise MalformedReply(f"no '{MASKED}' record holding exactly one '{MASKED_ARRAY}' array")
    try:
        vector = array_view(arrays[MASKED_ARRAY])  # its bytes, not a copy (read-only)
    except Exception as error:  # a corrupt or non-numpy payload
        raise MalformedReply(f"unreadable masked input: {error}") from None
    bad = _zip(_ints(record, "bad-senders"), _strs(record, "bad-reasons"))
    return MaskedInput(
        vector=vector,
        weight=_int(record, "weight"),
        bad_shares=dict(bad),
        clipped=_int(record, "clipped"),
        proof=_bytes(record, "accusation-proof"),
        contribution=_bytes(record, "contribution"),
        early_signature=_signature(record, "early-signature"),
    )


def consistency_reply_record(round_id: bytes, index: int, signature: bytes) -> ConfigRecord:
    return ConfigRecord({**reply_header(CONSISTENCY, round_id, index), "signature": signature})


def parse_consistency_signature(content: RecordDict, round_id: bytes, index: int) -> bytes:
    return _signature(_reply(content, CONSISTENCY, round_id, index), "signature", required=True)


def unmask_shares_record(round_id: bytes, index: int, shares: UnmaskShares) -> ConfigRecord:
    seed_owners, key_owners = sorted(shares.self_shares), sorted(shares.key_shares)
    return ConfigRecord(
        {
            **reply_header(UNMASK, round_id, index),
            "seed-share-owners": seed_owners,
            "seed-shares": [shares.self_shares[o] for o in seed_owners],
            "key-share-owners": key_owners,
            "key-shares": [shares.key_shares[o] for o in key_owners],
        }
    )


def parse_unmask_shares(content: RecordDict, round_id: bytes, index: int) -> UnmaskShares:
    record = _reply(content, UNMASK, round_id, index)
    seeds = _zip(_ints(record, "seed-share-owners"), _bytes_list(record, "seed-shares"))
    key_shares = _zip(_ints(record, "key-share-owners"), _bytes_list(record, "key-shares"))
    return UnmaskShares(self_shares=dict(seeds), key_shares=dict(key_shares))


def next_round_part(content: RecordDict) -> RecordDict:
    """The ``NEXT`` part of a pipelined message, as content a one-stage parser reads."""
    record = content.config_records.get(NEXT)
    if record is None:
        raise MalformedReply(f"no '{NEXT}' record (the next round's part)")
    return RecordDict({SECAGG: record})


# ---- helpers -------------------------------------------------------------------------------------
def _header(stage: str, round_id: bytes) -> dict[str, Any]:
    return {"stage": stage, "round-id": round_id}


def _secagg(content: RecordDict, stage: str) -> ConfigRecord:
    record = content.config_records.get(SECAGG)
    if record is None:
        raise MalformedReply(f"no '{SECAGG}' record")
    if record.get("stage") != stage:
        raise MalformedReply(f"a '{record.get('stage')}' message where '{stage}' was expected")
    return record


def _reply(content: RecordDict, stage: str, round_id: bytes, index: int) -> ConfigRecord:
    record = _secagg(content, stage)
    if _bytes(record, "round-id") != round_id:
        raise MalformedReply(
            f"{stage} reply for another round (round id "
            f"{_bytes(record, 'round-id').hex()[:12]}…): replayed or stale"
        )
    if "refused" in record:
        raise SiteRefused(f"refused: {record['refused']}")
    if _int(record, "index") != index:
        raise MalformedReply(f"reply claims index {record.get('index')}, expected {index}")
    return record


def _value(record: ConfigRecord, key: str) -> Any:
    if key not in record:
        raise MalformedReply(f"'{key}' is missing")
    return record[key]


def _int(record: ConfigRecord, key: str) -> int:
    value = _value(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedReply(f"'{key}' = {value!r} is not an integer")
    return value


def _str(record: ConfigRecord, key: str) -> str:
    value = _value(record, key)
    if not isinstance(value, str) or len(value) > 100:
        raise MalformedReply(f"'{key}' is not a string of at most 100 characters")
    return value


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = _value(record, key)
    if not isinstance(value, bytes):
        raise MalformedReply(f"'{key}' is not bytes")
    return value


def _signature(record: ConfigRecord, key: str, *, required: bool = False) -> bytes:
    """An Ed25519 signature (64 bytes) or b"" for none; an absent optional key is none."""
    if not required and key not in record:
        return b""
    signature = _bytes(record, key)
    if len(signature) not in (0, 64):
        raise MalformedReply(f"'{key}': a signature of {len(signature)} bytes, expected 64")
    return signature


def _list(record: ConfigRecord, key: str, kind: type) -> list[Any]:
    value = _value(record, key)
    if not isinstance(value, list) or any(
        not isinstance(v, kind) or isinstance(v, bool) for v in value
    ):
        raise MalformedReply(f"'{key}' is not a list of {kind.__name__}")
    return list(value)


def _ints(record: ConfigRecord, key: str) -> list[int]:
    return _list(record, key, int)


def _bytes_list(record: ConfigRecord, key: str) -> list[bytes]:
    return _list(record, key, bytes)


def _strs(record: ConfigRecord, key: str) -> list[str]:
    return _list(record, key, str)


def _zip(*columns: Sequence[Any]) -> list[tuple[Any, ...]]:
    if len({len(c) for c in columns}) > 1:
        raise MalformedReply(f"lists of different lengths {[len(c) for c in columns]}")
    rows = list(zip(*columns, strict=True))
    keys = [row[0] for row in rows]
    if len(set(keys)) != len(keys):
        raise MalformedReply("a site index listed twice")
    return rows
