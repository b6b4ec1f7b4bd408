"""Privacy budget reports: the JSON document, its verification, HTML/Markdown, the CLI, Chromium.

The report is built from real signed receipts (the same functions a site uses), then verified from
its own content; tampering with any ε, history or signature must make verification fail.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from console.pdf import chromium_args, chromium_path
from privacy.accounting import epsilon, independent_epsilon
from privacy.receipts import create_site_key, sign
from privacy.report import render_html, render_markdown, report_document, verify_report

ROOT = Path(__file__).resolve().parent.parent
DELTA = 1e-5


def _site_receipts(key, site: str, sigma: float, rate: float, steps: int, rounds: int, cap: float):
    receipts, declines, history = [], [], []
    for server_round in range(1, rounds + 1):
        proposed = [*history, [sigma, rate, steps]]
        spent_after = epsilon(proposed, DELTA)
        if spent_after > cap:
            payload = {
                "kind": "decline",
                "site": site,
                "run": "r1",
                "round": server_round,
                "reason": "privacy budget exhausted",
                "delta": DELTA,
                "accountant": "rdp",
                "epsilon": epsilon(history, DELTA),
                "epsilon_requested": spent_after,
                "cap": cap,
                "history": history,
            }
            declines.append(
                {
                    "round": server_round,
                    "reason": "privacy budget exhausted",
                    "epsilon_spent": epsilon(history, DELTA),
                    "cap": cap,
                    "receipt": sign(key, payload).to_json(),
                }
            )
            continue
        history = [[sigma, rate, steps * server_round]]
        payload = {
            "kind": "dp-sgd",
            "site": site,
            "run": "r1",
            "round": server_round,
            "steps": steps,
            "noise_multiplier": sigma,
            "sample_rate": rate,
            "max_grad_norm": 1.0,
            "delta": DELTA,
            "accountant": "rdp",
            "epsilon": spent_after,
            "cap": cap,
            "history": history,
        }
        receipts.append(sign(key, payload).to_json())
    return {"receipts": receipts, "declines": declines}


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    sites = {
        "hospital-a": _site_receipts(
            create_site_key(keys / "a"), "hospital-a", 1.0, 0.04, 25, 5, 3.0
        ),
        "hospital-b": _site_receipts(
            create_site_key(keys / "b"), "hospital-b", 1.2, 0.02, 50, 5, 3.0
        ),
    }
    site_rounds = [
        {
            "round": r,
            "sampled": 2,
            "contributed": 2,
            "sample_rate": 0.5,
            "noise_multiplier": 1.1,
            "aborted": False,
            "note": "",
        }
        for r in range(1, 6)
    ]
    return report_document(
        run_id="r1",
        rounds=5,
        delta=DELTA,
        accountant="rdp",
        secure_aggregation=False,
        sample_level={
            "noise_multiplier": 1.0,
            "target_epsilon": 0.0,
            "max_grad_norm": 1.0,
            "grad_sample_mode": "fused",
            "sites": sites,
        },
        site_level={
            "clipping_norm": 1.0,
            "noise_multiplier": 1.1,
            "sampling": "poisson",
            "rounds": site_rounds,
        },
    )


def test_report_has_the_contract_keys_and_every_epsilon_reproduces(document):
    assert document["delta"] == DELTA and document["secure_aggregation"] is False
    sites = document["sample_level"]["sites"]
    assert document["sample_level"]["accountant"] == "rdp"
    a = sites["hospital-a"]
    assert a["cap"] == 3.0 and a["declined_rounds"] == [4, 5]
    assert a["epsilon"] <= a["cap"]
    for site in sites.values():
        assert site["epsilon"] == pytest.approx(
            independent_epsilon(site["history"], DELTA), rel=0.01
        )
    site_level = document["site_level"]
    assert site_level["history"] == [[1.1, 0.5, 5]]
    assert site_level["epsilon"] == pytest.approx(
        independent_epsilon([(1.1, 0.5, 5)], DELTA), rel=0.01
    )
    assert site_level["epsilon_if_participation_is_public"] > site_level["epsilon"]
    verification = document["verification"]
    assert verification["ok"], verification["problems"]
    assert verification["receipts_checked"] == 3 + 2 + 5  # a: 3 trained + 2 declines; b: 5
    assert verification["max_relative_difference"] < 0.01


def _mutated(document, change):
    mutated = copy.deepcopy(document)
    change(mutated)
    return verify_report(mutated)


def test_tampering_with_a_report_is_detected(document):
    def lower_epsilon(d):
        d["sample_level"]["sites"]["hospital-b"]["receipts"][2]["payload"]["epsilon"] = 0.1

    def shorten_history(d):
        receipt = d["sample_level"]["sites"]["hospital-b"]["receipts"][-1]["payload"]
        receipt["history"] = [[1.2, 0.02, 1]]

    def other_key(d):
        d["sample_level"]["sites"]["hospital-b"]["receipts"][0]["public_key"] = d["sample_level"][
            "sites"
        ]["hospital-a"]["receipts"][0]["public_key"]

    def site_level_epsilon(d):
        d["site_level"]["epsilon"] = 0.5

    for change, words in (
        (lower_epsilon, "signature does not verify"),
        (shorten_history, "signature does not verify"),
        (other_key, "signature does not verify"),
        (site_level_epsilon, "site level: ε 0.5"),
    ):
        result = _mutated(document, change)
        assert not result["ok"]
        assert any(words in problem for problem in result["problems"]), result["problems"]


def test_a_site_that_signs_its_own_lies_is_caught(document, tmp_path):
    """A valid signature does not make a receipt true: each lie a site's own key signs (an ε
    below its history's, another run's receipt, a history that restarts, ε above its cap) is
    one problem line naming the site and round; the honest sites stay verified."""
    key = create_site_key(tmp_path / "c")
    honest = [[1.2, 0.02, 50]]
    lies = {
        1: {"epsilon": 0.01, "history": honest},
        2: {"run": "r0", "history": [[1.2, 0.02, 100]]},
        3: {"history": [[1.0, 0.05, 1]]},  # does not extend round 2's
        4: {"cap": 0.001, "history": [[1.0, 0.05, 1], [1.2, 0.02, 50]]},
    }
    receipts = []
    for server_round, lie in lies.items():
        payload = {
            "kind": "dp-sgd",
            "site": "hospital-c",
            "run": "r1",
            "round": server_round,
            "delta": DELTA,
            "accountant": "rdp",
            "cap": 3.0,
            **lie,
        }
        payload.setdefault("epsilon", epsilon(payload["history"], DELTA))
        receipts.append(sign(key, payload).to_json())
    mutated = copy.deepcopy(document)
    top = max(r["payload"]["epsilon"] for r in receipts)
    mutated["sample_level"]["sites"]["hospital-c"] = {"receipts": receipts, "epsilon": top}
    result = verify_report(mutated)
    assert result["sites_verified"] == {"hospital-a": True, "hospital-b": True, "hospital-c": False}
    problems = [p for p in result["problems"] if p.startswith("hospital-c")]
    expected = (
        ("hospital-c round 1: ε 0.01 but its history gives", 1),
        ("hospital-c round 1: independent accountant gives", 1),
        ("hospital-c round 2: receipt of run r0, not of this run", 1),
        ("hospital-c round 3: history does not extend the previous receipt's", 1),
        ("hospital-c round 4: ε", 1),
    )
    for start, count in expected:
        assert sum(p.startswith(start) for p in problems) == count, problems
    assert any(p.endswith("above the site's cap 0.001") for p in problems), problems
    assert len(problems) == 5, problems
    assert result["receipts_checked"] == document["verification"]["receipts_checked"] + 4


def test_the_first_paragraph_speaks_plainly(document):
    summary = document["summary"]
    first = summary.split(". ")[0]
    assert "protect every individual record" in first
    for words in (
        "limit of 3.00",
        "smaller is more private",
        "hospital-a",
        "stopped contributing",
        "each site as a whole",
        "receipts were verified",
        "Secure aggregation was off",
    ):
        assert words in summary, words
    assert "Rényi" not in summary and "RDP" not in summary  # no jargon up front


def test_html_is_self_contained_with_the_plot_embedded(document):
    page = render_html(document)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page)
    assert "<script" not in page
    match = re.search(r'<img id="budget-plot"[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert match
    png = base64.b64decode(match.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    markdown = render_markdown(document)
    assert markdown.splitlines()[2] == document["summary"]
    assert "| hospital-a | 2.99 | 3.00 |" in markdown or "| hospital-a |" in markdown


def _write_run(tmp_path: Path, document) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "privacy_report.json").write_text(json.dumps(document))
    return run


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedgov", "privacy", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_every_format_and_fails_a_tampered_report(tmp_path, document, capsys):
    from fedgov_cli.main import main

    run = _write_run(tmp_path, document)
    assert main(["privacy", "report", str(run), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["ok"] is True
    assert main(["privacy", "report", str(run)]) == 0
    assert capsys.readouterr().out.startswith("# Privacy budget report")
    out = tmp_path / "report.html"
    assert main(["privacy", "report", str(run), "--format", "html", "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")

    tampered = copy.deepcopy(document)
    tampered["sample_level"]["sites"]["hospital-a"]["receipts"][0]["payload"]["epsilon"] = 0.01
    (run / "privacy_report.json").write_text(json.dumps(tampered))
    assert main(["privacy", "report", str(run), "--format", "md"]) == 1
    error = capsys.readouterr().err
    assert "verification FAILED" in error and "hospital-a round 1" in error


def test_cli_errors_are_one_line(tmp_path):
    missing = _cli("report", str(tmp_path))
    assert missing.returncode == 2
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert lines == [
        f"fedgov: error: RUN_DIR: {tmp_path}/privacy_report.json does not exist (was privacy on "
        "in that run? privacy=sample_dp, site_dp or both)"
    ]
    help_text = _cli("report", "--help")
    assert help_text.returncode == 0 and "--format {html,json,md}" in help_text.stdout


CHROMIUM = chromium_path()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it)")
def test_headless_chromium_renders_the_report_with_its_plot(tmp_path, document):
    page = tmp_path / "privacy_report.html"
    page.write_text(render_html(document))
    dom = subprocess.run(
        [*chromium_args(tmp_path / "profile-dom"), "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert document["summary"][:80] in dom.stdout.replace("&amp;", "&")
    match = re.search(r'<img id="budget-plot"[^>]*src="data:image/png;base64,([^"]+)"', dom.stdout)
    assert match, "the rendered DOM has no plot"
    import matplotlib.image as mpimg

    plot = mpimg.imread(__import__("io").BytesIO(base64.b64decode(match.group(1))), format="png")
    assert plot.shape[0] > 200 and plot.shape[1] > 400 and plot[..., :3].std() > 0.05

    shot = tmp_path / "shot.png"
    screenshot = subprocess.run(
        [
            *chromium_args(tmp_path / "profile-shot"),
            "--window-size=1200,1400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert screenshot.returncode == 0 and shot.exists(), screenshot.stderr[-2000:]
    pixels = mpimg.imread(shot)[..., :3]
    # The plot sits below the summary and guarantee tables: its coloured lines must show up.
    coloured = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).sum(axis=2) > 0.3
    assert coloured.sum() > 500, "no coloured plot lines in the screenshot"
    assert pixels.std() > 0.05


def test_every_epsilon_in_the_report_is_reproduced_independently(document):
    """Each ε the report (and so the HTML, Markdown and CLI) prints, recomputed from the report's
    own parameters by an accountant that shares no code with Opacus, within 1%."""

    def close(value: float, history) -> None:
        expected = independent_epsilon(history, DELTA)
        assert abs(value - expected) <= 0.01 * expected + 1e-12, (value, expected, history)

    for site in document["sample_level"]["sites"].values():
        close(site["epsilon"], site["history"])
        receipts = [r["payload"] for r in site["receipts"]]
        close(
            site["epsilon_this_run"],
            [(p["noise_multiplier"], p["sample_rate"], p["steps"]) for p in receipts],
        )
        for row, payload in zip(
            [r for r in site["rounds"] if r["status"] == "trained"], receipts, strict=True
        ):
            close(row["epsilon"], payload["history"])
        for row in site["rounds"]:
            if row["status"] == "declined":
                close(row["epsilon"], site["history"])
    site_level = document["site_level"]
    for index, row in enumerate(site_level["rounds"], start=1):
        close(row["epsilon"], [(row["noise_multiplier"], row["sample_rate"], index)])
    close(site_level["epsilon"], site_level["history"])
    close(site_level["epsilon_if_participation_is_public"], [(1.1, 1.0, 5)])
