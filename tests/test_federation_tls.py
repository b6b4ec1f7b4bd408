"""A real federation set up with fedgov's own commands: TLS, site keys, refusals, one run.

Coordinator and sites are started exactly as an operator would (``fedgov server certs``,
``fedgov server start``, ``fedgov site init``, ``fedgov server add-site``, ``fedgov site start``,
``fedgov run``), all on 127.0.0.1, and stopped by the ``processes`` fixture.
The sites run fedgov's default runtime (SuperNode + forking SuperExec, clients/daemon.py).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from processes import FEDGOV, fedgov, free_ports

from fedgov.datasets import load_dataset, load_table

pytestmark = pytest.mark.slow

SITES = ("hosp-30061", "hosp-30006")  # the two largest medpar hospitals


def _site_files(root: Path, site: str) -> tuple[Path, Path]:
    """The site's own CSV (its hospital's rows, raw units) and the published schema."""
    folder = root / "data" / site
    folder.mkdir(parents=True)
    table = load_table("medpar")
    rows = table[table["provnum"] == site].drop(columns=["provnum"])
    rows.to_csv(folder / "admissions.csv", index=False)
    (folder / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    return folder / "admissions.csv", folder / "schema.yaml"


def test_tls_federation_with_registered_sites(tmp_path, processes):
    link_port, metrics_port, *site_ports = free_ports(6)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    made = fedgov("server", "certs", "--out", "certs", "--host", "127.0.0.1", cwd=coordinator)
    assert made.returncode == 0, made.stderr
    (coordinator / "server.yaml").write_text(
        yaml.safe_dump({"federation": "hospitals", "host": "127.0.0.1", "port": link_port})
    )
    ca = coordinator / "certs" / "ca.crt"

    # Insecure mode only with the explicit flag.
    (coordinator / "insecure.yaml").write_text(
        yaml.safe_dump({"federation": "x", "port": link_port, "insecure": True})
    )
    refused = fedgov("server", "start", "--config", "insecure.yaml", cwd=coordinator)
    assert refused.returncode == 2
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith("insecure: true needs the explicit --insecure flag as well")
    )

    link = processes.start(
        "coordinator",
        [
            *FEDGOV,
            "server",
            "start",
            "--config",
            "server.yaml",
            "--metrics-port",
            str(metrics_port),
            "--log-format",
            "json",
        ],
        cwd=coordinator,
    )
    processes.wait_for_port(link, link_port, timeout=60)

    def init(site: str, port: int, ca_file: Path) -> Path:
        data, schema = _site_files(tmp_path, site)
        folder = tmp_path / "sites" / site
        result = fedgov(
            "site",
            "init",
            "--site-id",
            site,
            "--data",
            str(data),
            "--schema",
            str(schema),
            "--coordinator",
            f"127.0.0.1:{link_port}",
            "--ca",
            str(ca_file),
            "--port",
            str(port),
            "--out",
            str(folder),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        return folder

    registered = [init(site, port, ca) for site, port in zip(SITES, site_ports, strict=False)]
    for folder in registered:
        added = fedgov(
            "server",
            "add-site",
            str(folder / "keys" / "node.key.pub"),
            "--config",
            "server.yaml",
            cwd=coordinator,
        )
        assert added.returncode == 0, added.stderr
        assert "registered successfully" in added.stdout
    for folder in registered:
        processes.start(
            folder.name, [*FEDGOV, "site", "start", "--config", "site.yaml"], cwd=folder
        )

    # An unregistered key is refused, and so is a coordinator signed by another CA.
    stranger = init("hosp-30088", site_ports[2], ca)
    refused = fedgov("site", "start", "--config", "site.yaml", "--max-wait", "20", cwd=stranger)
    assert refused.returncode == 2
    assert "refused this site's key" in refused.stderr.strip().splitlines()[-1]

    other_ca = tmp_path / "other-ca"
    assert fedgov("server", "certs", "--out", str(other_ca), cwd=tmp_path).returncode == 0
    wrong_ca = init("hosp-30014", site_ports[3], other_ca / "ca.crt")
    refused = fedgov("site", "start", "--config", "site.yaml", "--max-wait", "20", cwd=wrong_ca)
    assert refused.returncode == 2
    assert "is not signed by" in refused.stderr.strip().splitlines()[-1]

    # A bad data file is caught before connecting, in one line.
    broken = tmp_path / "sites" / SITES[0] / "site.yaml"
    settings = yaml.safe_load(broken.read_text())
    settings["data"] = "missing.csv"
    (broken.parent / "bad.yaml").write_text(yaml.safe_dump(settings))
    checked = fedgov("site", "start", "--config", "bad.yaml", "--check", cwd=broken.parent)
    assert checked.returncode == 2
    assert "missing.csv" in checked.stderr.strip().splitlines()[-1]

    # The registered sites train: the same Hydra config a simulation uses.
    run_dir = tmp_path / "run"
    result = fedgov(
        "run",
        "--config",
        "server.yaml",
        "--out",
        str(run_dir),
        "dataset=medpar",
        "federation.num_sites=2",
        "rounds=1",
        "progress=false",
        cwd=coordinator,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:] + processes.logs_report()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rounds"][0]["participants"] == sorted(SITES)
    assert metrics["rounds"][0]["failures"] == {}
    table = load_table("medpar")
    for site in SITES:
        info = metrics["sites"][site]
        assert info["num_train"] + info["num_test"] == int((table["provnum"] == site).sum())
    assert (run_dir / "plots" / "accuracy.png").is_file()

    # The coordinator's Prometheus endpoint reports the run; its log is one JSON object a line.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        exposition = reply.read().decode()
    run_id = json.loads((run_dir / "status.json").read_text())["run_id"]
    assert f'fedgov_rounds_completed{{run_id="{run_id}"}} 1.0' in exposition
    assert f'fedgov_sites_connected{{run_id="{run_id}"}} 2.0' in exposition
    log_lines = [line for line in link.log_text().splitlines() if line.startswith("{")]
    assert log_lines and all(json.loads(line)["component"] == "superlink" for line in log_lines)

    # The sites ran fedgov's runtime: every ClientApp task forked from the warm zygote.
    for folder in registered:
        log = (tmp_path / "logs" / f"{folder.name}.log").read_text()
        assert "ClientApp tasks fork from a warm zygote" in log, log[-3000:]
        assert "the SuperNode rings when a task waits" in log, log[-3000:]
        assert "starts as a fresh process" not in log, log[-3000:]
        # The run's FAB is this checkout: once the first task installed it, tasks are warm.
        assert "preloaded app" in log, log[-3000:]
        assert "pauses left as Flower's" not in log, log[-3000:]
