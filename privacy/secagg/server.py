"""The server's half of SecAgg+: a thin stateful object over the pure functions.

One :class:`ServerSecAgg` runs one round over n sites with indices 1 … n. It builds each stage's
requests, takes the replies that arrived (the messaging layer records every site that sent
nothing usable with :meth:`drop`), and keeps the survivor sets U1 ⊇ U2 ⊇ U3 of the paper. It
aborts (:class:`RoundAborted`) as soon as fewer than t sites remain, and after the unmasking
returns the exact ring sum of the survivors' inputs, or aborts if a needed secret cannot be
rebuilt and checked. It never holds anything from which one site's input could be read.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

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
    SETUP,
    SHARE_KEYS,
    UNMASK,
    ConsistencyRequest,
    KeyAdvert,
    MaskedInput,
    MaskedInputRequest,
    RoundAborted,
    SetupRequest,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)
from privacy.secagg.quantise import ring_scale

MAX_RECONSTRUCTION_TRIES = 256  # share subsets tried per secret when some shares are bad


@dataclass(frozen=True)
class SecAggSettings:
    """The run's SecAgg+ settings (``secagg.*`` in the run config)."""

    threshold: float = 0.66
    neighbours: int = 0
    clip_range: float = 2.0
    bits: int = 32
    max_weight: int = 100_000
    roster: bytes = b""  # the governance-signed roster the sites check (b"": none)


@dataclass(frozen=True)
class Dropout:
    """Why a site's input is not in the sum: the stage it was lost at and the reason."""

    stage: str
    reason: str


@dataclass
class UnmaskedSum:
    """The outcome of a completed round: the survivors' exact ring sum and their weights."""

    ring_sum: np.ndarray
    survivors: tuple[int, ...]
    weights: dict[int, int]
    clipped: int

    @property
    def total_weight(self) -> int:
        return sum(self.weights.values())


