"""The roster of a simulated federation: the engine plays governance for its simulated sites.

So that a simulation runs the same SecAgg+ code path as a deployment (signed per-round keys,
rosters checked against trust anchors, the consistency check), the engine gives every simulated
site a folder with an identity key (``site_key.pem``, kept if present: it also signs the site's DP
receipts), installs a trust anchor naming fresh governance keys (quorum 2 of 3, the private halves
used once to sign the roster and then dropped) and writes the signed roster that
``secagg.roster`` then names.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedgov.config import RunConfig
from privacy.receipts import PRIVATE_KEY_FILE, load_site_key, public_key_bytes
from privacy.secagg.roster import Roster, TrustAnchor, save_anchor, sign_roster

NODE_SITE_DIR = "site-dir"
ROSTER_FILE = "secagg_roster.json"
GOVERNANCE_MEMBERS, GOVERNANCE_QUORUM = 3, 2


def simulated_roster(
    cfg: RunConfig, site_ids: list[str], node_configs: dict[int, dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """``node_configs`` (partition id → node-config keys) with a ``site-dir`` for every site,
    each holding an identity key and trust anchor; sets ``cfg.secagg.roster`` to the roster."""
    root = Path(
        cfg.federation.sites_dir
        or (Path(cfg.output_dir) / "sites" if cfg.output_dir else "")
        or tempfile.mkdtemp(prefix="fedgov-sites-")
    ).resolve()
    governance = [Ed25519PrivateKey.generate() for _ in range(GOVERNANCE_MEMBERS)]
    governance_keys = tuple(public_key_bytes(key) for key in governance)
    result = {index: dict(extra) for index, extra in node_configs.items()}
    identities: dict[str, bytes] = {}
    for index, site_id in enumerate(site_ids):
        extra = result.setdefault(index, {})
        site_dir = Path(extra.setdefault(NODE_SITE_DIR, str(root / site_id)))
        identities[site_id] = public_key_bytes(identity_key(site_dir, site_id))
        save_anchor(site_dir, TrustAnchor(site_id, governance_keys, GOVERNANCE_QUORUM))
    signed = sign_roster(Roster(1, identities), governance[:GOVERNANCE_QUORUM])
    root.mkdir(parents=True, exist_ok=True)
    (root / ROSTER_FILE).write_bytes(signed)
    cfg.secagg.roster = str(root / ROSTER_FILE)
    return result


def identity_key(site_dir: Path, site_id: str) -> Ed25519PrivateKey:
    """The site's identity key, created with its (empty) privacy ledger when it has none, so the
    ledger's rule "a key without a ledger means the ledger was lost" keeps holding."""
    if (Path(site_dir) / PRIVATE_KEY_FILE).exists():
        return load_site_key(site_dir)
    from privacy.site_state import open_site_state

    key, _ = open_site_state(Path(site_dir), site_id)
    return key
