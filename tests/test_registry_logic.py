"""The registry's pure logic: canonical JSON, digests, signatures, the audit hash chain, gates."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.registry.audit import GENESIS_HASH, next_entry, verify_chain
from server.registry.errors import PolicyError, RegistryError
from server.registry.manifest import (
    canonical_json,
    decision_message,
    manifest_digest,
    parse_ref,
    privacy_epsilon,
)
from server.registry.policy import Decision, evaluate_gates, parse_policy
from server.registry.signing import generate_key, verify_signature

KEYS = {name: generate_key() for name in ("server", "alice", "bob", "carol", "dana", "eve")}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


# ---- canonical JSON and digests -----------------------------------------------------------------


@given(st.dictionaries(st.text(max_size=6), json_values, max_size=6))
def test_canonical_json_round_trips_and_ignores_key_order(document):
    encoded = canonical_json(document)
    assert json.loads(encoded) == document
    assert canonical_json(json.loads(encoded)) == encoded  # stable through storage
    reordered = dict(reversed(list(document.items())))
    assert manifest_digest(reordered) == manifest_digest(document)


@given(st.dictionaries(st.text(min_size=1, max_size=6), st.integers(), min_size=1, max_size=6))
def test_any_changed_value_changes_the_digest(document):
    key = sorted(document)[0]
    changed = {**document, key: document[key] + 1}
    assert manifest_digest(changed) != manifest_digest(document)


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        canonical_json({"loss": float("nan")})


def test_a_decision_signature_binds_decision_model_version_and_digest():
    key = KEYS["alice"]
    message = decision_message("approve", "m", 1, "ab" * 32)
    signature = key.sign(message)
    assert verify_signature(key.public_key, message, signature)
    for other in (
        decision_message("reject", "m", 1, "ab" * 32),
        decision_message("approve", "m", 2, "ab" * 32),
        decision_message("approve", "n", 1, "ab" * 32),
        decision_message("approve", "m", 1, "cd" * 32),
    ):
        assert not verify_signature(key.public_key, other, signature)
    assert not verify_signature(KEYS["bob"].public_key, message, signature)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("randhie-mlp:3", ("randhie-mlp", 3, None)),
        ("m.v2@production", ("m.v2", None, "production")),
    ],
)
def test_references_parse(text, expected):
    ref = parse_ref(text)
    assert (ref.name, ref.version, ref.alias) == expected
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "m",
        "m:0",
        "m:x",
        "M:1",
        "m@Prod",
        ":1",
        "m@",
        "m:99999999999999999999999",  # beyond int64
        "m:9223372036854775808",  # 2**63
        "m:²",
        "m:１",  # fullwidth digit one
        "m:٣",  # Arabic-Indic three
        "evil\n:1",
        "evil\n@production",
        "m@production\n",
    ],
)
def test_bad_references_name_the_form(text):
    with pytest.raises(RegistryError, match="model reference") as error:
        parse_ref(text)
    assert "\n" not in str(error.value)  # one line, control characters escaped


def test_the_largest_int64_version_parses():
    assert parse_ref("m:9223372036854775807").version == 2**63 - 1


@pytest.mark.parametrize("name", ["evil\n", "evil\r", "a\x00b", "ünï", "a" * 65])
def test_model_names_with_control_or_other_characters_are_refused(name):
    from server.registry.manifest import check_name

    with pytest.raises(RegistryError, match="must be 1-64 of") as error:
        check_name(name)
    assert "\n" not in str(error.value) and "\x00" not in str(error.value)


# ---- the audit chain ----------------------------------------------------------------------------


def _chain(actions: list[str]):
    entries, head = [], None
    for i, action in enumerate(actions):
        key = KEYS[["server", "alice", "bob", "dana"][i % 4]]
        entry = next_entry(
            head,
            at=f"2026-01-01T00:00:{i:02d}Z",
            action=action,
            subject=f"m:{i}",
            actor="x",
            key=key,
            details={"i": i},
        )
        entries.append(entry)
        head = (entry.seq, entry.entry_hash)
    return entries, head


chains = st.lists(
    st.sampled_from(["publish", "approve", "reject", "promote", "serve_start"]),
    min_size=2,
    max_size=8,
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(chains)
def test_an_untouched_chain_verifies(actions):
    entries, head = _chain(actions)
    assert entries[0].prev_hash == GENESIS_HASH
    assert verify_chain(entries, head) == []


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.data())
def test_any_deleted_entry_is_detected(actions, data):
    entries, head = _chain(actions)
    index = data.draw(st.integers(0, len(entries) - 1))
    problems = verify_chain(entries[:index] + entries[index + 1 :], head)
    assert problems
    if index == len(entries) - 1:
        assert any("deleted from the end" in p for p in problems)
    else:
        assert any(f"entry {index + 1} missing" in p for p in problems)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.data())
def test_any_edited_entry_is_detected_even_rehashed(actions, data):
    entries, head = _chain(actions)
    index = data.draw(st.integers(0, len(entries) - 1))
    edited = replace(entries[index], details={"i": -1})
    tampered = [*entries[:index], edited, *entries[index + 1 :]]
    assert any(f"audit entry {index + 1}" in p and "edited" in p for p in verify_chain(tampered))
    # Re-hashing the edited entry (without its actor's key) breaks its signature instead.
    from server.registry.audit import entry_hash

    rehashed = replace(edited, entry_hash=entry_hash(edited.body()))
    tampered = [*entries[:index], rehashed, *entries[index + 1 :]]
    assert verify_chain(tampered, head)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(chains, st.data())
def test_any_reordering_is_detected(actions, data):
    entries, head = _chain(actions)
    i = data.draw(st.integers(0, len(entries) - 2))
    j = data.draw(st.integers(i + 1, len(entries) - 1))
    swapped = list(entries)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert verify_chain(swapped, head)
    # ... also when the sequence numbers are swapped along, so that they look in order.
    renumbered = [replace(e, seq=k + 1) for k, e in enumerate(swapped)]
    assert verify_chain(renumbered, head)


# ---- policy and gates ---------------------------------------------------------------------------


def _policy(**production):
    return parse_policy(
        {
            "principals": {
                "server": {"public_key": KEYS["server"].public_key, "roles": ["publisher"]},
                "alice": {"public_key": KEYS["alice"].public_key, "roles": ["clinical-lead"]},
                "bob": {"public_key": KEYS["bob"].public_key, "roles": ["privacy-officer"]},
                "carol": {"public_key": KEYS["carol"].public_key, "roles": ["data-steward"]},
                "dana": {"public_key": KEYS["dana"].public_key, "roles": ["release-manager"]},
            },
            "aliases": {
                "production": {
                    "quorum": 2,
                    "approver_roles": ["clinical-lead", "privacy-officer", "data-steward"],
                    **production,
                }
            },
        }
    )


def _manifest(epsilon=None, accuracy=0.8, secagg=True):
    report = None if epsilon is None else {"site_level": {"epsilon": epsilon}, "delta": 1e-5}
    return {
        "privacy_report": report,
        "metrics": {"final": {"central_eval_accuracy": accuracy}},
        "lineage": {"secure_aggregation": {"enabled": secagg}},
    }


def _gates(policy, decisions, manifest=None, promoter="dana"):
    report = evaluate_gates(
        policy,
        policy.rule("production"),
        manifest or _manifest(),
        decisions,
        policy.principal(promoter),
    )
    return {g.gate: g for g in report.results}, report


approvers = st.sampled_from(["alice", "bob", "carol", "dana", "server", "nobody"])
decision_lists = st.lists(
    st.tuples(approvers, st.sampled_from(["approve", "reject"])), max_size=10
).map(lambda pairs: [Decision(name, d, i) for i, (name, d) in enumerate(pairs)])


@given(decision_lists)
def test_quorum_counts_distinct_eligible_approvers_by_latest_decision(decisions):
    policy = _policy()
    gates, report = _gates(policy, decisions)
    latest = {}
    for d in decisions:
        latest[d.principal] = d.decision
    eligible = {"alice", "bob", "carol"}
    expected_approvers = sorted(n for n, d in latest.items() if n in eligible and d == "approve")
    assert report.approvers == expected_approvers
    assert gates["quorum"].passed == (len(expected_approvers) >= 2)
    rejecters = [n for n, d in latest.items() if n in eligible and d == "reject"]
    assert gates["rejections"].passed == (not rejecters)


@given(decision_lists, decision_lists)
def test_more_approvals_never_fail_a_passing_quorum(before, extra):
    policy = _policy()
    passed_before = _gates(policy, before)[0]["quorum"].passed
    approvals = [Decision(d.principal, "approve", 100 + d.order) for d in extra]
    passed_after = _gates(policy, [*before, *approvals])[0]["quorum"].passed
    assert passed_after or not passed_before


@given(st.floats(0, 20, allow_nan=False), st.floats(0, 20, allow_nan=False))
def test_the_epsilon_gate_holds_exactly_when_epsilon_is_at_most_the_maximum(epsilon, maximum):
    policy = _policy(gates={"max_epsilon": maximum})
    gates, _ = _gates(policy, [], _manifest(epsilon=epsilon))
    assert gates["max_epsilon"].passed == (epsilon <= maximum)


def test_the_epsilon_gate_refuses_a_run_without_a_privacy_report():
    gates, _ = _gates(_policy(gates={"max_epsilon": 8.0}), [], _manifest(epsilon=None))
    assert not gates["max_epsilon"].passed
    assert "no privacy report" in gates["max_epsilon"].detail


def test_the_gated_epsilon_is_the_largest_of_site_and_sample_level():
    report = {
        "site_level": {"epsilon": 2.0},
        "sample_level": {"sites": {"a": {"epsilon": 3.5}, "b": {"epsilon": 1.0}}},
    }
    assert privacy_epsilon(report) == 3.5
    assert privacy_epsilon({"site_level": None, "sample_level": None}) is None


def test_required_roles_promoter_metric_and_secure_aggregation_gates():
    policy = _policy(
        required_roles=["privacy-officer"],
        promoter_roles=["release-manager"],
        gates={"min_metrics": {"central_eval_accuracy": 0.9}, "require_secure_aggregation": True},
    )
    decisions = [Decision("alice", "approve", 1), Decision("carol", "approve", 2)]
    gates, report = _gates(policy, decisions, _manifest(accuracy=0.85, secagg=False), "alice")
    assert gates["quorum"].passed
    assert (
        not gates["required_roles"].passed and "privacy-officer" in gates["required_roles"].detail
    )
    assert not gates["promoter_roles"].passed
    assert not gates["min_metrics.central_eval_accuracy"].passed
    assert not gates["require_secure_aggregation"].passed
    assert not report.passed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["principals"]["alice"].update(public_key="ed25519:abc"), "principals.alice"),
        (lambda p: p["aliases"]["production"].update(quorum=4), "quorum: 4 exceeds the 3"),
        (lambda p: p["aliases"]["production"].update(qorum=2), "did you mean 'quorum'"),
        (lambda p: p["aliases"]["production"].update(approver_roles=["cfo"]), "role cfo"),
        (lambda p: p["aliases"]["production"].update(gates={"max_eps": 1}), "max_eps"),
    ],
)
def test_policy_mistakes_name_the_field(edit, message):
    data = {
        "principals": {
            "alice": {"public_key": KEYS["alice"].public_key, "roles": ["clinical-lead"]},
            "bob": {"public_key": KEYS["bob"].public_key, "roles": ["privacy-officer"]},
            "carol": {"public_key": KEYS["carol"].public_key, "roles": ["data-steward"]},
        },
        "aliases": {"production": {"quorum": 2}},
    }
    edit(data)
    with pytest.raises(PolicyError, match=message):
        parse_policy(data)


def test_the_example_policy_parses():
    from pathlib import Path

    from server.registry.policy import load_policy

    policy = load_policy(Path(__file__).resolve().parent.parent / "conf/registry/policy.yaml")
    rule = policy.rule("production")
    assert (rule.quorum, rule.max_epsilon, rule.require_secure_aggregation) == (2, 8.0, True)
    assert (policy.governance.quorum, len(policy.governance.signer_roles)) == (2, 3)
    with pytest.raises(RegistryError, match="not governed"):
        policy.rule("canary")