class ServerSecAgg:
    """One SecAgg+ round as the server runs it."""

    def __init__(
        self,
        num_sites: int,
        settings: SecAggSettings,
        vector_length: int,
        server_round: int,
        round_id: bytes | None = None,
        weight_scale: int | None = None,
        site_ids: tuple[str, ...] = (),
    ) -> None:
        """``site_ids``: the roster id of each index (1 … n), checked when the run has a roster."""
        self.num_sites = num_sites
        # Weights are quantised as w / weight_scale: the closer it is to the largest weight,
        # the finer the mean (see quantise.mean_error_bound).
        self.weight_scale = min(max(1, weight_scale or settings.max_weight), settings.max_weight)
        self.settings = settings
        self.vector_length = vector_length
        self.server_round = server_round
        self.round_id = round_id or keys.new_round_id()
        self.degree = resolve_degree(num_sites, settings.neighbours)
        self.graph = neighbour_graph(num_sites, self.degree, self.round_id)
        self.group_size = self.degree + 1
        self.threshold = share_threshold(self.group_size, settings.threshold)
        self.scale = ring_scale(max(num_sites, 1), settings.bits)
        self.dtype = masking.ring_dtype(settings.bits)
        self.dropouts: dict[int, Dropout] = {}
        self.unreachable: set[int] = set()  # sent nothing at some stage: not asked again
        self.adverts: dict[int, KeyAdvert] = {}
        self.ciphertexts: dict[int, dict[int, bytes]] = {}  # sender → recipient → ciphertext
        self.partners: dict[int, tuple[int, ...]] = {}  # pairwise masks in each site's input
        self.inputs: dict[int, MaskedInput] = {}
        self.expected: tuple[int, ...] = ()  # the sites asked for an input (expect_inputs)
        self.signed_early = False  # the inputs' early signatures stand for the consistency check
        self.early_verified: set[int] = set()  # inputs whose early signature verified
        self.ignored_accusations: dict[int, str] = {}  # accuser → why (bounded), not acted on
        # With a roster: index → the identity key its site id has there (adverts and
        # contributions are checked here too, so one site's bad signature drops that site
        # instead of making its honest peers refuse the whole stage).
        self.identities: dict[int, bytes] = {}
        self.site_ids = dict(enumerate(site_ids, start=1))
        if settings.roster:
            listed = roster.roster_sites(settings.roster)
            self.identities = {i: listed[s] for i, s in self.site_ids.items() if s in listed}
        self.expected_contribution: dict[int, tuple[bytes, bytes]] = {}  # (model, config digest)
        self.bad_holders: dict[int, list[int]] = {}  # holder → owners whose share did not fit
        self.signatures: dict[int, bytes] = {}  # survivor → its consistency signature
        self.unsigned: dict[int, str] = {}  # survivor → why it has no usable consistency reply
        self.refused_consistency: set[int] = set()  # answered with a refusal or a bad reply
        self.late_signers: set[int] = set()  # sent no consistency reply in time: still asked
        if num_sites < 2:
            raise RoundAborted(SETUP, f"{num_sites} site(s) sampled: secure aggregation needs 2")
        if self.threshold > self.group_size:
            raise RoundAborted(
                SETUP,
                f"threshold {self.threshold} exceeds the share group of {self.group_size} "
                f"(each site and its {self.degree} neighbours; secagg.threshold)",
            )

    # ---- bookkeeping -----------------------------------------------------------------------------
    @property
    def sites(self) -> range:
        return range(1, self.num_sites + 1)

    def alive(self) -> list[int]:
        """Sites still in the round (not dropped), in index order."""
        return [i for i in self.sites if i not in self.dropouts]

    def drop(self, index: int, stage: str, reason: str, *, reachable: bool = False) -> None:
        """Take ``index`` out of the sum; ``reachable``: it answered, so it can help unmask."""
        if index not in self.dropouts:
            self.dropouts[index] = Dropout(stage, reason)
        if not reachable:
            self.unreachable.add(index)

    def _require_threshold(self, stage: str) -> None:
        alive = len(self.alive())
        if alive < self.threshold:
            raise RoundAborted(
                stage,
                f"only {alive} of {self.num_sites} sites remain after {stage}, "
                f"below the threshold {self.threshold}",
            )

    def _drop_silent(self, stage: str, answered: Iterable[int]) -> None:
        answered = set(answered)
        for index in self.alive():
            if index not in answered:
                self.drop(index, stage, "no reply")

    # ---- stage 1: setup and key advertisement ----------------------------------------------------
    def setup_request(self, index: int) -> SetupRequest:
        return SetupRequest(
            round_id=self.round_id,
            server_round=self.server_round,
            index=index,
            num_sites=self.num_sites,
            threshold=self.threshold,
            neighbours=self.graph[index],
            weight_scale=self.weight_scale,
            roster=self.settings.roster,
        )

    def receive_adverts(self, adverts: Mapping[int, KeyAdvert]) -> None:
        """Keep each site's public keys; drop sites that sent none or unusable ones."""
        probe_private, _ = keys.new_keypair()
        for index, advert in sorted(adverts.items()):
            if index in self.dropouts:
                continue
            problem = _advert_problem(advert, probe_private, self.round_id) or (
                self._signature_problem(index, advert) if self.settings.roster else ""
            )
            if problem:
                self.drop(index, SETUP, problem, reachable=True)
                continue
            self.adverts[index] = advert
        self._drop_silent(SETUP, self.adverts)
        self._require_threshold(SETUP)

    # ---- stage 2: share distribution -------------------------------------------------------------
    def share_keys_request(self, index: int) -> ShareKeysRequest:
        peers = {j: self.adverts[j] for j in self.graph[index] if j in self.adverts}
        return ShareKeysRequest(round_id=self.round_id, peers=peers)

    def receive_ciphertexts(self, replies: Mapping[int, Mapping[int, bytes]]) -> None:
        """Keep each site's encrypted shares: exactly one per live neighbour, or it drops."""
        for index, shares in sorted(replies.items()):
            if index in self.dropouts:
                continue
            expected = {j for j in self.graph[index] if j in self.adverts}
            if set(shares) != expected:
                self.drop(
                    index,
                    SHARE_KEYS,
                    f"shares addressed to {sorted(shares)}, expected {sorted(expected)}",
                    reachable=True,
                )
                continue
            if any(not isinstance(blob, bytes) or len(blob) > 1024 for blob in shares.values()):
                self.drop(index, SHARE_KEYS, "malformed encrypted share", reachable=True)
                continue
            self.ciphertexts[index] = dict(shares)
        self._drop_silent(SHARE_KEYS, self.ciphertexts)
        # A site with fewer than t − 1 neighbours left sharing could not have its secrets rebuilt,
        # and would refuse to mask with so few (client.accept_shares): it leaves now, which can
        # leave a neighbour short in turn.
        short = True
        while short:
            sharing = set(self.alive())
            short = [
                i
                for i in sorted(sharing)
                if len(sharing.intersection(self.graph[i])) + 1 < self.threshold
            ]
            for i in short:
                self.drop(
                    i,
                    SHARE_KEYS,
                    f"only {len(sharing.intersection(self.graph[i]))} of its neighbours shared "
                    f"keys, {self.threshold - 1} needed",
                    reachable=True,
                )
        self._require_threshold(SHARE_KEYS)
        sharing = set(self.alive())
        self.partners = {
            i: tuple(j for j in self.graph[i] if j in sharing) for i in sorted(sharing)
        }

    # ---- stage 3: masked inputs ------------------------------------------------------------------
    def expect_inputs(self) -> None:
        """Fix the set of sites asked for an input (those still alive): each request names it,
        and each site signs it with its input as the survivor set it expects."""
        self.expected = tuple(self.alive())

    def masked_input_request(self, index: int) -> MaskedInputRequest:
        shares = {j: self.ciphertexts[j][index] for j in self.partners[index]}
        return MaskedInputRequest(round_id=self.round_id, shares=shares, expected=self.expected)

    def receive_masked_inputs(self, replies: Mapping[int, MaskedInput]) -> None:
        """Check each masked input; drop a malformed one, and any site whose share failed."""
        max_weight = self.weight_scale
        accused: dict[int, str] = {}
        for index, masked in sorted(replies.items()):
            if index in self.dropouts:
                continue
            vector = masked.vector
            if not isinstance(vector, np.ndarray) or vector.dtype != self.dtype:
                dtype = getattr(vector, "dtype", type(vector).__name__)
                problem = f"masked input of dtype {dtype}, expected {self.dtype}"
            elif vector.shape != (self.vector_length,):
                problem = f"masked input of shape {vector.shape}, expected ({self.vector_length},)"
            elif isinstance(masked.weight, bool) or not isinstance(masked.weight, int):
                problem = f"weight {masked.weight!r} is not a whole number"
            elif not 0 <= masked.weight <= max_weight:
                problem = (
                    f"weight {masked.weight} outside [0, {max_weight}] (this round's weight "
                    f"scale: the largest site's rows, at most secagg.max_weight "
                    f"{self.settings.max_weight})"
                )
            else:
                problem = self._contribution_problem(index, masked)
            if problem:
                self.drop(index, MASKED_INPUT, problem, reachable=True)
                continue
            for sender, reason in sorted(masked.bad_shares.items()):
                if sender not in self.partners.get(index, ()):
                    continue
                refuted = self._accusation_problem(index, sender, masked.proof)
                if refuted:  # no proof, or the share opens: the accused stays in the sum
                    self.ignored_accusations.setdefault(
                        index, f"against site {sender} ignored: {refuted}"
                    )
                    continue
                accused.setdefault(
                    sender,
                    f"site {index} could not open its share ({_bounded(reason)}); "
                    "checked with the accuser's key",
                )
            self.inputs[index] = masked
        for sender, reason in sorted(accused.items()):
            self.drop(sender, SHARE_KEYS, reason, reachable=sender in self.inputs)
        self._drop_silent(MASKED_INPUT, self.inputs)
        self._require_threshold(MASKED_INPUT)
        isolated = isolated_survivors(self.graph, self.alive(), self.threshold)
        if isolated:  # the sites would refuse to reveal: abort before asking
            raise RoundAborted(
                MASKED_INPUT,
                f"survivors {isolated[:8]} keep fewer than {self.threshold - 1} surviving "
                "neighbours (the design bound t − 1): not unmasked",
            )
        if sum(self.inputs[i].weight for i in self.alive()) == 0:
            raise RoundAborted(MASKED_INPUT, "the surviving sites' total weight is 0")
        self.signed_early = self._signed_early()

    def _signed_early(self) -> bool:
        """Whether the consistency exchange can be skipped: every site asked for an input sent
        one (so the survivor set is the expected set each signed) and, with a roster, every
        early signature verifies over it. They then go out with the unmask request, as the
        consistency replies would have."""
        survivors = tuple(self.alive())
        if not self.expected or survivors != self.expected:
            return False
        signatures = {i: self.inputs[i].early_signature for i in survivors}
        if self.settings.roster:
            if any(
                i not in self.early_verified and self._consistency_problem(i, sig)
                for i, sig in signatures.items()
            ):
                return False
            self.signatures = signatures
        return True

    def _signature_problem(self, index: int, advert: KeyAdvert) -> str:
        expected = self.site_ids.get(index, "")
        if advert.site_id != expected or index not in self.identities:
            return f"advertised as site {advert.site_id[:40]!r}, not {expected!r} of the roster"
        message = roster.advert_message(
            self.round_id, index, advert.site_id, advert.enc_key, advert.mask_key
        )
        if not roster.verify_signature(self.identities[index], advert.signature, message):
            return "keys not signed by the site's roster identity key"
        return ""

    def _contribution_problem(self, index: int, masked: MaskedInput) -> str:
        if not self.settings.roster or index not in self.expected_contribution:
            return ""
        model, config = self.expected_contribution[index]
        early = masked.early_signature
        if early and self.expected and not self._consistency_problem(index, early, self.expected):
            self.early_verified.add(index)  # it states the same model and config, and more
            return ""
        message = roster.contribution_message(self.round_id, index, model, config)
        if not roster.verify_signature(
            self.identities.get(index, b""), masked.contribution, message
        ):
            return "its contribution statement does not verify (another model or config?)"
        return ""

    def _accusation_problem(self, accuser: int, sender: int, proof: bytes) -> str:
        """Why ``accuser``'s claim that ``sender``'s share does not open fails ("" = it holds).

        The proof is the accuser's share-encryption private key: it must match the key the
        accuser advertised; the server then derives the pair's key and opens the ciphertext it
        forwarded. Only a share that really fails to open (or to parse) convicts the sender.
        """
        if not isinstance(proof, bytes) or len(proof) != keys.KEY_BYTES:
            return "no proof (the accuser's share-encryption key) came with it"
        try:
            if keys.public_key_of(proof) != self.adverts[accuser].enc_key:
                return "the proof is not the key the accuser advertised"
            key = keys.agree(
                proof,
                self.adverts[sender].enc_key,
                self.round_id,
                keys.PURPOSE_SHARES,
                accuser,
                sender,
            )
        except (ValueError, keys.KeyAgreementError) as error:
            return _bounded(f"unusable proof: {error}")
        blob = self.ciphertexts.get(sender, {}).get(accuser, b"")
        try:
            payload = keys.decrypt_share(key, self.round_id, sender, accuser, blob)
        except keys.ShareDecryptionError:
            return ""  # it does not open: the accusation holds
        if len(payload) != 2 * shamir.SHARE_BYTES:
            return ""
        try:
            shamir.share_from_bytes(payload[: shamir.SHARE_BYTES])
            shamir.share_from_bytes(payload[shamir.SHARE_BYTES :])
        except shamir.ShareError:
            return ""
        return "the share opens with the accuser's own key"

    # ---- stage 4: consistency check --------------------------------------------------------------
    def consistency_request(self) -> ConsistencyRequest:
        """The same request for every survivor: the survivor set U3 it is asked to sign."""
        return ConsistencyRequest(round_id=self.round_id, survivors=tuple(self.alive()))

    def receive_signatures(self, replies: Mapping[int, bytes]) -> None:
        """Keep each survivor's consistency signature; one that is missing or (with a roster)
        does not verify is left out of the unmask request (its input stays in the sum). A site
        that refused or sent a bad signature is not asked to unmask; one that was only late
        still is (it reveals only if it signed meanwhile). Aborts when fewer than t survivors
        signed (without a roster: signed or were late): too few sites would reveal."""
        survivors = self.alive()
        for index in survivors:
            signature = replies.get(index)
            if signature is None:
                self.unsigned.setdefault(index, "no consistency reply")
                if index not in self.refused_consistency:
                    self.late_signers.add(index)
                continue
            if self.settings.roster:
                problem = self._consistency_problem(index, signature)
                if problem:
                    self.unsigned[index] = problem
                    continue
            self.signatures[index] = signature
        # With a roster a late survivor's signature is missing from every site's check; without
        # one, nothing is checked and a late survivor may still help.
        willing = len(self.signatures) + (0 if self.settings.roster else len(self.late_signers))
        if willing < self.threshold:
            raise RoundAborted(
                CONSISTENCY,
                f"{len(self.signatures)} survivors signed the survivor set, {self.threshold} "
                "needed: not unmasked",
            )

    def _consistency_problem(
        self, index: int, signature: bytes, survivors: Sequence[int] | None = None
    ) -> str:
        """Why ``signature`` is not ``index``'s over (this round, ``survivors`` (default: the
        sites alive now), its expected model and config); "" when it is."""
        model, config = self.expected_contribution.get(index, (b"", b""))
        survivors = self.alive() if survivors is None else survivors
        message = roster.consistency_message(self.round_id, index, survivors, model, config)
        if not roster.verify_signature(self.identities.get(index, b""), signature, message):
            return "its consistency signature does not verify"
        return ""

    # ---- stage 5: unmasking ----------------------------------------------------------------------
    def unmask_request(self) -> UnmaskRequest:
        """The same request for every helper: rebuild survivors' seeds and needed mask keys."""
        survivors = tuple(self.alive())
        kept = set(survivors)
        dropped = tuple(
            j for j in sorted(set(self.partners) - kept) if kept & set(self.partners[j])
        )
        signatures = {i: self.signatures[i] for i in survivors if i in self.signatures}
        return UnmaskRequest(
            round_id=self.round_id, survivors=survivors, dropped=dropped, signatures=signatures
        )

    def unmask_targets(self) -> list[int]:
        """Every site that shared keys and still answers (a declined site helps too), but a
        survivor that refused the consistency check or sent a bad signature."""
        return [
            i
            for i in sorted(self.partners)
            if i not in self.unreachable and (i not in self.unsigned or i in self.late_signers)
        ]

    def finish(self, replies: Mapping[int, UnmaskShares]) -> UnmaskedSum:
        """Rebuild the secrets from the shares, remove every leftover mask: the exact sum."""
        request = self.unmask_request()
        survivors, kept = request.survivors, set(request.survivors)
        seed_shares: dict[int, dict[int, int]] = {i: {} for i in survivors}
        key_shares: dict[int, dict[int, int]] = {j: {} for j in request.dropped}
        for holder, answer in sorted(replies.items()):
            self._collect(seed_shares, holder, answer.self_shares)
            self._collect(key_shares, holder, answer.key_shares)
        seeds = [
            self._rebuild(
                owner,
                seed_shares[owner],
                "self-mask seed",
                lambda s, o=owner: (
                    keys.commitment(self.round_id, o, s) == self.adverts[o].commitment
                ),
            )
            for owner in survivors
        ]
        pair_terms = []
        for owner in request.dropped:
            mask_private = self._rebuild(
                owner,
                key_shares[owner],
                "mask key",
                lambda s, o=owner: keys.public_key_of(s) == self.adverts[o].mask_key,
            )
            for survivor in (i for i in self.partners[owner] if i in kept):
                seed = keys.agree(
                    mask_private,
                    self.adverts[survivor].mask_key,
                    self.round_id,
                    keys.PURPOSE_MASK,
                    owner,
                    survivor,
                )
                pair_terms.append((survivor, owner, seed))
        total = np.zeros(self.vector_length, dtype=self.dtype)
        for index in survivors:
            np.add(total, self.inputs[index].vector, out=total)
        masking.remove_masks(total, seeds, pair_terms)
        return UnmaskedSum(
            ring_sum=total,
            survivors=survivors,
            weights={i: self.inputs[i].weight for i in survivors},
            clipped=sum(self.inputs[i].clipped for i in survivors),
        )

    def _collect(
        self, table: dict[int, dict[int, int]], holder: int, shares: Mapping[int, bytes]
    ) -> None:
        """File ``holder``'s shares by owner, ignoring any it cannot hold or was not asked."""
        for owner, blob in shares.items():
            if owner not in table or (holder != owner and holder not in self.graph[owner]):
                continue
            try:
                table[owner][holder] = shamir.share_from_bytes(blob)
            except shamir.ShareError:
                continue  # unusable; the remaining shares may still suffice

    def _rebuild(self, owner: int, shares: dict[int, int], what: str, valid) -> bytes:
        """A secret from ``threshold`` of ``shares`` that passes ``valid``, or abort the round.

        Candidates: first every window of t consecutive holders (cyclically, so one bad holder,
        the lowest included, is skipped by the next window), then random t-subsets, at most
        ``MAX_RECONSTRUCTION_TRIES`` in all. Holders whose shares do not lie on the rebuilt
        polynomial are recorded in ``bad_holders``.
        """
        t = self.threshold
        if len(shares) < t:
            raise RoundAborted(
                UNMASK,
                f"only {len(shares)} shares of site {owner}'s {what} came back, {t} needed",
            )
        candidates = _candidate_subsets(sorted(shares), t, owner)
        for tries, subset in enumerate(itertools.islice(candidates, MAX_RECONSTRUCTION_TRIES)):
            points = {h: shares[h] for h in subset}
            try:
                secret = shamir.reconstruct(points)
            except shamir.ShareError:
                continue
            if valid(secret):
                if tries:  # an earlier candidate failed: name the holders that do not fit
                    for holder in sorted(set(shares) - set(points)):
                        if shamir.evaluate_at(points, holder) != shares[holder]:
                            self.bad_holders.setdefault(holder, []).append(owner)
                return secret
        raise RoundAborted(UNMASK, f"the shares of site {owner}'s {what} do not rebuild it")


