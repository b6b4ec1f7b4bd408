"""The coordinator's sites: who was added (``fedgov server add-site``), as which Flower node, and
whether they are online (``fedgov server sites``), and taking one out (``remove-site``).

Flower's SuperLink knows nodes by number and public key only; fedgov keeps the site's name next
to them in ``sites.json`` beside the SuperLink's state database (replaced atomically), keyed by
site id::

    {"hosp-a": {"node_id": "815427...", "public_key": "ecdsa-sha2-nistp384 AAAA...",
                "key_file": "/path/node.key.pub", "added_at": "2026-12-06T04:50:00+00:00"}}

A site's name comes from its public key's comment (``fedgov site init`` writes it there) or
``--site-id``. All the Control API calls go through Flower's own ``flwr`` CLI from the
coordinator's host (its Control API answers nobody else: server/superlink.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from fedgov.deploy import flower_tool
from fedgov.errors import FedgovError
from server.coordinator import ServerSettings, flower_environment, write_flwr_connection

SITES_FILE = "sites.json"
#: Flower's states of a node whose key was unregistered: no longer a site.
GONE = ("unregistered", "deleted")
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def sites_path(settings: ServerSettings) -> Path:
    return settings.database.parent / SITES_FILE


def read_sites(settings: ServerSettings) -> dict[str, dict[str, Any]]:
    """The recorded sites (empty when none was added yet)."""
    path = sites_path(settings)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedgovError(f"sites: {path} is unreadable ({type(error).__name__})") from None
    if not isinstance(data, dict):
        raise FedgovError(f"sites: {path} is not a JSON object")
    return data


def _write_sites(settings: ServerSettings, sites: dict[str, dict[str, Any]]) -> None:
    path = sites_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".sites-")
    with os.fdopen(fd, "w") as handle:
        json.dump(sites, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _flwr(settings: ServerSettings, *args: str) -> dict[str, Any]:
    """One ``flwr ... --format json`` call against this coordinator; its JSON answer."""
    write_flwr_connection(settings, settings.insecure)
    result = subprocess.run(
        [flower_tool("flwr"), *args, settings.federation, "--format", "json"],
        env=flower_environment(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        answer = json.loads(result.stdout[result.stdout.index("{") :])
    except (ValueError, json.JSONDecodeError):
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if result.returncode != 0 or not answer.get("success", False):
        said = answer.get("error-message") or (result.stdout + result.stderr).strip()
        last = said.splitlines()[-1] if said else f"exit {result.returncode}"
        raise FedgovError(f"the coordinator at {settings.address} refused: {last}")
    return answer


def key_site_id(public_key: Path) -> str | None:
    """The site id in an OpenSSH public key's comment, if it holds one."""
    parts = public_key.read_text().split()
    return parts[2] if len(parts) >= 3 and SITE_ID.match(parts[2]) else None


def add_site(settings: ServerSettings, public_key: Path, site_id: str | None) -> dict[str, Any]:
    """Register ``public_key`` with the SuperLink and record it under the site's id."""
    if not public_key.is_file():
        raise FedgovError(f"add-site: public key {public_key} does not exist")
    if not public_key.read_text().startswith("ecdsa-sha2-"):
        raise FedgovError(
            f"add-site: {public_key} is not an OpenSSH ECDSA public key (expected the site's "
            "keys/node.key.pub written by `fedgov site init`)"
        )
    site_id = site_id or key_site_id(public_key)
    if site_id is None:
        raise FedgovError(
            f"add-site: {public_key} does not name its site; give it with --site-id NAME"
        )
    if not SITE_ID.match(site_id):
        raise FedgovError(f"add-site: site id {site_id!r} must be letters, digits, '.', '_', '-'")
    sites = read_sites(settings)
    if site_id in sites:
        raise FedgovError(
            f"add-site: site {site_id} is already added as node {sites[site_id]['node_id']} "
            f"(remove it first: fedgov server remove-site {site_id})"
        )
    try:
        answer = _flwr(settings, "supernode", "register", str(public_key))
    except FedgovError as error:
        raise FedgovError(f"add-site: {error}") from None
    entry = {
        "node_id": str(answer["node-id"]),
        "public_key": " ".join(public_key.read_text().split()[:2]),
        "key_file": str(public_key.resolve()),
        "added_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    sites[site_id] = entry
    _write_sites(settings, sites)
    return {"site_id": site_id, **entry}


def list_sites(settings: ServerSettings) -> list[dict[str, Any]]:
    """Every node the SuperLink knows (but those unregistered), with its site id where fedgov
    recorded one."""
    nodes = _flwr(settings, "supernode", "list").get("nodes", [])
    by_node = {entry["node_id"]: site for site, entry in read_sites(settings).items()}
    return [
        {
            "site_id": by_node.get(str(node["node-id"])),
            "node_id": str(node["node-id"]),
            "status": node.get("status"),
            "online_at": node.get("online-at"),
            "offline_at": node.get("offline-at"),
        }
        for node in nodes
        if node.get("status") not in GONE
    ]


def remove_site(settings: ServerSettings, site: str) -> dict[str, Any]:
    """Unregister the site's key at the SuperLink (it can no longer join) and forget it.
    ``site`` is a site id or a node id."""
    sites = read_sites(settings)
    site_id = (
        site
        if site in sites
        else next((name for name, entry in sites.items() if entry["node_id"] == site), None)
    )
    node_id = sites[site_id]["node_id"] if site_id else site
    if site_id is None and not node_id.isdigit():
        known = ", ".join(sorted(sites)) or "none"
        raise FedgovError(f"remove-site: no site {site!r} (added sites: {known})")
    try:
        _flwr(settings, "supernode", "unregister", node_id)
    except FedgovError as error:
        raise FedgovError(f"remove-site: {error}") from None
    if site_id is not None:
        del sites[site_id]
        _write_sites(settings, sites)
    return {"site_id": site_id, "node_id": node_id}
