"""server.yaml / site.yaml parsing, certificates and command lines (no processes started)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from clients.daemon import explain_supernode_exit, init_site, load_site_settings, supernode_command
from fedgov.certs import create_federation_certs
from fedgov.datasets import load_dataset, load_table
from fedgov.deploy import toml_value
from fedgov.errors import ConfigError, FedgovError
from server.coordinator import load_server_settings, superlink_command


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path):
    paths = create_federation_certs(tmp_path, ["127.0.0.1", "coord.example.org"], "hospitals")
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(paths.ca_cert), str(paths.server_cert)],
        capture_output=True,
        text=True,
    )
    assert verified.stdout.strip().endswith("OK"), verified.stderr
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # localhost always: the coordinator's own `flwr` calls reach it through loopback
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.org", "localhost"]
    assert oct(paths.server_key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FedgovError, match="already exists"):
        create_federation_certs(tmp_path, ["127.0.0.1"])


def _site(tmp_path):
    table = load_table("medpar").head(40).drop(columns=["provnum"])
    table.to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(load_dataset("medpar").schema.to_dict()))
    return init_site(
        tmp_path / "site",
        "hosp-a",
        tmp_path / "data.csv",
        tmp_path / "schema.yaml",
        "127.0.0.1:9092",
        tmp_path / "ca.crt",
        epsilon_cap=3.0,
    )


def test_site_init_writes_a_config_that_reads_back_and_a_loadable_key(tmp_path):
    config, public_key = _site(tmp_path)
    settings = load_site_settings(config)
    assert settings.site_id == "hosp-a" and settings.epsilon_cap == 3.0
    assert settings.data == (tmp_path / "data.csv").resolve()
    load_ssh_private_key(settings.auth_key.read_bytes(), password=None)
    assert public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(settings.auth_key.stat().st_mode & 0o777) == "0o600"
    node_config = settings.node_config()
    assert node_config["site-id"] == "hosp-a" and node_config["epsilon-cap"] == 3.0
    command = supernode_command(settings, insecure=False)
    assert command[command.index("--superlink") + 1] == "127.0.0.1:9092"
    assert command[command.index("--root-certificates") + 1] == str(settings.ca_cert)
    assert "--insecure" not in command
    with pytest.raises(FedgovError, match="already exists"):
        _site(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon_cap": -1}, "epsilon_cap must be a number > 0"),
        ({"port": "high"}, "port must be a whole number"),
        ({"coordinator": "nohost"}, "coordinator must be HOST:PORT"),
        ({"datta": "x.csv"}, "unknown key 'datta'"),
        ({"site_id": ""}, "'site_id' is required"),
        ({"plugin_modules": 3}, "plugin_modules must be a list of module names"),
    ],
)
def test_site_config_mistakes_name_the_field(tmp_path, change, message):
    config, _ = _site(tmp_path)
    data = yaml.safe_load(config.read_text())
    data.update(change)
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_site_settings(config)


def test_a_sites_plugin_modules_reach_its_clientapp_and_nothing_else_is_allowed(tmp_path):
    """site.yaml's plugin_modules is the only list of modules a run's `_target_` may name at
    this site (fedgov.plugins); without it the site allows none."""
    from fedgov.plugins import site_plugin_modules

    config, _ = _site(tmp_path)
    assert site_plugin_modules(load_site_settings(config).node_config()) == ()
    data = yaml.safe_load(config.read_text())
    data["plugin_modules"] = ["examples", "mypkg.strategies"]
    config.write_text(yaml.safe_dump(data))
    node_config = load_site_settings(config).node_config()
    assert node_config["plugin-modules"] == "examples,mypkg.strategies"
    assert site_plugin_modules(node_config) == ("examples", "mypkg.strategies")


def test_server_config_and_superlink_command(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"federation": "banks", "port": 9200}))
    settings = load_server_settings(path)
    secure = superlink_command(settings, insecure=False)
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(tmp_path / "certs" / "server.crt")
    assert secure[secure.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert "--insecure" in superlink_command(settings, insecure=True)
    path.write_text("port: [")
    with pytest.raises(ConfigError, match="not valid YAML at line 1"):
        load_server_settings(path)


def test_supernode_failures_are_explained_in_one_line(tmp_path):
    settings = load_site_settings(_site(tmp_path)[0])
    line = explain_supernode_exit(settings, 305, "... Failed to activate SuperNode.\n")
    assert "refused this site's key" in line and "fedgov server add-site" in line
    assert "not signed by" in explain_supernode_exit(settings, 305, "CERTIFICATE_VERIFY_FAILED")


def test_run_config_values_are_toml():
    assert [toml_value(v) for v in (True, 3, 0.5, 'a "b"')] == ["true", "3", "0.5", '"a \\"b\\""']


def test_site_budget_reads_the_ledger_and_recomputes_epsilon(tmp_path):
    import json

    from privacy.accounting import independent_epsilon
    from privacy.ledger import SiteLedger, Spend
    from privacy.receipts import PRIVATE_KEY_FILE

    config, _ = _site(tmp_path)
    site_dir = config.parent
    assert (site_dir / PRIVATE_KEY_FILE).is_file()  # site init made the receipt key + ledger
    empty = subprocess.run(
        [sys.executable, "-m", "fedgov", "site", "budget", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
    )
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["epsilon_spent"] == 0.0

    ledger = SiteLedger(site_dir, "hosp-a", PRIVATE_KEY_FILE)
    for rnd in (1, 2):
        spend = Spend("run-9", rnd, 1.1, 0.125, 16, 1e-5, "rdp", 0.0, f"sha-{rnd}")
        reservation = ledger.reserve(spend, cap=10.0)
        assert reservation.spend is not None
        ledger.release(reservation.spend, signature="00")
    shown = subprocess.run(
        [sys.executable, "-m", "fedgov", "site", "budget", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
    )
    summary = json.loads(shown.stdout)
    expected = independent_epsilon([(1.1, 0.125, 32)], 1e-5, "rdp")
    assert summary["epsilon_spent"] == pytest.approx(expected, rel=0.01)
    assert [s["round"] for s in summary["spends"]] == [1, 2]
    assert summary["epsilon_cap"] == 3.0
    assert summary["epsilon_left"] == pytest.approx(max(3.0 - summary["epsilon_spent"], 0.0))

    (site_dir / "privacy_ledger.json").write_text("{ damaged")
    broken = subprocess.run(
        [sys.executable, "-m", "fedgov", "site", "budget", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert broken.returncode == 2
    assert "unreadable" in broken.stderr.strip().splitlines()[-1]
    assert "Traceback" not in broken.stderr


def test_a_coordinator_certificate_problem_is_named(tmp_path):
    import datetime as dt

    from cryptography import x509

    from fedgov.certs import certificate_problem, create_federation_certs, renew_server_cert

    certs = create_federation_certs(tmp_path / "certs", ["coordinator.example.org"], "banks")
    other = create_federation_certs(tmp_path / "other", ["coordinator.example.org"], "banks")
    ca, server = certs.ca_cert.read_bytes(), certs.server_cert.read_bytes()
    assert certificate_problem(server, ca, "coordinator.example.org") is None
    assert certificate_problem(server, ca, "127.0.0.1") is None  # always certified
    assert certificate_problem(server, ca, "10.9.8.7") == "does not name 10.9.8.7"
    assert certificate_problem(server, other.ca_cert.read_bytes(), "127.0.0.1") == (
        "is not signed by"
    )
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=900)
    until = x509.load_pem_x509_certificate(server).not_valid_after_utc
    assert certificate_problem(server, ca, "127.0.0.1", now=later) == (
        f"expired on {until:%Y-%m-%d %H:%M} UTC"
    )
    # Renewal keeps the key and the names, signs with the same CA.
    key = certs.server_key.read_bytes()
    renewed = renew_server_cert(tmp_path / "certs", now=later)
    assert certs.server_key.read_bytes() == key and certs.ca_cert.read_bytes() == ca
    assert renewed.hosts[0] == "coordinator.example.org"
    assert sorted(renewed.hosts) == ["127.0.0.1", "coordinator.example.org", "localhost"]
    fresh = certs.server_cert.read_bytes()
    assert certificate_problem(fresh, ca, "coordinator.example.org", now=later) is None
    starts = renewed.not_after - dt.timedelta(days=825, minutes=5)
    assert certificate_problem(fresh, ca, "coordinator.example.org") == (
        f"is not valid before {starts:%Y-%m-%d %H:%M} UTC"
    )
