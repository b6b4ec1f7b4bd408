"""A site's half of SecAgg+: a thin stateful object over the pure functions.

One :class:`SiteSecAgg` lives for one round. Between messages it is kept in the site's
``context.state`` (:meth:`state_dict` / :meth:`from_state_dict`); its secrets are dropped as soon
as they are no longer needed: the self-mask seed and mask key once the input is masked,
everything but the round id once the unmasking request is answered. Each survivor signs the
survivor set it will reveal for (the consistency check), and reveals only for that set, with t
valid signatures over it. The signature comes early, with the input, over the set of sites asked
for an input: when all of them send one, that is the survivor set and the server skips the
consistency exchange; the site then reveals only if every survivor of its share group signed it
so. When one drops, the server asks for the consistency check over the smaller set; the site
signs that, and reveals only for it. Every
method checks that the request belongs to this round and comes in order, and raises
:class:`ProtocolRefusal` otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.secagg import keys, masking, roster, shamir
from privacy.secagg.graph import (
    isolated_survivors,
    neighbour_graph,
    resolve_degree,
    share_threshold,
)
from privacy.secagg.protocol import (
    CONSISTENCY,
    MASKED_INPUT,
    SHARE_KEYS,
    UNMASK,
    ConsistencyRequest,
    KeyAdvert,
    MaskedInputRequest,
    ProtocolRefusal,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)

DONE = "done"  # ``expects`` after the unmasking: the round's secrets are gone
_PAYLOAD_BYTES = 2 * shamir.SHARE_BYTES  # share of the self-mask seed ‖ share of the mask key


class SiteSecAgg:
    """The per-round secrets and progress of one site."""

    def __init__(
        self,
        request: SetupRequest,
        min_threshold: float,
        max_weight: int,
        neighbours: int = 0,
        site_id: str = "",
        roster: Mapping[str, bytes] | None = None,
    ) -> None:
        """``min_threshold``, ``max_weight``, ``neighbours``: the site's own ``secagg.*`` settings,
        against which it checks the round the server proposes. ``site_id`` and ``roster`` (site
        id → identity key, already verified against the site's trust anchor): with a roster the
        site signs its keys and checks its peers' (roster.py); without, it trusts the server."""
        _check_setup(request, min_threshold, max_weight, neighbours)
        self.site_id = site_id
        self.roster = dict(roster or {})
        self.model_digest = b""  # of the global model it trained from (with a roster)
        self.config_digest = b""  # of the round's train config
        self.round_id = request.round_id
        self.server_round = request.server_round
        self.index = request.index
        self.num_sites = request.num_sites
        self.threshold = request.threshold
        self.neighbours = tuple(request.neighbours)
        self.weight_scale = request.weight_scale
        self.expects = SHARE_KEYS
        self.enc_private, self.enc_public = keys.new_keypair()
        self.mask_private, self.mask_public = keys.new_keypair()
        self.self_seed = keys.random_seed()
        self.peers: dict[int, KeyAdvert] = {}
        self.own_share = b""  # this site's own shares of its two secrets (66 + 66 bytes)
        self.held: dict[int, bytes] = {}  # owner → its shares for this site (66 + 66 bytes)
        self.partners: tuple[int, ...] = ()  # neighbours whose pairwise masks are in the input
        self.survivors: tuple[int, ...] = ()  # the survivor set it signed (consistency check)
        # Derived at the key sharing, kept for the next stage instead of agreeing again:
        # peer → the key of the shares between the two (until they are opened) and the
        # pairwise mask seed (until the input is masked).
        self.share_keys_with: dict[int, bytes] = {}
        self.mask_seeds_with: dict[int, bytes] = {}
        self.expected: tuple[int, ...] = ()  # the sites asked for an input with this one
        self.presigned: tuple[int, ...] = ()  # ``expected``, if it signed it with its input

    # ---- stage 1 ---------------------------------------------------------------------------------
    def advert(self, identity: Ed25519PrivateKey | None = None) -> KeyAdvert:
        """The public half of this round's keys and the self-mask commitment, signed with the
        site's identity key when it has a roster."""
        signature = b""
        if self.roster:
            if identity is None:
                raise ProtocolRefusal("this site has a roster but no identity key to sign with")
            signature = identity.sign(
                roster.advert_message(
                    self.round_id, self.index, self.site_id, self.enc_public, self.mask_public
                )
            )
        return KeyAdvert(
            enc_key=self.enc_public,
            mask_key=self.mask_public,
            commitment=keys.commitment(self.round_id, self.index, self.self_seed),
            site_id=self.site_id,
            signature=signature,
        )

    # ---- stage 2 ---------------------------------------------------------------------------------
    def share_keys(self, request: ShareKeysRequest) -> dict[int, bytes]:
        """Split both secrets among itself and its live neighbours: recipient → ciphertext."""
        self._expect(SHARE_KEYS, request.round_id)
        unknown = set(request.peers) - set(self.neighbours)
        if unknown:
            raise ProtocolRefusal(f"keys offered for sites {sorted(unknown)}, not neighbours")
        if len(request.peers) + 1 < self.threshold:
            raise ProtocolRefusal(
                f"only {len(request.peers)} neighbours left, {self.threshold - 1} needed "
                f"to share secrets with threshold {self.threshold}"
            )
        if self.roster:
            self._check_peer_signatures(request)
        holders = [self.index, *sorted(request.peers)]
        seed_shares = shamir.split(self.self_seed, self.threshold, holders)
        key_shares = shamir.split(self.mask_private, self.threshold, holders)
        ciphertexts: dict[int, bytes] = {}
        enc_private = keys.private_key(self.enc_private)
        mask_private = keys.private_key(self.mask_private)
        round_id, index = self.round_id, self.index
        share_keys, mask_seeds = {}, {}
        for peer, advert in sorted(request.peers.items()):
            try:
                key = share_keys[peer] = keys.agree(
                    enc_private, advert.enc_key, round_id, keys.PURPOSE_SHARES, index, peer
                )
                # the mask key must work too, or masking fails later; kept until the masking
                mask_seeds[peer] = keys.agree(
                    mask_private, advert.mask_key, round_id, keys.PURPOSE_MASK, index, peer
                )
            except keys.KeyAgreementError as error:
                raise ProtocolRefusal(f"site {peer}'s public key: {error}") from None
            payload = _payload(seed_shares[peer], key_shares[peer])
            ciphertexts[peer] = keys.encrypt_share(key, round_id, index, peer, payload)
        self.share_keys_with, self.mask_seeds_with = share_keys, mask_seeds
        self.peers = dict(request.peers)
        self.own_share = _payload(seed_shares[self.index], key_shares[self.index])
        self.expects = MASKED_INPUT
        return ciphertexts

    # ---- stage 3 ---------------------------------------------------------------------------------
    def accept_shares(self, request: MaskedInputRequest) -> dict[int, str]:
        """Open the shares the neighbours sent; return sender → reason for each that failed.

        Every sender's pairwise mask goes into the input, opened or not: the server treats a
        sender whose share failed as a dropout and removes its masks from the sum.
        """
        self._expect(MASKED_INPUT, request.round_id)
        unknown = set(request.shares) - set(self.peers)
        if unknown:
            raise ProtocolRefusal(f"shares from sites {sorted(unknown)} that sent no keys")
        if len(request.shares) + 1 < self.threshold:  # Bonawitz et al. §4: |U2| ≥ t, or abort
            raise ProtocolRefusal(
                f"shares from only {len(request.shares)} neighbours: with its own that is fewer "
                f"than the threshold {self.threshold}; this site masks nothing with so few"
            )
        bad: dict[int, str] = {}
        for sender, blob in sorted(request.shares.items()):
            key = self.share_keys_with.get(sender) or keys.agree(
                self.enc_private,
                self.peers[sender].enc_key,
                self.round_id,
                keys.PURPOSE_SHARES,
                self.index,
                sender,
            )
            try:
                payload = keys.decrypt_share(key, self.round_id, sender, self.index, blob)
                _split_payload(payload)
            except (keys.ShareDecryptionError, shamir.ShareError) as error:
                bad[sender] = str(error)
                continue
            self.held[sender] = payload
        self.partners = tuple(sorted(request.shares))
        self.expected = tuple(sorted(request.expected))
        self.share_keys_with = {}  # the shares are open: these keys are needed no more
        return bad

    def _check_peer_signatures(self, request: ShareKeysRequest) -> None:
        """Every peer's keys signed by the identity key the roster gives its site id."""
        claimed = [advert.site_id for advert in request.peers.values()]
        if len(set(claimed)) != len(claimed) or self.site_id in claimed:
            raise ProtocolRefusal("two peers, or a peer and this site, claim one site id")
        for peer, advert in sorted(request.peers.items()):
            key = self.roster.get(advert.site_id)
            message = roster.advert_message(
                self.round_id, peer, advert.site_id, advert.enc_key, advert.mask_key
            )
            if key is None or not roster.verify_signature(key, advert.signature, message):
                who = repr(advert.site_id[:40])
                raise ProtocolRefusal(
                    f"site {peer}'s keys are not signed by the roster key of site {who} "
                    "(unknown site or substituted keys): nothing shared"
                )

    def contribution(
        self, identity: Ed25519PrivateKey | None, model_digest: bytes, config_digest: bytes
    ) -> bytes:
        """Sign that this site sends an input in this round, for this model and config."""
        self.model_digest, self.config_digest = model_digest, config_digest
        if not self.roster or identity is None:
            return b""
        return identity.sign(
            roster.contribution_message(self.round_id, self.index, model_digest, config_digest)
        )

    def _check_consistency(
        self, request: UnmaskRequest, survivors: set[int], *, every: bool = False
    ) -> None:
        """Bonawitz et al.'s consistency check over (round id, survivor set, model, config):
        every signature the request carries from this site's share group verifies over the
        tuple this site knows, and at least t do. A survivor that did not sign (b"") counts
        for nothing; a signature that does not verify stops the reveal. ``every``: the set was
        signed early, with the inputs, so each survivor of the group must have signed it."""
        group = {self.index: self.site_id, **{p: a.site_id for p, a in self.peers.items()}}
        valid = 0
        for member in sorted(survivors & set(group)):
            if member == self.index and self.survivors:
                valid += 1  # its own: it signed this very set (reveal checked that)
                continue
            signature = request.signatures.get(member, b"")
            if not signature and every:
                raise ProtocolRefusal(
                    f"survivor {member} did not sign, with its input, the survivor set this "
                    "site signed with its own: nothing revealed"
                )
            if not signature:
                continue
            message = roster.consistency_message(
                self.round_id, member, request.survivors, self.model_digest, self.config_digest
            )
            if not roster.verify_signature(self.roster.get(group[member], b""), signature, message):
                raise ProtocolRefusal(
                    f"survivor {member} did not sign this round's survivor set with the global "
                    "model and config this site trained with: nothing revealed"
                )
            valid += 1
        if valid < self.threshold:
            raise ProtocolRefusal(
                f"{valid} survivors of this site's share group signed this survivor set, "
                f"{self.threshold} needed: nothing revealed"
            )

    def accusation_proof(self, bad: Mapping[int, str]) -> bytes:
        """What backs an accusation of ``bad`` senders: this round's share-encryption private key
        (it opens only the shares sent to this site; never the mask key), or b"" for none."""
        return self.enc_private if bad else b""

    def early_signature(self, identity: Ed25519PrivateKey | None) -> bytes:
        """After masking: sign the set of sites asked for an input (the request's ``expected``)
        as the survivor set, with this round's model and config (:meth:`contribution` first).

        If every one of them sends its input, the server needs no consistency exchange. b"" (and
        nothing presigned) when no set came, when it leaves this site out, or when it is one
        :meth:`consistency` would refuse; b"" also without a roster, where the site still keeps
        the set it will reveal for."""
        if self.expects != CONSISTENCY:
            raise ProtocolRefusal(f"early signature before the input, expecting {self.expects}")
        self.presigned = ()
        expected = self.expected
        if not expected or self.index not in expected:
            return b""
        try:
            self._check_survivor_set(set(expected))
        except ProtocolRefusal:
            return b""
        self.presigned = expected
        if not self.roster or identity is None:
            return b""
        return identity.sign(
            roster.consistency_message(
                self.round_id, self.index, expected, self.model_digest, self.config_digest
            )
        )

    def mask(self, quantised: np.ndarray) -> np.ndarray:
        """The masked input for ``quantised`` (a ring vector); forgets the masking secrets."""
        masked = np.array(quantised, copy=True)
        self.mask_streams(masked.dtype).add_to(masked)
        self.input_masked()
        return masked

    def mask_streams(self, dtype: np.dtype) -> masking.MaskStreams:
        """This site's masks (its self mask and one per partner), to add to its input chunk by
        chunk as it is quantised; then :meth:`input_masked`."""
        self._expect(MASKED_INPUT, self.round_id)
        pair_seeds = [(peer, self._pair_seed(peer)) for peer in self.partners]
        return masking.MaskStreams(
            masking.pair_masks(self.index, self.self_seed, pair_seeds), dtype
        )

    def input_masked(self) -> None:
        """The input went out masked: forget the masking secrets."""
        self._expect(MASKED_INPUT, self.round_id)
        self._finish_input()

    def _pair_seed(self, peer: int) -> bytes:
        if peer in self.mask_seeds_with:
            return self.mask_seeds_with[peer]
        return keys.agree(
            self.mask_private,
            self.peers[peer].mask_key,
            self.round_id,
            keys.PURPOSE_MASK,
            self.index,
            peer,
        )

    def decline(self) -> None:
        """The site sends no input this round; it can still help rebuild others' secrets."""
        self._expect(MASKED_INPUT, self.round_id)
        self._finish_input()
        self.expects = UNMASK  # not a survivor: nothing for it to sign

    # ---- stage 4 ---------------------------------------------------------------------------------
    def consistency(
        self, request: ConsistencyRequest, identity: Ed25519PrivateKey | None = None
    ) -> bytes:
        """Sign the survivor set U3 the server names (b"" without a roster) and keep it: this
        site will reveal shares only for exactly this set.

        Refuses a set that leaves this site out (its input went in), one below the threshold,
        one naming sites outside the round, or one that would isolate a survivor.
        """
        self._expect(CONSISTENCY, request.round_id)
        survivors = tuple(sorted(request.survivors))
        if self.index not in survivors:
            raise ProtocolRefusal("this site sent its input but is not named a survivor")
        self._check_survivor_set(set(survivors))
        self.survivors = survivors
        self.expects = UNMASK
        if not self.roster:
            return b""
        if identity is None:
            raise ProtocolRefusal("this site has a roster but no identity key to sign with")
        return identity.sign(
            roster.consistency_message(
                self.round_id, self.index, survivors, self.model_digest, self.config_digest
            )
        )

    def _check_survivor_set(self, survivors: set[int]) -> None:
        """At least t survivors, all in this round, none left with fewer than t − 1 surviving
        neighbours."""
        if len(survivors) < self.threshold:
            raise ProtocolRefusal(
                f"only {len(survivors)} survivors, fewer than the threshold {self.threshold}"
            )
        outside = survivors - set(range(1, self.num_sites + 1))
        if outside:
            raise ProtocolRefusal(f"sites {sorted(outside)} are not in this round")
        isolated = isolated_survivors(
            neighbour_graph(self.num_sites, len(self.neighbours), self.round_id),
            survivors,
            self.threshold,
        )
        if isolated:
            raise ProtocolRefusal(
                f"survivors {isolated[:8]} would keep fewer than {self.threshold - 1} surviving "
                f"neighbours (the design bound t − 1): revealing could expose their inputs"
            )

    # ---- stage 5 ---------------------------------------------------------------------------------
    def reveal(self, request: UnmaskRequest) -> UnmaskShares:
        """Shares of the survivors' self-mask seeds and of the dropped sites' mask keys.

        Refuses a second request in the same round, a site named as both survivor and dropped,
        fewer survivors than the threshold (their sum would say too much about each), and, at a
        survivor, any survivor set but the one it signed in the consistency check (a site whose
        input was left out after it was sent signs nothing, and can still help).
        """
        survivors, dropped = set(request.survivors), set(request.dropped)
        early = False
        if self.expects == CONSISTENCY and self.presigned and survivors == set(self.presigned):
            # every site asked for an input sent it: the set this site signed with its own
            self.survivors, self.expects, early = self.presigned, UNMASK, True
        elif self.expects == CONSISTENCY and self.index not in survivors:
            self.expects = UNMASK  # its input was left out after all: it has nothing to sign
        self._expect(UNMASK, request.round_id)
        both = survivors & dropped
        if both:
            raise ProtocolRefusal(
                f"asked for both the self mask and the mask key of sites {sorted(both)}"
            )
        outside = dropped - set(range(1, self.num_sites + 1))
        if outside:
            raise ProtocolRefusal(f"sites {sorted(outside)} are not in this round")
        self._check_survivor_set(survivors)
        if self.survivors and survivors != set(self.survivors):
            raise ProtocolRefusal(
                f"the survivor set {sorted(survivors)[:12]} is not the one this site signed "
                f"({list(self.survivors)[:12]}): the server shows sites different survivors"
            )
        if self.roster:
            self._check_consistency(request, survivors, every=early)
        held = {**self.held, self.index: self.own_share} if self.own_share else dict(self.held)
        self_shares, key_shares = {}, {}
        for owner, payload in held.items():
            seed_share, key_share = payload[: shamir.SHARE_BYTES], payload[shamir.SHARE_BYTES :]
            if owner in survivors:
                self_shares[owner] = seed_share
            elif owner in dropped:
                key_shares[owner] = key_share
        self._wipe()
        return UnmaskShares(self_shares=self_shares, key_shares=key_shares)

    def abandon(self, round_id: bytes) -> None:
        """The server aborted this round: forget every secret of it now."""
        if round_id != self.round_id:
            raise ProtocolRefusal(
                f"abort notice for round id {round_id.hex()[:12]}…, this site is in round "
                f"{self.server_round} ({self.round_id.hex()[:12]}…): replayed or stale"
            )
        self._wipe()

    # ---- persistence between messages ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Flat ConfigRecord-compatible values (bytes, ints, lists) for ``context.state``."""
        peers = sorted(self.peers)
        held = sorted(self.held)
        return {
            "round-id": self.round_id,
            "server-round": self.server_round,
            "index": self.index,
            "num-sites": self.num_sites,
            "threshold": self.threshold,
            "neighbours": list(self.neighbours),
            "weight-scale": self.weight_scale,
            "expects": self.expects,
            "enc-private": self.enc_private,
            "enc-public": self.enc_public,
            "mask-private": self.mask_private,
            "mask-public": self.mask_public,
            "self-seed": self.self_seed,
            "peers": peers,
            "peer-enc-keys": [self.peers[p].enc_key for p in peers],
            "peer-mask-keys": [self.peers[p].mask_key for p in peers],
            "own-share": self.own_share,
            "held-owners": held,
            "held-shares": [self.held[o] for o in held],
            "partners": list(self.partners),
            "survivors": list(self.survivors),
            "expected": list(self.expected),
            "presigned": list(self.presigned),
            "peer-site-ids": [self.peers[p].site_id for p in peers],
            "share-keys-with": [self.share_keys_with.get(p, b"") for p in peers],
            "mask-seeds-with": [self.mask_seeds_with.get(p, b"") for p in peers],
            "site-id": self.site_id,
            "roster-ids": sorted(self.roster),
            "roster-keys": [self.roster[s] for s in sorted(self.roster)],
            "model-digest": self.model_digest,
            "config-digest": self.config_digest,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SiteSecAgg:
        """Restore the object :meth:`state_dict` saved."""
        site = cls.__new__(cls)
        site.round_id = bytes(state["round-id"])
        site.server_round = int(state["server-round"])
        site.index = int(state["index"])
        site.num_sites = int(state["num-sites"])
        site.threshold = int(state["threshold"])
        site.neighbours = tuple(int(i) for i in state["neighbours"])
        site.weight_scale = int(state["weight-scale"])
        site.expects = str(state["expects"])
        site.enc_private = bytes(state["enc-private"])
        site.mask_private = bytes(state["mask-private"])
        site.self_seed = bytes(state["self-seed"])
        site.enc_public = bytes(state["enc-public"])  # stored: no key derivation per message
        site.mask_public = bytes(state["mask-public"])
        site.peers = {
            int(p): KeyAdvert(bytes(e), bytes(m), b"", str(i))
            for p, e, m, i in zip(
                state["peers"],
                state["peer-enc-keys"],
                state["peer-mask-keys"],
                state["peer-site-ids"],
                strict=True,
            )
        }
        site.site_id = str(state["site-id"])
        site.roster = {
            str(s): bytes(k) for s, k in zip(state["roster-ids"], state["roster-keys"], strict=True)
        }
        site.model_digest = bytes(state["model-digest"])
        site.config_digest = bytes(state["config-digest"])
        site.own_share = bytes(state["own-share"])
        site.held = {
            int(o): bytes(s)
            for o, s in zip(state["held-owners"], state["held-shares"], strict=True)
        }
        site.partners = tuple(int(p) for p in state["partners"])
        site.survivors = tuple(int(i) for i in state["survivors"])
        derived = zip(
            state["peers"],
            state.get("share-keys-with", [b""] * len(state["peers"])),
            state.get("mask-seeds-with", [b""] * len(state["peers"])),
            strict=True,
        )
        site.share_keys_with, site.mask_seeds_with = {}, {}
        for peer, share_key, mask_seed in derived:
            if share_key:
                site.share_keys_with[int(peer)] = bytes(share_key)
            if mask_seed:
                site.mask_seeds_with[int(peer)] = bytes(mask_seed)
        site.expected = tuple(int(i) for i in state.get("expected", []))
        site.presigned = tuple(int(i) for i in state.get("presigned", []))
        return site

    # ---- internals -------------------------------------------------------------------------------
    def _expect(self, stage: str, round_id: bytes) -> None:
        if round_id != self.round_id:
            raise ProtocolRefusal(
                f"{stage} request for round id {round_id.hex()[:12]}…, this site is in round "
                f"{self.server_round} ({self.round_id.hex()[:12]}…): replayed or stale"
            )
        if stage != self.expects:
            raise ProtocolRefusal(
                f"{stage} request out of order: this site expects {self.expects} "
                f"in round {self.server_round}"
            )

    def _finish_input(self) -> None:
        self.self_seed = b""
        self.mask_private = b""
        self.mask_public = b""
        self.mask_seeds_with = {}
        self.expects = CONSISTENCY

    def _wipe(self) -> None:
        self.enc_private = self.enc_public = b""
        self.mask_private = self.mask_public = self.self_seed = b""
        self.peers, self.held, self.own_share, self.partners = {}, {}, b"", ()
        self.share_keys_with, self.mask_seeds_with = {}, {}
        self.survivors = self.expected = self.presigned = ()
        self.roster = {}
        self.expects = DONE


def _check_setup(
    request: SetupRequest, min_threshold: float, max_weight: int, degree_setting: int
) -> None:
    """A site's own checks on the round the server proposes (refuses a weak or bogus one).

    The neighbour graph is a public function of (n, k, round id): the site recomputes its own
    neighbours, so a server cannot hand it a short or lopsided list.
    """
    n, index, neighbours = request.num_sites, request.index, request.neighbours
    if not 1 <= request.weight_scale <= max_weight:
        raise ProtocolRefusal(
            f"weight scale {request.weight_scale} outside [1, {max_weight}] (secagg.max_weight)"
        )
    if len(request.round_id) != keys.ROUND_ID_BYTES:
        raise ProtocolRefusal(f"round id of {len(request.round_id)} bytes")
    if n < 2 or not 1 <= index <= n:
        raise ProtocolRefusal(f"index {index} of {n} sites")
    if len(set(neighbours)) != len(neighbours) or any(
        not 1 <= j <= n or j == index for j in neighbours
    ):
        raise ProtocolRefusal(f"bad neighbour list {list(neighbours)} for site {index} of {n}")
    expected = neighbour_graph(n, resolve_degree(n, degree_setting), request.round_id)[index]
    if tuple(neighbours) != expected:
        raise ProtocolRefusal(
            f"neighbours {list(neighbours)} are not this round's graph (expected "
            f"{list(expected)} for secagg.neighbours = {degree_setting})"
        )
    group = len(neighbours) + 1
    lowest = share_threshold(group, min_threshold)
    if not lowest <= request.threshold <= group:
        raise ProtocolRefusal(
            f"threshold {request.threshold} for a share group of {group}: this site accepts "
            f"{lowest} … {group} (secagg.threshold)"
        )


def _payload(seed_share: int, key_share: int) -> bytes:
    return shamir.share_to_bytes(seed_share) + shamir.share_to_bytes(key_share)


def _split_payload(payload: bytes) -> tuple[int, int]:
    if len(payload) != _PAYLOAD_BYTES:
        raise shamir.ShareError(f"share payload of {len(payload)} bytes, expected {_PAYLOAD_BYTES}")
    return (
        shamir.share_from_bytes(payload[: shamir.SHARE_BYTES]),
        shamir.share_from_bytes(payload[shamir.SHARE_BYTES :]),
    )
