"""The coordinator operator's chores, on a real coordinator and real sites (127.0.0.1).

``fedgov server add-site`` names the site and its node; ``fedgov server sites`` lists them with
their state; ``remove-site`` takes a site out (its daemon is then refused); an expired
coordinator certificate is reported as expired, with its date, and ``fedgov server renew-cert``
renews ``server.crt`` alone: the sites keep their ``ca.crt`` and join again.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from processes import FEDGOV, ProcessGroup, Started, fedgov, free_ports, init_medpar_site

from fedgov.certs import renew_server_cert

pytestmark = pytest.mark.slow

START_TIMEOUT = 120.0
SITES = ("hosp-a", "hosp-b")


def _start_coordinator(processes: ProcessGroup, folder: Path, port: int, name: str) -> Started:
    link = processes.start(name, [*FEDGOV, "server", "start"], cwd=folder)
    processes.wait_for_port(link, port, START_TIMEOUT)
    return link


def _stop(processes: ProcessGroup, proc: Started) -> None:
    proc.popen.terminate()
    assert processes.wait_for_exit(proc, 60) == 130, proc.log_tail()


def _sites(coordinator: Path) -> dict[str, dict]:
    listed = fedgov("server", "sites", "--json", cwd=coordinator)
    assert listed.returncode == 0, listed.stderr
    return {site["site_id"]: site for site in json.loads(listed.stdout)}


def test_sites_are_added_listed_removed_and_survive_a_renewed_certificate(tmp_path, processes):
    link_port, *site_ports = free_ports(3)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    assert fedgov("server", "certs", "--out", "certs", cwd=coordinator).returncode == 0
    (coordinator / "server.yaml").write_text(
        yaml.safe_dump({"federation": "hospitals", "host": "127.0.0.1", "port": link_port})
    )
    ca = coordinator / "certs" / "ca.crt"
    link = _start_coordinator(processes, coordinator, link_port, "coordinator")
    folders = {
        name: init_medpar_site(tmp_path, name, port, link_port, ca)
        for name, port in zip(SITES, site_ports, strict=True)
    }

    # add-site names the site (from its key) and its node.
    node_ids = {}
    for name, folder in folders.items():
        added = fedgov("server", "add-site", str(folder / "keys" / "node.key.pub"), cwd=coordinator)
        assert added.returncode == 0, added.stderr
        line = added.stdout.strip()
        assert line.startswith(f"site {name} registered successfully as node "), line
        node_ids[name] = line.split("as node ")[1].split(";")[0]
    again = fedgov(
        "server", "add-site", str(folders["hosp-a"] / "keys" / "node.key.pub"), cwd=coordinator
    )
    assert again.returncode == 2
    assert f"site hosp-a is already added as node {node_ids['hosp-a']}" in again.stderr

    daemon = processes.start("hosp-a", [*FEDGOV, "site", "start"], cwd=folders["hosp-a"])
    processes.wait_for_log(daemon, r"SuperNode ID: \d+", START_TIMEOUT)
    processes.wait_until(
        lambda: _sites(coordinator)["hosp-a"]["status"] == "online",
        START_TIMEOUT,
        "hosp-a online",
        [link, daemon],
    )
    listed = _sites(coordinator)
    assert set(listed) == set(SITES)
    assert {name: site["node_id"] for name, site in listed.items()} == node_ids
    assert listed["hosp-b"]["status"] == "registered"
    text = fedgov("server", "sites", cwd=coordinator).stdout
    assert f"node {node_ids['hosp-a']}" in text and "online" in text

    # remove-site: the key can no longer join.
    removed = fedgov("server", "remove-site", "hosp-b", cwd=coordinator)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == (
        f"site hosp-b (node {node_ids['hosp-b']}) removed: its key can no longer join"
    )
    assert set(_sites(coordinator)) == {"hosp-a"}
    refused = fedgov("site", "start", "--max-wait", "20", cwd=folders["hosp-b"], timeout=300)
    assert refused.returncode == 2
    assert "refused this site's key" in refused.stderr.strip().splitlines()[-1]

    # The coordinator's certificate expires (signed 900 days ago for 825 days).
    processes.stop_all()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=900)
    expired = renew_server_cert(coordinator / "certs", now=long_ago)
    link = _start_coordinator(processes, coordinator, link_port, "expired-coordinator")
    refused = fedgov("site", "start", "--max-wait", "20", cwd=folders["hosp-a"], timeout=300)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert f"expired on {expired.not_after:%Y-%m-%d %H:%M} UTC" in line, refused.stderr[-2000:]
    assert "fedgov server renew-cert" in line and "not signed by" not in line

    # renew-cert renews server.crt alone; after a restart the site joins with its old ca.crt.
    kept = {name: (coordinator / "certs" / name).read_bytes() for name in ("ca.crt", "server.key")}
    renewed = fedgov("server", "renew-cert", "--certs", "certs", cwd=coordinator)
    assert renewed.returncode == 0, renewed.stderr
    assert "restart the coordinator" in renewed.stdout
    assert kept == {name: (coordinator / "certs" / name).read_bytes() for name in kept}
    cert = x509.load_pem_x509_certificate((coordinator / "certs" / "server.crt").read_bytes())
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=800)
    _stop(processes, link)
    link = _start_coordinator(processes, coordinator, link_port, "renewed-coordinator")
    daemon = processes.start("hosp-a-again", [*FEDGOV, "site", "start"], cwd=folders["hosp-a"])
    processes.wait_for_log(daemon, r"SuperNode ID: \d+", START_TIMEOUT)