def _candidate_subsets(holders: list[int], t: int, owner: int):
    """t-subsets of ``holders`` to try: the m cyclic windows, then seeded random ones."""
    m = len(holders)
    seen: set[tuple[int, ...]] = set()
    for start in range(m):
        subset = tuple(sorted(holders[(start + j) % m] for j in range(t)))
        if subset not in seen:
            seen.add(subset)
            yield subset
    rng = random.Random(owner)
    while len(seen) < math.comb(m, t):
        subset = tuple(sorted(rng.sample(holders, t)))
        if subset not in seen:
            seen.add(subset)
            yield subset


def _bounded(text: str, limit: int = 120) -> str:
    """A reason a site sent, on one line and at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _advert_problem(advert: KeyAdvert, probe_private: bytes, round_id: bytes) -> str:
    """Why a key advertisement is unusable ("" when it is fine)."""
    for name, value, size in (
        ("encryption key", advert.enc_key, keys.KEY_BYTES),
        ("mask key", advert.mask_key, keys.KEY_BYTES),
        ("commitment", advert.commitment, 32),
    ):
        if not isinstance(value, bytes) or len(value) != size:
            return f"{name} is not {size} bytes"
    if advert.enc_key == advert.mask_key:
        return "the same public key for encryption and masks"
    for name, value in (("encryption key", advert.enc_key), ("mask key", advert.mask_key)):
        try:
            keys.agree(probe_private, value, round_id, b"probe", 0, 0)
        except keys.KeyAgreementError as error:
            return f"{name}: {error}"
    return ""
