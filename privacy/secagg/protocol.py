"""What the SecAgg+ stages exchange, as plain data (records.py maps these to Flower records).

Stages, in order (one Message exchange each; the server's request, then each site's reply):

1. ``setup``        server → site: round id, the site's index, n, t, its neighbours.
                    site → server: two fresh public keys and a commitment to its self-mask seed.
2. ``share_keys``   server → site: the public keys of its neighbours that answered stage 1.
                    site → server: its two secrets Shamir-split among itself and those neighbours,
                    one encrypted share per neighbour.
3. ``masked_input`` server → site: the shares its neighbours sent it, plus the global model and
                    the strategy's train config. The site trains (or declines), quantises its
                    update and replies with it masked, its weight, and any share it could not open.
4. ``consistency``  server → each survivor: the survivor set U3 (the sites whose masked input is
                    in the sum). The survivor signs (round id, U3, global-model digest,
                    run-config digest) with its identity key (Bonawitz et al. 2017, §6
                    ConsistencyCheck) and remembers U3: it will reveal only for that set.
5. ``unmask``       server → site: who survived (their self masks must go) and who dropped out
                    after sharing (their pairwise masks must go). The site answers with shares of
                    the survivors' self-mask seeds or of the dropped sites' mask keys — of no
                    site both — and only once per round. With a roster the request carries
                    the survivors' consistency signatures: a site reveals only after at least t
                    valid ones over the same tuple from its share group.

A round aborted on the way (too few sites, a secret that cannot be rebuilt) ends with an
``abort`` notice to every site still answering: each wipes that round's secrets at once.

The stages of consecutive rounds may overlap: the next round's stages 1 and 2 can travel in the
same messages as this round's stages 3 and 4 (server/secagg_round.py): setup with the masked
input, share_keys with the consistency check. Every round keeps its own
round id, keys and checks; a message carrying two rounds is two requests answered separately.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SETUP = "setup"
SHARE_KEYS = "share_keys"
MASKED_INPUT = "masked_input"
CONSISTENCY = "consistency"
UNMASK = "unmask"
ABORT = "abort"  # not a stage: the server's notice that a round was aborted (sites wipe it)


class ProtocolRefusal(Exception):
    """A site refuses a request that breaks the protocol; ``reason`` goes back to the server."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RoundAborted(Exception):
    """The round cannot finish securely (too few sites, or a secret cannot be rebuilt)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class SetupRequest:
    round_id: bytes
    server_round: int
    index: int  # this site's index, 1 … n (its Shamir x-coordinate)
    num_sites: int
    threshold: int
    neighbours: tuple[int, ...]
    # The round's weight normaliser: weights are capped at it and quantised as w / weight_scale.
    # The largest row count among the sampled sites, capped at secagg.max_weight.
    weight_scale: int = 1
    roster: bytes = b""  # the governance-signed roster (roster.py), b"" when the run has none


@dataclass(frozen=True)
class KeyAdvert:
    enc_key: bytes  # X25519 public key for share encryption
    mask_key: bytes  # X25519 public key for pairwise masks
    commitment: bytes  # SHA-256 commitment to the self-mask seed
    site_id: str = ""  # the site's roster id ("" without a roster)
    signature: bytes = b""  # its identity key's signature of roster.advert_message (b"": none)


@dataclass(frozen=True)
class ShareKeysRequest:
    round_id: bytes
    peers: dict[int, KeyAdvert]  # the neighbours that completed stage 1 (no commitments needed)


@dataclass(frozen=True)
class MaskedInputRequest:
    round_id: bytes
    shares: dict[int, bytes]  # sender index → ciphertext addressed to this site
    # The sites asked for an input in this batch: the survivor set if none drops out. A site
    # signs it with its input (the consistency signature, sent early); () asks for none.
    expected: tuple[int, ...] = ()


@dataclass(frozen=True)
class MaskedInput:
    vector: np.ndarray  # ring vector (uint32 / uint64)
    weight: int  # the site's example count, capped at the round's weight scale
    bad_shares: dict[int, str] = field(default_factory=dict)  # sender → why it could not be opened
    clipped: int = 0  # coordinates that clip_range cut
    # The proof behind ``bad_shares``: this site's share-encryption private key of the round
    # (32 bytes; empty when it accuses no one). The server checks it against the advertised key
    # and opens the accused ciphertexts itself; an accusation without it is ignored.
    proof: bytes = b""
    # roster.contribution_message signed by the site's identity key (b"" without a roster)
    contribution: bytes = b""
    # roster.consistency_message over the request's ``expected`` set, signed ahead: when every
    # expected site's input arrives, these stand for the consistency check (b"": none)
    early_signature: bytes = b""


@dataclass(frozen=True)
class ConsistencyRequest:
    round_id: bytes
    survivors: tuple[int, ...]  # U3: the sites whose masked input is in the sum


@dataclass(frozen=True)
class UnmaskRequest:
    round_id: bytes
    survivors: tuple[int, ...]  # inputs in the sum: their self-mask seeds are rebuilt
    dropped: tuple[int, ...]  # shared keys, input not in the sum: their mask keys are rebuilt
    # survivor → its consistency signature over (round id, survivors, model, config): the
    # check before revealing (roster.consistency_message)
    signatures: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class UnmaskShares:
    self_shares: dict[int, bytes]  # owner index → share of its self-mask seed
    key_shares: dict[int, bytes]  # owner index → share of its mask private key
