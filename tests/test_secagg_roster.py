"""The federation roster: signed per-round keys and the consistency check, against a coordinator
that substitutes keys, invents sites, hands out an unsigned roster or different models.

The roster maths are tested directly; every attack runs through the real ClientApp and round
loop on the in-process wire, with real site folders (site_key.pem, the key that signs DP receipts;
secagg_anchor.json) and a roster signed by two of three governance keys.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid
from test_secagg_app import Federation, assert_exact, make_cfg

from clients.app import app as client_app
from fedgov import messages as keys
from fedgov.config import to_flower_config
from privacy.receipts import create_site_key, public_key_bytes
from privacy.secagg import keys as secagg_keys
from privacy.secagg import records, roster
from privacy.secagg import server as secagg_server

SETUP, SHARE, MASKED, CONSISTENCY, UNMASK, ABORT = (
    records.MESSAGE_TYPES[s] for s in records.MESSAGE_TYPES
)
SITES = ["site-00", "site-01", "site-02", "site-03"]


@pytest.fixture(autouse=True)
def server_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


GOVERNANCE = [Ed25519PrivateKey.generate() for _ in range(3)]


def _anchor(site_id: str) -> roster.TrustAnchor:
    return roster.TrustAnchor(site_id, tuple(public_key_bytes(k) for k in GOVERNANCE), 2)


# ---- the roster itself ---------------------------------------------------------------------------
def test_a_roster_needs_the_anchors_quorum_of_distinct_governance_signatures():
    sites = {"a": bytes(range(32)), "b": bytes(32)}
    anchor = _anchor("a")
    one = roster.sign_roster(roster.Roster(3, sites), GOVERNANCE[:1])
    with pytest.raises(roster.RosterError, match="1 valid governance signature"):
        roster.verify_roster(one, anchor)
    twice = roster.add_signatures(one, GOVERNANCE[:1])  # the same key again counts once
    with pytest.raises(roster.RosterError, match="1 valid"):
        roster.verify_roster(twice, anchor)
    stranger = roster.add_signatures(one, [Ed25519PrivateKey.generate()])
    with pytest.raises(roster.RosterError, match="1 valid"):
        roster.verify_roster(stranger, anchor)
    two = roster.add_signatures(one, GOVERNANCE[2:])
    assert roster.verify_roster(two, anchor).sites == sites
    with pytest.raises(roster.RosterError, match="older than v4"):
        roster.verify_roster(two, anchor, min_version=4)  # no rollback
    forged = two.replace(b'\\"version\\":3', b'\\"version\\":9')
    with pytest.raises(roster.RosterError):
        roster.verify_roster(forged, anchor)
    with pytest.raises(roster.RosterError, match="no roster"):
        roster.verify_roster(b"", anchor)


# ---- a federation with a roster ------------------------------------------------------------------
class RosterFederation(Federation):
    """Federation whose sites have a site folder, identity key and trust anchor."""

    def __init__(self, tmp: Path, n: int = 4, signers: int = 2, **overrides) -> None:
        cfg = make_cfg(n=n, **overrides)
        ids = [f"site-{i:02d}" for i in range(n)]
        identities = {}
        for site_id in ids:
            identities[site_id] = public_key_bytes(create_site_key(tmp / site_id))
            roster.save_anchor(tmp / site_id, _anchor(site_id))
        signed = roster.sign_roster(roster.Roster(1, identities), GOVERNANCE[:signers])
        (tmp / "roster.json").write_bytes(signed)
        cfg.secagg.roster = str(tmp / "roster.json")
        super().__init__(cfg)
        configs = [
            {"partition-id": i, "num-partitions": n, "site-dir": str(tmp / site_id)}
            for i, site_id in enumerate(ids)
        ]
        self.grid = InProcessGrid(client_app, configs, to_flower_config(cfg))
        self.grid.tamper_request = self._remember


def _watch(fed: Federation, message_type: str) -> dict[int, dict]:
    seen: dict[int, dict] = {}

    def watch(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == message_type and not reply.has_error():
            seen[reply.metadata.src_node_id] = dict(reply.content[records.SECAGG])
        return reply

    fed.grid.tamper = watch
    return seen


def test_with_a_roster_every_key_is_signed_and_the_sum_is_exact(tmp_path):
    fed = RosterFederation(tmp_path)
    adverts = _watch(fed, SETUP)
    record = fed.run().rounds[0]
    assert_exact(fed, record, SITES)
    assert record.secagg["signed_keys"] is True
    for node, advert in adverts.items():
        key = roster.roster_sites((tmp_path / "roster.json").read_bytes())[advert["site-id"]]
        message = roster.advert_message(
            advert["round-id"],
            advert["index"],
            advert["site-id"],
            advert["enc-key"],
            advert["mask-key"],
        )
        assert advert["site-id"] == SITES[node - 1]
        assert roster.verify_signature(key, advert["signature"], message)


def test_substituted_keys_are_refused_and_nothing_is_shared(tmp_path):
    """A coordinator in the middle hands every site its own keys for the peers."""
    fed = RosterFederation(tmp_path)
    _, attacker_public = secagg_keys.new_keypair()

    def substitute(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == SHARE:
            config = message.content[records.SECAGG]
            config["peer-enc-keys"] = [attacker_public] * len(config["peer-enc-keys"])
        return message

    fed.grid.tamper_request = substitute
    shared = _watch(fed, SHARE)
    record = fed.run().rounds[0]
    assert set(shared) == {1, 2, 3, 4}
    for reply in shared.values():
        assert "not signed by the roster key" in reply["refused"]
        assert "ciphertexts" not in reply
    assert record.aborted and record.abort_reason.startswith("share_keys: only 0 of 4")


def test_a_peer_the_roster_does_not_know_is_refused(tmp_path):
    fed = RosterFederation(tmp_path)

    def invent(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == SHARE and node_id == 1:
            config = message.content[records.SECAGG]
            config["peer-site-ids"] = ["site-99", *config["peer-site-ids"][1:]]
        return message

    fed.grid.tamper_request = invent
    shared = _watch(fed, SHARE)
    record = fed.run().rounds[0]
    assert "site 'site-99'" in shared[1]["refused"] and "ciphertexts" not in shared[1]
    assert_exact(fed, record, SITES[1:])  # the other three, who were told the truth


def test_a_roster_short_of_the_governance_quorum_is_refused_by_every_site(tmp_path):
    fed = RosterFederation(tmp_path, signers=1)
    adverts = _watch(fed, SETUP)
    record = fed.run().rounds[0]
    for reply in adverts.values():
        assert "1 valid governance signature(s), the trust anchor needs 2" in reply["refused"]
        assert "enc-key" not in reply
    assert record.aborted and record.abort_reason.startswith("setup:")


def test_a_site_with_an_anchor_refuses_a_run_without_a_roster(tmp_path):
    fed = RosterFederation(tmp_path)
    fed.cfg.secagg.roster = ""
    adverts = _watch(fed, SETUP)
    record = fed.run().rounds[0]
    assert all("no roster" in reply["refused"] for reply in adverts.values())
    assert record.aborted


def _other_model_for_node_1(fed: Federation):
    def tamper(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == MASKED and node_id == 1:
            arrays = message.content["arrays"]
            name = next(iter(arrays.keys()))
            changed = arrays[name].numpy() + np.float32(0.5)
            message.content["arrays"] = ArrayRecord(
                {k: (Array(changed) if k == name else arrays[k]) for k in arrays}
            )
        return message

    return tamper


def test_a_site_given_another_model_is_excluded_by_its_signed_statement(tmp_path):
    fed = RosterFederation(tmp_path)
    fed.grid.tamper_request = _other_model_for_node_1(fed)
    record = fed.run().rounds[0]
    assert "contribution statement does not verify" in record.dropouts["site-00"]["reason"]
    assert record.participants == SITES[1:]


def test_sites_refuse_to_reveal_when_a_survivor_signed_another_model(tmp_path, monkeypatch):
    """The coordinator gives site-00 another model and skips its own checks: the consistency
    check at every site stops the unmasking; nothing is revealed."""
    for check in ("_contribution_problem", "_consistency_problem"):
        monkeypatch.setattr(secagg_server.ServerSecAgg, check, lambda self, index, signed: "")
    fed = RosterFederation(tmp_path)
    fed.grid.tamper_request = _other_model_for_node_1(fed)
    unmask = _watch(fed, UNMASK)
    record = fed.run().rounds[0]
    assert set(unmask) == {1, 2, 3, 4}
    for node, reply in unmask.items():
        assert "seed-shares" not in reply and "key-shares" not in reply
        expected = "survivor 2 did not sign" if node == 1 else "survivor 1 did not sign"
        assert expected in reply["refused"], reply["refused"]
    assert record.aborted and record.abort_reason.startswith("unmask: only 0 shares")


# ---- the consistency check: one survivor set for everyone ----------------------------------------
VICTIM_NODE, X = 2, 4  # site-01 is told that site-03 (index 4) dropped; the others that it survived


@pytest.mark.parametrize("forged", [True, False], ids=["others-signatures", "own-only"])
def test_a_server_showing_two_survivor_sets_gets_no_share_of_the_dropped_claim(
    tmp_path, monkeypatch, forged
):
    """The coordinator runs the consistency check although every input came, tells site-01
    there that site-03 dropped out, and everyone else that it survived; then asks site-01 for
    site-03's mask key (which, with the others' shares of site-03's self mask, would unmask its
    input). site-01 signed the other set: it finds fewer than t valid signatures over it, and
    reveals nothing. The others' set completes the round exactly; no share of site-03's mask
    key ever leaves a site."""
    monkeypatch.setattr(  # the coordinator asks every site, signed or not
        secagg_server.ServerSecAgg, "unmask_targets", lambda self: sorted(self.partners)
    )
    monkeypatch.setattr(  # and asks for the consistency check although no site dropped
        secagg_server.ServerSecAgg, "_signed_early", lambda self: False
    )
    fed = RosterFederation(tmp_path)
    victim_signature: list[bytes] = []
    unmask: dict[int, dict] = {}

    def equivocate(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        kind = message.metadata.message_type
        if node_id == VICTIM_NODE and kind in (CONSISTENCY, UNMASK):
            request = message.content[records.SECAGG]
            survivors = [i for i in request["survivors"] if i != X]
            if kind == UNMASK:
                pairs = zip(request["survivors"], request["survivor-signatures"], strict=True)
                signatures = dict(pairs)
                signatures[2] = victim_signature[0]
                request["dropped"] = [X]
                request["survivor-signatures"] = [
                    signatures[i] if forged or i == 2 else b"" for i in survivors
                ]
            request["survivors"] = survivors
        return message

    def watch(request: Message, reply: Message) -> Message:
        kind = request.metadata.message_type
        if kind == CONSISTENCY and reply.metadata.src_node_id == VICTIM_NODE:
            victim_signature.append(reply.content[records.SECAGG]["signature"])
        if kind == UNMASK:
            unmask[reply.metadata.src_node_id] = dict(reply.content[records.SECAGG])
        return reply

    fed.grid.tamper_request, fed.grid.tamper = equivocate, watch
    record = fed.run().rounds[0]
    assert len(victim_signature[0]) == 64  # it signed the set it was shown
    assert set(unmask) == {1, 2, 3, 4}
    refused = unmask[VICTIM_NODE]
    assert "seed-shares" not in refused and "key-shares" not in refused
    if forged:
        assert "survivor 1 did not sign this round's survivor set" in refused["refused"]
    else:
        assert (
            "1 survivors of this site's share group signed this survivor set, 3 needed"
            in (refused["refused"])
        )
    for reply in unmask.values():
        assert X not in reply.get("key-share-owners", [])
    assert record.secagg["refused_at_unmask"] == {"site-01": "refused: " + refused["refused"]}
    assert_exact(fed, record, SITES)


def test_a_server_that_skips_the_check_and_shows_one_site_a_smaller_set_gets_nothing(tmp_path):
    """Every input came, so each site signed the full set with it; the coordinator shows
    site-01 at the unmasking a set without site-03 and asks for site-03's mask key, with no
    consistency check over that set. site-01 signed only the full set: it refuses; no share of
    site-03's mask key leaves it, and the others' full set completes the round exactly."""
    fed = RosterFederation(tmp_path)
    unmask: dict[int, dict] = {}

    def equivocate(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if node_id == VICTIM_NODE and message.metadata.message_type == UNMASK:
            request = message.content[records.SECAGG]
            pairs = zip(request["survivors"], request["survivor-signatures"], strict=True)
            kept = [(i, signature) for i, signature in pairs if i != X]
            request["survivors"] = [i for i, _ in kept]
            request["survivor-signatures"] = [signature for _, signature in kept]
            request["dropped"] = [X]
        return message

    def watch(request: Message, reply: Message) -> Message:
        if request.metadata.message_type == UNMASK:
            unmask[reply.metadata.src_node_id] = dict(reply.content[records.SECAGG])
        return reply

    fed.grid.tamper_request, fed.grid.tamper = equivocate, watch
    record = fed.run().rounds[0]
    assert record.secagg["consistency_signed_with_inputs"] is True
    refused = unmask[VICTIM_NODE]
    assert "seed-shares" not in refused and "key-shares" not in refused
    assert "unmask request out of order: this site expects consistency" in refused["refused"]
    for reply in unmask.values():
        assert X not in reply.get("key-share-owners", [])
    assert_exact(fed, record, SITES)


def test_a_survivor_whose_early_signature_is_missing_stops_every_reveal(tmp_path, monkeypatch):
    """The coordinator skips its own check of the early signatures and drops site-00's from
    the unmask request: on the early path every survivor of a share group must have signed, so
    no other site reveals anything (site-00 knows its own) and the round aborts."""
    monkeypatch.setattr(secagg_server.ServerSecAgg, "_consistency_problem", lambda *_: "")
    fed = RosterFederation(tmp_path)

    def strip(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == UNMASK:
            request = message.content[records.SECAGG]
            signatures = list(request["survivor-signatures"])
            signatures[0] = b""
            request["survivor-signatures"] = signatures
        return message

    unmask = _watch(fed, UNMASK)
    fed.grid.tamper_request = strip
    record = fed.run().rounds[0]
    assert set(unmask) == {1, 2, 3, 4}
    assert "refused" not in unmask[1]  # one site's shares: fewer than t = 3
    for node in (2, 3, 4):
        assert "seed-shares" not in unmask[node] and "key-shares" not in unmask[node]
        assert "survivor 1 did not sign, with its input" in unmask[node]["refused"]
    assert record.aborted


def test_with_a_roster_each_survivor_signs_the_survivor_set_and_the_sum_is_exact(tmp_path):
    """Each site signs, with its masked input, the set of sites asked for one; only that set
    verifies."""
    fed = RosterFederation(tmp_path, n=5)
    signed = _watch(fed, MASKED)
    config_digests: set[bytes] = set()

    def remember(node_id: int, message: Message) -> Message:
        fed._remember(node_id, message)
        if message.metadata.message_type == MASKED:
            config_digests.add(roster.config_digest(dict(message.content[keys.CONFIG])))
        return message

    fed.grid.tamper_request = remember
    record = fed.run().rounds[0]
    (train_config_digest,) = config_digests
    assert_exact(fed, record, [f"site-{i:02d}" for i in range(5)])
    identities = roster.roster_sites((tmp_path / "roster.json").read_bytes())
    global_digest = roster.model_digest(
        (name, fed.global_at[1][name].numpy()) for name in fed.global_at[1]
    )
    assert record.secagg["consistency_signed_with_inputs"] is True
    assert sorted(signed) == [1, 2, 3, 4, 5]
    for node, reply in signed.items():
        key = identities[f"site-{node - 1:02d}"]
        assert len(reply["early-signature"]) == 64
        for survivors in ([1, 2, 3, 4, 5], [1, 2, 3, 4]):  # only the set it was shown verifies
            message = roster.consistency_message(
                reply["round-id"], node, survivors, global_digest, train_config_digest
            )
            assert roster.verify_signature(key, reply["early-signature"], message) == (
                len(survivors) == 5
            )


# ---- the operators' path: fedgov roster ... ------------------------------------------------------
def test_the_cli_puts_sites_on_a_roster_that_a_secure_round_then_uses(tmp_path, capsys):
    from fedgov_cli.main import main

    members = [tmp_path / "gov" / f"member-{m}.pem" for m in range(3)]
    for member in members:
        assert main(["roster", "governance-key", "--out", str(member)]) == 0
    publics = [str(member.with_suffix(".pub")) for member in members]
    book = tmp_path / "roster.json"
    for site_id in SITES:
        site_dir = tmp_path / site_id
        anchor_args = [f"--governance-key={p}" for p in publics]
        assert (
            main(
                [
                    "roster",
                    "anchor",
                    "--site-dir",
                    str(site_dir),
                    "--site-id",
                    site_id,
                    "--quorum",
                    "2",
                    *anchor_args,
                ]
            )
            == 0
        )
        key_file = str(site_dir / "site_key.pub")
        assert (
            main(
                [
                    "roster",
                    "add",
                    "--roster",
                    str(book),
                    "--site-id",
                    site_id,
                    "--key",
                    key_file,
                    "--sign",
                    str(members[0]),
                ]
            )
            == 0
        )
    # one signature: below the quorum, every site refuses
    anchor_file = str(tmp_path / "site-00" / "secagg_anchor.json")
    assert main(["roster", "show", "--roster", str(book), "--anchor", anchor_file]) == 2
    assert "1 valid governance signature(s), the trust anchor needs 2" in capsys.readouterr().err
    assert main(["roster", "sign", "--roster", str(book), "--sign", str(members[2])]) == 0
    assert main(["roster", "show", "--roster", str(book), "--anchor", anchor_file]) == 0
    assert "v4: verified" in capsys.readouterr().out

    cfg = make_cfg()
    cfg.secagg.roster = str(book)
    fed = Federation(cfg)
    configs = [
        {"partition-id": i, "num-partitions": 4, "site-dir": str(tmp_path / site_id)}
        for i, site_id in enumerate(SITES)
    ]
    fed.grid = InProcessGrid(client_app, configs, to_flower_config(cfg))
    fed.grid.tamper_request = fed._remember
    assert_exact(fed, fed.run().rounds[0], SITES)


def _medpar_site_files(root: Path) -> tuple[Path, Path]:
    import yaml

    from fedgov.datasets import load_dataset, load_table

    root.mkdir(parents=True, exist_ok=True)
    table = load_table("medpar")
    hospital = table["provnum"].value_counts().index[0]
    data = root / "admissions.csv"
    table[table["provnum"] == hospital].drop(columns=["provnum"]).to_csv(data, index=False)
    schema = root / "schema.yaml"
    schema.write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    return data, schema


def _site_init_with_anchor(tmp_path: Path, anchor: Path) -> tuple[int, Path]:
    """`fedgov site init` of hosp-a (medpar rows) with ``--governance-anchor anchor``, through
    the real CLI: its exit code and the site folder."""
    from fedgov_cli.main import main

    data, schema = _medpar_site_files(tmp_path / "data")
    site_dir = tmp_path / "hosp-a"
    command = ["site", "init", "--site-id", "hosp-a", "--data", str(data), "--schema", str(schema)]
    command += ["--coordinator", "127.0.0.1:9092", "--out", str(site_dir)]
    return main([*command, "--governance-anchor", str(anchor)]), site_dir


def test_site_init_installs_the_governance_anchor_and_the_site_then_needs_its_quorum(
    tmp_path, capsys
):
    """A new site joins: governance publishes its keys and quorum, the site installs them at
    `fedgov site init`, governance puts the site's identity key on the roster; the site's own
    SecAgg+ code refuses that roster until the quorum signed it."""
    from flwr.app import Context, RecordDict

    from clients import secagg as client_secagg
    from fedgov_cli.main import main
    from privacy.secagg.protocol import ProtocolRefusal

    members = [tmp_path / "gov" / f"member-{m}.pem" for m in range(3)]
    for member in members:
        assert main(["roster", "governance-key", "--out", str(member)]) == 0
    published = tmp_path / "gov" / "governance-anchor.json"
    assert (
        main(
            [
                "roster",
                "governance-anchor",
                "--quorum",
                "2",
                "--out",
                str(published),
                *[f"--governance-key={m.with_suffix('.pub')}" for m in members],
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, site_dir = _site_init_with_anchor(tmp_path, published)
    assert code == 0
    out = capsys.readouterr().out
    identity = (site_dir / "site_key.pub").read_text().strip()
    assert f"send this identity key to governance (fedgov roster add): {identity}" in out
    anchor = roster.load_anchor(site_dir)
    assert anchor is not None and anchor.site_id == "hosp-a" and anchor.quorum == 2
    assert anchor.governance_keys == tuple(
        bytes.fromhex(m.with_suffix(".pub").read_text().strip()) for m in members
    )

    book = tmp_path / "roster.json"
    assert (
        main(
            [
                "roster",
                "add",
                "--roster",
                str(book),
                "--site-id",
                "hosp-a",
                "--key",
                str(site_dir / "site_key.pub"),
                "--sign",
                str(members[0]),
            ]
        )
        == 0
    )
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"site-dir": str(site_dir)},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ProtocolRefusal, match=r"1 valid governance signature.*needs 2"):
        client_secagg._roster_of(book.read_bytes(), context)
    assert main(["roster", "sign", "--roster", str(book), "--sign", str(members[1])]) == 0
    site_id, listed, key = client_secagg._roster_of(book.read_bytes(), context)
    assert site_id == "hosp-a" and listed == {"hosp-a": bytes.fromhex(identity)}
    assert key is not None and public_key_bytes(key).hex() == identity


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not json", "unreadable governance anchor"),
        (b'{"governance_keys": []}', "expected a JSON object with governance_keys and quorum"),
        (b'{"governance_keys": ["00"], "quorum": 1}', "distinct 32-byte keys"),
        (b'{"governance_keys": ["' + b"ab" * 32 + b'"], "quorum": 2}', "quorum 2 of 1 keys"),
    ],
)
def test_site_init_refuses_an_unusable_governance_anchor_in_one_line_and_writes_nothing(
    tmp_path, capsys, content, expected
):

    anchor_file = tmp_path / "anchor.json"
    anchor_file.write_bytes(content)
    code, site_dir = _site_init_with_anchor(tmp_path, anchor_file)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("fedgov: error: --governance-anchor: ") and expected in err
    assert not site_dir.exists()


def test_a_roster_mistake_is_one_line(tmp_path, capsys):
    from fedgov_cli.main import main

    assert main(["roster", "governance-key", "--out", str(tmp_path / "g.pem")]) == 0
    code = main(
        [
            "roster",
            "add",
            "--roster",
            str(tmp_path / "r.json"),
            "--site-id",
            "a",
            "--key",
            "nothex",
            "--sign",
            str(tmp_path / "g.pem"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == (
        "fedgov: error: --key: 'nothex' is not a 32-byte key in hex (or a file holding one)"
    )


@pytest.mark.parametrize(
    "action", ["governance-key", "governance-anchor", "anchor", "add", "sign", "show"]
)
def test_every_roster_command_has_help(action, capsys):
    from fedgov_cli.main import main

    with pytest.raises(SystemExit) as exit_status:
        main(["roster", action, "--help"])
    assert exit_status.value.code == 0
    assert f"usage: fedgov roster {action}" in capsys.readouterr().out
