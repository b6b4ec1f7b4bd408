"""Only sites join: the coordinator's Control API answers only its own host.

Flower 1.42 serves the Control API (``flwr supernode register``, ``flwr run``) and the Fleet API
(what SuperNodes use) on one address. Played here as the adversary: someone holding only the
federation's public ``ca.crt`` connects from another address (``127.0.0.2``, a second loopback
address: every socket of their processes binds it before connecting, as a program on another
machine would arrive from its own address) and registers a key of their own with Flower's own
``flwr`` CLI. It is refused, the key never joins, and the coordinator's list of sites holds only
the one its operator added; a registered site connecting from that same other address joins.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from processes import FEDGOV, fedgov, free_ports, init_medpar_site

from clients.daemon import create_node_auth_key
from fedgov.deploy import flower_environment, flower_tool

pytestmark = pytest.mark.slow

OTHER_ADDRESS = "127.0.0.2"
START_TIMEOUT = 120.0
SOURCE_PATCH = """
import os, socket

_SOURCE = os.environ.get("FEDGOV_TEST_SOURCE_ADDRESS")
if _SOURCE:
    _connect = socket.socket.connect

    def connect(self, address):
        if self.family == socket.AF_INET:
            try:
                self.bind((_SOURCE, 0))
            except OSError:
                pass
        return _connect(self, address)

    socket.socket.connect = connect
"""


def _from_other_address(tmp_path: Path) -> dict[str, str]:
    """Environment under which every Python process connects from :data:`OTHER_ADDRESS`."""
    patch = tmp_path / "other-address"
    patch.mkdir(exist_ok=True)
    (patch / "sitecustomize.py").write_text(SOURCE_PATCH)
    path = os.pathsep.join(p for p in (str(patch), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "FEDGOV_TEST_SOURCE_ADDRESS": OTHER_ADDRESS}


def test_a_key_registered_from_another_address_is_refused_and_never_joins(tmp_path, processes):
    link_port, site_port, rogue_port = free_ports(3)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    assert fedgov("server", "certs", "--out", "certs", cwd=coordinator).returncode == 0
    (coordinator / "server.yaml").write_text(
        yaml.safe_dump({"federation": "hospitals", "host": "127.0.0.1", "port": link_port})
    )
    ca = coordinator / "certs" / "ca.crt"
    link = processes.start("coordinator", [*FEDGOV, "server", "start"], cwd=coordinator)
    processes.wait_for_port(link, link_port, START_TIMEOUT)
    other = _from_other_address(tmp_path)

    # The adversary: ca.crt, a key of their own, Flower's CLI, another address.
    rogue_home = tmp_path / "rogue-flwr-home"
    rogue_home.mkdir()
    (rogue_home / "config.toml").write_text(
        f'[superlink]\ndefault = "hospitals"\n\n[superlink.hospitals]\n'
        f'address = "127.0.0.1:{link_port}"\nroot-certificates = "{ca}"\n'
    )
    rogue_key = create_node_auth_key(tmp_path / "rogue" / "node.key")
    env = {**flower_environment(rogue_home), **other}
    register = subprocess.run(
        [flower_tool("flwr"), "supernode", "register", str(rogue_key), "hospitals"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = register.stdout + register.stderr
    assert "registered successfully" not in said, said
    # Nor may they read the list of sites.
    listing = subprocess.run(
        [flower_tool("flwr"), "supernode", "list", "hospitals", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"nodes"' not in listing.stdout, listing.stdout

    # The operator adds the real site from the coordinator's host.
    site = init_medpar_site(tmp_path, "hosp-a", site_port, link_port, ca)
    added = fedgov("server", "add-site", str(site / "keys" / "node.key.pub"), cwd=coordinator)
    assert added.returncode == 0, added.stderr

    # The rogue key's SuperNode, from the other address: refused.
    rogue_site = init_medpar_site(tmp_path, "rogue", rogue_port, link_port, ca)
    (rogue_site / "keys" / "node.key").write_bytes((tmp_path / "rogue" / "node.key").read_bytes())
    refused = subprocess.run(
        [*FEDGOV, "site", "start", "--max-wait", "20"],
        cwd=rogue_site,
        env={**os.environ, **other},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "refused this site's key" in refused.stderr.strip().splitlines()[-1]

    # The registered site joins from the other address: the Fleet API stays reachable.
    daemon = processes.start("hosp-a", [*FEDGOV, "site", "start"], cwd=site, env=other)
    processes.wait_for_log(daemon, r"SuperNode ID: \d+", START_TIMEOUT)

    # The coordinator's list of sites: the operator's one, connected; no rogue.
    nodes = subprocess.run(
        [flower_tool("flwr"), "supernode", "list", "hospitals", "--format", "json"],
        env=flower_environment(coordinator / "flwr-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert nodes.returncode == 0, nodes.stderr
    listed = json.loads(nodes.stdout)["nodes"]
    assert len(listed) == 1, listed
    assert rogue_key.read_text().strip() not in json.dumps(listed)
    # The SuperLink's access log shows the adversary's requests arriving from the other address
    # and refused, and the site's Fleet requests from it answered.
    log = link.log_text()
    assert f"{OTHER_ADDRESS}:" in log and "/v1/control/" in log, log[-3000:]
    assert any(
        OTHER_ADDRESS in line and "/v1/control/" in line and " 403" in line
        for line in log.splitlines()
    ), log[-3000:]
    assert any(
        OTHER_ADDRESS in line and "/v1/fleet/" in line and " 200" in line
        for line in log.splitlines()
    ), log[-3000:]
