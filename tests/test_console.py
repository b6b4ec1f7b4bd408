"""The governance console over a real registry and real runs, loaded in headless Chromium.

One module-scoped federation: ``fedgov demo`` run twice into one folder (the first run's folder
kept aside as ``run-1``, as an operator archiving runs would), the demo's versions approved and
promoted with the real registry CLI, and a third run with a lower cap in which some sites decline.
A real ``fedgov console`` process serves it; Chromium loads each page (DOM and screenshot); the
numbers it shows are checked against the JSON twins, the privacy reports' receipts and the
registry's own gate evaluation.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from processes import free_port, managed_processes

from console.pdf import chromium_path, dump_dom, screenshot
from fedgov_cli.main import main as fedgov_main
from privacy.accounting import epsilon, independent_epsilon
from privacy.receipts import Receipt

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = chromium_path()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it)"
)
MODEL = "randhie-mlp"
DECLINE_SIGMA = 1.0


# ---- the federation ------------------------------------------------------------------------------


def _decline_cap(sites_dir: Path) -> float:
    """A cap between the sites' ε after one more σ = 1 round: some sites decline, some train.

    Each site's next ε is computed from its own ledger's history (its q and steps per round)."""
    projected = []
    for ledger_path in sorted(sites_dir.glob("*/privacy_ledger.json")):
        spends = json.loads(ledger_path.read_text())["spends"]
        history = [[s["noise_multiplier"], s["sample_rate"], s["steps"]] for s in spends]
        _, rate, steps = history[-1]
        projected.append(epsilon([*history, [DECLINE_SIGMA, rate, steps]], 1e-5))
    assert len(projected) == 6 and max(projected) - min(projected) > 0.02, projected
    return round((min(projected) + max(projected)) / 2, 4)


def _console(group, name: str, out: Path, runs: Path, *extra: str) -> str:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "fedgov",
        "console",
        "--registry",
        str(out / "registry"),
        "--runs",
        str(runs),
        "--port",
        str(port),
        *extra,
    ]
    proc = group.start(name, argv, cwd=ROOT)
    group.wait_for_port(proc, port, timeout=120)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fedgov_cli.demo import DEMO_OVERRIDES, run_demo
    from simulations.run import compose_config, run_from_hydra

    base = tmp_path_factory.mktemp("console")
    out = base / "fed"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_demo(out, rounds=1)
    (out / "run").rename(out / "run-1")
    with contextlib.redirect_stdout(printed):
        run_demo(out, rounds=1)
    keys, registry = out / "keys", str(out / "registry")
    for argv in (
        [
            "registry",
            "approve",
            f"{MODEL}:1",
            "--key",
            str(keys / "alice.key"),
            "--comment",
            "clinically plausible",
            "--registry",
            registry,
        ],
        [
            "registry",
            "approve",
            f"{MODEL}:1",
            "--key",
            str(keys / "bob.key"),
            "--comment",
            "ε within budget",
            "--registry",
            registry,
        ],
        [
            "registry",
            "promote",
            f"{MODEL}:1",
            "--alias",
            "production",
            "--key",
            str(keys / "dana.key"),
            "--registry",
            registry,
        ],
        [
            "registry",
            "approve",
            f"{MODEL}:2",
            "--key",
            str(keys / "bob.key"),
            "--comment",
            "receipts checked",
            "--registry",
            registry,
        ],
    ):
        assert fedgov_main(argv) == 0, argv
    cap = _decline_cap(out / "sites")
    overrides = [o for o in DEMO_OVERRIDES if not o.startswith(("privacy.", "secagg"))]
    cfg = compose_config(
        [
            *overrides,
            "progress=false",
            "rounds=2",
            "secagg=off",
            "privacy.target_epsilon=0",
            f"privacy.noise_multiplier={DECLINE_SIGMA}",
            f"privacy.site_epsilon_cap={cap}",
            f"federation.sites_dir={out / 'sites'}",
        ]
    )
    declining = run_from_hydra(cfg, out / "declining")
    with managed_processes(base / "logs") as group:
        url = _console(group, "console", out, out)
        yield {
            "out": out,
            "url": url,
            "printed": printed.getvalue(),
            "declining": declining,
            "cap": cap,
            "group": group,
            "base": base,
        }


def _json(url: str, **headers: str) -> dict:
    response = httpx.get(url, headers={"Accept": "application/json", **headers}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    return response.json()


class Cells(HTMLParser):
    """Text of every element carrying ``data-field`` (keyed by its data-* attributes)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, ...], str] = {}
        self._open: list[tuple[tuple[str, ...], list[str]]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "data-field" in a:
            key = (a.get("data-site") or a.get("data-ref") or "", a["data-field"])
            self._open.append((key, []))

    def handle_data(self, data):
        for _, parts in self._open:
            parts.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._open:
            key, parts = self._open.pop()
            self.values[key] = "".join(parts).strip()


def _browser(url: str, shots: Path, name: str) -> str:
    """The DOM Chromium rendered for ``url``; a screenshot of it saved as ``shots/name.png``."""
    dom = dump_dom(url)
    shot = shots / f"{name}.png"
    screenshot(url, shot, 1280, 1400)
    assert shot.stat().st_size > 10_000
    return dom


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _receipts_by_site(out: Path) -> dict[str, list[dict]]:
    """Every receipt payload in every run folder's privacy report, by site (independently read)."""
    found: dict[str, list[dict]] = {}
    for report_path in sorted(out.glob("*/privacy_report.json")):
        report = json.loads(report_path.read_text())
        for site_id, site in report["sample_level"]["sites"].items():
            for data in site["receipts"] + site.get("decline_receipts", []):
                receipt = Receipt.from_json(data)
                assert receipt.verify()
                found.setdefault(site_id, []).append(receipt.payload)
    return found


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_demo_ends_by_printing_the_console_command(world):
    printed = world["printed"].rstrip().splitlines()
    assert printed[-1].strip().startswith("fedgov console --registry ")
    command = printed[-1].split()
    assert Path(command[command.index("--registry") + 1]).resolve() == world["out"] / "registry"
    assert Path(command[command.index("--runs") + 1]).resolve() == world["out"]


@pytest.mark.slow
@needs_chromium
def test_the_federation_budget_in_chromium_matches_the_receipts(world, tmp_path):
    url, out = world["url"], world["out"]
    data = _json(f"{url}/")["budget"]
    dom = _browser(f"{url}/", tmp_path, "federation")
    cells = Cells()
    cells.feed(dom)
    receipts = _receipts_by_site(out)
    assert (
        sorted(s["site"] for s in data["sites"])
        == sorted(receipts)
        == [f"site-{i}" for i in range(1, 7)]
    )
    declining = world["declining"]["rounds"]
    assert any(r["declined"] for r in declining) and all(r["participants"] for r in declining)
    for site in data["sites"]:
        name = site["site"]
        payloads = receipts[name]
        trained = [p for p in payloads if p["kind"] == "dp-sgd"]
        # ε spent = the latest cumulative ε the site signed, recomputed independently
        latest = max(payloads, key=lambda p: len(p["history"]) and sum(e[2] for e in p["history"]))
        spent = max(p["epsilon"] for p in payloads)
        assert spent == pytest.approx(independent_epsilon(latest["history"], 1e-5), rel=0.01)
        assert site["epsilon"] == pytest.approx(spent, rel=1e-12)
        assert site["cap"] == world["cap"] and site["delta"] == 1e-5
        assert site["remaining"] == pytest.approx(max(world["cap"] - spent, 0.0))
        declined = sum(name in r["declined"] for r in declining)
        assert site["rounds"]["trained"] == len(trained) == 2 + 2 - declined
        assert site["rounds"]["declined"] == declined
        if declined:
            assert "privacy budget exhausted" in next(iter(site["reasons"]["declined"]))
        assert site["failed_receipts"] == 0 and len(site["signing_keys"]) == 1
        # what Chromium shows is what the JSON twin says
        assert cells.values[(name, "epsilon")] == _fmt(site["epsilon"])
        assert cells.values[(name, "cap")] == _fmt(site["cap"])
        assert cells.values[(name, "remaining")] == _fmt(site["remaining"])
        assert cells.values[(name, "declined")] == str(declined)
        assert cells.values[(name, "trained")] == str(len(trained))
    assert '<svg id="epsilon-chart"' in dom
    assert dom.count('class="site-line"') == 6
    # the chart's x axis: run-1's round, run's round, then the declining run's two rounds
    assert [(s["run"], s["round"]) for s in data["steps"]] == [
        ("run-1", 1),
        ("run", 1),
        ("declining", 1),
        ("declining", 2),
    ]


@pytest.mark.slow
@needs_chromium
def test_runs_pages_show_guarantees_participation_and_report_links(world, tmp_path):
    url = world["url"]
    runs = _json(f"{url}/runs")["runs"]
    assert [r["key"] for r in runs] == ["run-1", "run", "declining"]
    dom = _browser(f"{url}/runs", tmp_path, "runs")
    assert dom.count('href="/runs/') >= 3
    declining = _json(f"{url}/runs/declining")
    assert declining["privacy"]["guarantees"]["secure_aggregation"] is False
    dom = _browser(f"{url}/runs/declining", tmp_path, "run-declining")
    assert "secure aggregation off" in dom and "accountant RDP" in dom
    for record in world["declining"]["rounds"]:
        for site, reason in record["decline_reasons"].items():
            cell = declining["participation"][site][str(record["round"])]
            assert cell == {"status": "declined", "reason": reason}
            assert re.search(
                rf'data-site="{site}" data-round="{record["round"]}" title="[^"]*budget[^"]*"'
                r">declined<",
                dom,
            )
        for site in record["participants"]:
            assert declining["participation"][site][str(record["round"])]["status"] == "trained"
    demo_run = _json(f"{url}/runs/run")
    assert demo_run["privacy"]["guarantees"]["secure_aggregation"] is True
    assert demo_run["privacy"]["verification"]["ok"] is True
    # the report links answer: a fresh re-verification rendered as HTML and Markdown
    for name in ("privacy_report.html", "privacy_report.md", "privacy_report.json"):
        response = httpx.get(f"{url}/runs/run/files/{name}", timeout=120)
        assert response.status_code == 200 and len(response.content) > 500, name
    html_report = httpx.get(f"{url}/runs/run/files/privacy_report.html", timeout=120).text
    assert 'Verification <span class="ok">passed</span>' in html_report


@pytest.mark.slow
@needs_chromium
def test_models_pages_show_gates_approvals_and_audit_as_the_registry_evaluates_them(
    world, tmp_path
):
    from server.registry.governance import version_status
    from server.registry.registry import Registry

    url, out = world["url"], world["out"]
    models = _json(f"{url}/models")
    # the demo's log: policy version 1, two publishes, the approvals and the promotion
    assert models["audit"]["ok"] is True and models["audit"]["entries"] == 7
    model = models["models"][0]
    assert model["aliases"]["production"]["version"] == 1
    assert [(p["alias"], p["version"], p["by"]) for p in model["alias_history"]] == [
        ("production", 1, "dana")
    ]
    registry = Registry(out / "registry")
    policy = registry.load_policy()
    with registry.store.read() as session:
        expected = {
            v.version: version_status(registry, session, v, policy)
            for v in registry.store.versions(session)
        }
    registry.close()
    dom = _browser(f"{url}/models", tmp_path, "models")
    assert 'class="ok">intact<' in dom
    for version in model["versions"]:
        status = expected[version["version"]]
        assert {a: g["passed"] for a, g in version["gates"].items()} == {
            a: g["passed"] for a, g in status["gates"].items()
        }
        assert {a: g["results"] for a, g in version["gates"].items()} == {
            a: g["results"] for a, g in status["gates"].items()
        }
        assert [(d["principal"], d["comment"]) for d in version["decisions"]] == [
            (d["principal"], d["comment"]) for d in status["decisions"]
        ]
    v2 = _json(f"{url}/models/{MODEL}/2")["version"]
    production = v2["gates"]["production"]
    assert production["passed"] is False and production["approvers"] == ["bob"]
    assert production["awaiting"] == ["alice", "carol"]  # bob approved; one more is needed
    dom = _browser(f"{url}/models/{MODEL}/2", tmp_path, "version-2")
    assert "1 of 2 required approvals (bob)" in dom
    assert "Still to approve (any of): alice, carol" in dom
    assert "receipts checked" in dom  # bob's comment
    v1 = _json(f"{url}/models/{MODEL}/1")["version"]
    assert v1["gates"]["production"]["passed"] is True
    dom = _browser(f"{url}/models/{MODEL}/1", tmp_path, "version-1")
    assert "all gates met" in dom and "clinically plausible" in dom


@pytest.mark.slow
@needs_chromium
def test_the_privacy_statement_renders_as_html_and_pdf_with_the_epsilons(world, tmp_path):
    url, out = world["url"], world["out"]
    statement = _json(f"{url}/models/{MODEL}/1/statement")
    report = json.loads((out / "run-1" / "privacy_report.json").read_text())
    sites = report["sample_level"]["sites"]
    assert [s["site"] for s in statement["sites"]] == sorted(sites)
    for site in statement["sites"]:
        assert site["epsilon"] == sites[site["site"]]["epsilon"]
        assert site["receipts_verified"] == site["receipts"] == 1
    assert [(a["principal"], a["decision"]) for a in statement["approvals"]] == [
        ("alice", "approve"),
        ("bob", "approve"),
    ]
    assert statement["receipts"]["ok"] is True
    dom = _browser(f"{url}/models/{MODEL}/1/statement", tmp_path, "statement")
    for site_id, site in sites.items():
        assert f'data-field="epsilon">{site["epsilon"]:.3f}<' in dom, site_id
    response = httpx.get(f"{url}/models/{MODEL}/1/statement.pdf", timeout=180)
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
    pdf = tmp_path / "statement.pdf"
    pdf.write_bytes(response.content)
    assert response.content.startswith(b"%PDF-")
    if not shutil.which("pdftotext"):
        pytest.skip("pdftotext (poppler-utils) is absent: `make chromium` installs it as root")
    text = subprocess.run(
        ["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True
    ).stdout
    for site in sites.values():
        assert f"{site['epsilon']:.3f}" in text
    assert "alice" in text and "bob" in text and f"{MODEL}:1" in text


@pytest.mark.slow
def test_metrics_expose_each_sites_epsilon_and_remaining_budget(world):
    from prometheus_client.parser import text_string_to_metric_families

    url = world["url"]
    sites = {s["site"]: s for s in _json(f"{url}/")["budget"]["sites"]}
    text = httpx.get(f"{url}/metrics", timeout=60).text
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for name, site in sites.items():
        spent = values[("fedgov_site_epsilon_spent", (("delta", "1e-05"), ("site", name)))]
        assert spent == pytest.approx(site["epsilon"])
        remaining = values[("fedgov_site_epsilon_remaining", (("site", name),))]
        assert remaining == pytest.approx(site["remaining"])
        declined = values[("fedgov_site_rounds", (("site", name), ("status", "declined")))]
        assert declined == site["rounds"]["declined"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
@needs_chromium
def test_a_tampered_receipt_shows_as_failed_and_is_not_counted(world, tmp_path):
    out = world["out"]
    copy = tmp_path / "fed"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint.pkl"))
    report_path = copy / "declining" / "privacy_report.json"
    report = json.loads(report_path.read_text())
    site = report["sample_level"]["sites"]["site-1"]
    forged = site["receipts"][-1]
    honest_epsilon = forged["payload"]["epsilon"]
    forged["payload"]["epsilon"] = honest_epsilon / 10  # the site "spent" far less
    report_path.write_text(json.dumps(report))
    before = _snapshot(copy)
    url = _console(world["group"], "console-tampered", copy, copy)
    budget = _json(f"{url}/")["budget"]
    failed = budget["failed_receipts"]
    assert [(f["site"], f["run"], f["round"]) for f in failed] == [
        ("site-1", "declining", forged["payload"]["round"])
    ]
    assert "signature does not verify" in " ".join(failed[0]["problems"])
    site_1 = next(s for s in budget["sites"] if s["site"] == "site-1")
    assert site_1["failed_receipts"] == 1
    # the forged ε is never used: ε spent comes from the verified receipts only
    honest = [
        p["epsilon"]
        for run in ("run-1", "run")
        for p in [
            Receipt.from_json(r).payload
            for r in json.loads((copy / run / "privacy_report.json").read_text())["sample_level"][
                "sites"
            ]["site-1"]["receipts"]
        ]
    ] + [Receipt.from_json(r).payload["epsilon"] for r in site["receipts"][:-1]]
    assert site_1["epsilon"] == max(honest) != forged["payload"]["epsilon"]
    dom = _browser(f"{url}/", tmp_path, "tampered")
    assert 'id="failed-receipts"' in dom and "FAILED: site-1 round" in dom
    run = _json(f"{url}/runs/declining")
    assert run["privacy"]["verification"]["ok"] is False
    assert run["privacy"]["verification"]["stored_ok"] is True
    run_dom = _browser(f"{url}/runs/declining", tmp_path, "tampered-run")
    assert "the file was changed after the run" in run_dom
    stale = httpx.get(f"{url}/runs/declining/files/privacy_report.html", timeout=120).text
    assert 'Verification <span class="bad">FAILED</span>' in stale  # re-verified, not the file's
    # the console wrote nothing anywhere in the registry or the runs
    assert _snapshot(copy) == before


@pytest.mark.slow
def test_a_token_protects_every_page_and_a_wrong_one_gets_one_message(world, tmp_path):
    token = "s3cret-" + "x" * 30
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    out = world["out"]
    url = _console(world["group"], "console-token", out, out, "--token-file", str(token_file))
    for path in ("/", "/runs", "/models", f"/models/{MODEL}/1", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            response = httpx.get(url + path, headers=headers, timeout=60)
            assert response.status_code == 401, (path, headers)
            assert "wrong or missing token" in response.text
            assert token not in response.text
        response = httpx.get(url + path, headers={"Authorization": f"Bearer {token}"}, timeout=120)
        assert response.status_code == 200, path
    # a browser's Basic auth prompt: any user name, the token as password
    basic = base64.b64encode(f"officer:{token}".encode()).decode()
    assert httpx.get(url + "/runs", headers={"Authorization": f"Basic {basic}"}).status_code == 200
    answer = httpx.get(url + "/runs", headers={"Accept": "application/json"})
    assert answer.status_code == 401 and list(answer.json()) == ["error"]
    assert answer.headers["www-authenticate"].startswith("Basic")


@pytest.mark.slow
def test_bad_input_is_one_clear_message_and_never_a_crash(world, tmp_path):
    out = world["out"]
    runs = tmp_path / "runs"
    shutil.copytree(out / "run", runs / "good", ignore=shutil.ignore_patterns("*.safetensors"))
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text('{"rounds": [')
    registry = tmp_path / "fed" / "registry"
    shutil.copytree(out / "registry", registry)
    database = sqlite3.connect(registry / "registry.db")
    database.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2")
    database.commit()
    database.close()
    url = _console(world["group"], "console-bad", registry.parent, runs)
    listed = _json(f"{url}/runs")["runs"]
    broken = next(r for r in listed if r["key"] == "broken")
    assert broken["error"].endswith("a file is not valid JSON (line 1: Expecting value)")
    assert "good" in [r["key"] for r in listed]
    page = httpx.get(f"{url}/runs/broken", timeout=60)
    assert (
        page.status_code == 200 and "not valid JSON" in page.text and "Traceback" not in page.text
    )
    budget = _json(f"{url}/")["budget"]
    assert [u["run"] for u in budget["unreadable_runs"]] == ["broken"]
    assert len(budget["sites"]) == 6
    models = _json(f"{url}/models")
    assert models["audit"]["ok"] is False
    assert any("content does not match its hash (edited)" in p for p in models["audit"]["problems"])
    assert 'Audit chain: <span class="bad">FAILED</span>' in httpx.get(f"{url}/models").text
    missing = httpx.get(f"{url}/models/{MODEL}/9", headers={"Accept": "application/json"})
    assert missing.status_code == 404
    assert missing.json() == {"error": f"{MODEL}:9 does not exist (latest is 2)"}
    assert httpx.get(f"{url}/runs/..%2F..%2Fetc").status_code == 404
    assert httpx.post(f"{url}/runs").status_code == 405
    with pytest.raises(SystemExit) as help_exit:
        fedgov_main(["console", "--help"])
    assert help_exit.value.code == 0
    # the command line: a missing folder or a bad token file is one line, exit status 2
    for argv, message in (
        (["--registry", str(registry), "--runs", str(tmp_path / "nope")], "--runs: "),
        (
            [
                "--registry",
                str(registry),
                "--runs",
                str(runs),
                "--token-file",
                str(tmp_path / "none"),
            ],
            "--token-file: ",
        ),
        (["--registry", str(registry), "--runs", str(runs), "--host", "0.0.0.0"], "--host 0.0.0.0"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "fedgov", "console", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith(f"fedgov: error: {message}")
