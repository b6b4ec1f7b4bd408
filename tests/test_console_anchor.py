"""The console's models pages against a checkpoint kept outside the registry (``--anchor``):
a chain that extends it says so; the same chain with its last entry cut off (the head set back,
as an insider would) is shown as failed, naming the check; an unusable anchor file is one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from registry_support import (
    insider_cut_last_rejection,
    make_governance,
    privacy_report,
    publish_toy,
)

from console.pages import Sources
from console.render import models_html
from server.registry.checkpoint import write_checkpoint
from server.registry.governance import checkpoint, decide
from server.registry.manifest import parse_ref
from server.registry.registry import Registry


@pytest.fixture
def governed(tmp_path: Path):
    """A governed registry with one version approved by alice and rejected by bob, and a
    checkpoint of its head written outside the registry."""
    governance = make_governance(tmp_path)
    registry = Registry(governance.registry_path)
    try:
        publish_toy(registry, governance.keys["server"], report=privacy_report(3.0))
        for name, decision in (("alice", "approve"), ("bob", "reject")):
            policy = registry.load_policy()
            decide(registry, parse_ref("toy-mlp:1"), decision, governance.keys[name], policy)
        anchor = tmp_path / "outside" / "checkpoint.json"
        anchor.parent.mkdir()
        write_checkpoint(anchor, checkpoint(registry, governance.keys["alice"]))
    finally:
        registry.close()
    runs = tmp_path / "runs"
    runs.mkdir()
    return governance, anchor, runs


def test_a_chain_that_extends_the_anchor_says_so(governed):
    governance, anchor, runs = governed
    models = Sources(governance.registry_path, runs, anchor).models()
    audit = models["audit"]
    assert audit["ok"] is True and audit["problems"] == []
    assert audit["anchor"]["extends"] is True and audit["anchor"]["signer"] == "alice"
    assert audit["anchor"]["seq"] == audit["head_seq"]
    assert "Extends the checkpoint</span> of entry" in models_html(models)
    # without an anchor the page says that nothing outside the registry was checked
    plain = Sources(governance.registry_path, runs).models()
    assert plain["audit"]["anchor"] is None
    assert "No checkpoint given" in models_html(plain)


def test_entries_cut_off_the_end_fail_against_the_anchor(governed):
    governance, anchor, runs = governed
    last = insider_cut_last_rejection(governance.registry_path / "registry.db")
    # Without the anchor the shortened log is consistent: what anchors are for.
    assert Sources(governance.registry_path, runs).models()["audit"]["ok"] is True
    models = Sources(governance.registry_path, runs, anchor).models()
    audit = models["audit"]
    assert audit["ok"] is False and audit["anchor"]["extends"] is False
    assert any(
        f"check anchor-extends: the log ends at entry {last - 1}" in problem
        for problem in audit["problems"]
    ), audit["problems"]
    page = models_html(models)
    assert "FAILED" in page and "Not shown to extend the checkpoint" in page


def test_an_unusable_anchor_file_is_one_line_on_the_page(governed, tmp_path):
    governance, _, runs = governed
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    audit = Sources(governance.registry_path, runs, broken).models()["audit"]
    assert audit["ok"] is False
    assert audit["problems"] == [f"--anchor: {broken} is not a JSON checkpoint file"]
