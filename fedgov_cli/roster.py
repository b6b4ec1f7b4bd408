"""``fedgov roster ...``: governance keys, a site's trust anchor, and the signed SecAgg+ roster.

The roster (privacy/secagg/roster.py) tells every site which identity key each site id holds, so
a coordinator cannot substitute per-round keys. Governance members each hold a key
(``governance-key``) and publish their public keys with the quorum (``governance-anchor``); a
site installs that trust anchor next to its identity key (``fedgov site init
--governance-anchor``, or ``anchor`` for a site folder that exists); governance adds a site
(``add``) and co-signs (``sign``) until the quorum is met; the coordinator points
``secagg.roster`` at the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedgov.errors import FedgovError


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``fedgov roster`` on the top-level parser."""
    roster = commands.add_parser(
        "roster", help="the governance-signed SecAgg+ roster (site id → identity key)"
    )
    actions = roster.add_subparsers(dest="roster_command", metavar="ACTION", required=True)

    key = actions.add_parser("governance-key", help="create one governance member's signing key")
    key.add_argument("--out", required=True, help="file for the private key (PEM, mode 0600)")
    key.set_defaults(handler=_governance_key)

    anchor = actions.add_parser(
        "anchor",
        help="install a site's trust anchor (and its identity key if it has none)",
        description="Write SITE_DIR/secagg_anchor.json: this site's id, the governance public "
        "keys and the quorum a roster needs. Prints the site's identity key for governance.",
    )
    anchor.add_argument("--site-dir", required=True, help="the site's folder (node config)")
    anchor.add_argument("--site-id", required=True, help="this site's id")
    anchor.add_argument(
        "--governance-key",
        action="append",
        required=True,
        metavar="PUBKEY",
        help="a governance public key (hex, or a .pub file); repeat for each member",
    )
    anchor.add_argument("--quorum", type=int, required=True, help="signatures a roster needs")
    anchor.set_defaults(handler=_anchor)

    published = actions.add_parser(
        "governance-anchor",
        help="write the file every new site installs as its trust anchor",
        description="Write the governance public keys and the quorum a roster needs to OUT, for "
        "`fedgov site init --governance-anchor OUT` (hand it to sites out of band).",
    )
    published.add_argument(
        "--governance-key",
        action="append",
        required=True,
        metavar="PUBKEY",
        help="a governance public key (hex, or a .pub file); repeat for each member",
    )
    published.add_argument("--quorum", type=int, required=True, help="signatures a roster needs")
    published.add_argument("--out", required=True, help="the file to write (JSON)")
    published.set_defaults(handler=_governance_anchor)

    add = actions.add_parser(
        "add",
        help="a new roster version with a site added (or its key replaced), signed by you",
    )
    add.add_argument("--roster", required=True, help="roster file (created if missing)")
    add.add_argument("--site-id", required=True, help="the site's id")
    add.add_argument("--key", required=True, help="its identity key: hex, or its site_key.pub")
    add.add_argument("--sign", required=True, help="your governance private key (PEM)")
    add.set_defaults(handler=_add)

    sign = actions.add_parser("sign", help="co-sign the roster with another governance key")
    sign.add_argument("--roster", required=True, help="roster file")
    sign.add_argument("--sign", required=True, help="your governance private key (PEM)")
    sign.set_defaults(handler=_sign)

    show = actions.add_parser("show", help="list the roster and check it against an anchor")
    show.add_argument("--roster", required=True, help="roster file")
    show.add_argument("--anchor", help="a site's secagg_anchor.json to verify against")
    show.set_defaults(handler=_show)


def _governance_key(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedgov.records import atomic_write_bytes
    from privacy.receipts import public_key_bytes

    out = Path(args.out)
    if out.exists():
        raise FedgovError(f"{out} exists: refusing to overwrite a governance key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, pem)
    out.chmod(0o600)
    public = public_key_bytes(key).hex()
    atomic_write_bytes(out.with_suffix(".pub"), (public + "\n").encode())
    print(f"governance key {out}; public key (give to every site): {public}")
    return 0


def _governance_anchor(args: argparse.Namespace) -> int:
    from fedgov.records import atomic_write_bytes
    from privacy.secagg.roster import RosterError, governance_anchor_json

    keys = tuple(bytes.fromhex(_hex_key(v, "--governance-key")) for v in args.governance_key)
    try:
        document = governance_anchor_json(keys, args.quorum)
    except RosterError as error:
        raise FedgovError(f"--quorum/--governance-key: {error}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, document)
    print(f"governance anchor {out} (quorum {args.quorum} of {len(keys)}): give it to every site")
    return 0


def _anchor(args: argparse.Namespace) -> int:
    from privacy.receipts import PUBLIC_KEY_FILE, public_key_bytes
    from privacy.secagg.roster import RosterError, TrustAnchor, save_anchor
    from privacy.secagg.simulated_roster import identity_key

    site_dir = Path(args.site_dir)
    keys = tuple(bytes.fromhex(_hex_key(v, "--governance-key")) for v in args.governance_key)
    try:
        path = save_anchor(site_dir, TrustAnchor(args.site_id, keys, args.quorum))
    except RosterError as error:
        raise FedgovError(f"--quorum/--governance-key: {error}") from None
    if (site_dir / PUBLIC_KEY_FILE).exists():
        public = (site_dir / PUBLIC_KEY_FILE).read_text().strip()
    else:  # created with its privacy ledger, as the site's DP code expects
        public = public_key_bytes(identity_key(site_dir, args.site_id)).hex()
    print(f"trust anchor {path} (quorum {args.quorum} of {len(keys)})")
    print(f"site {args.site_id}'s identity key (for `fedgov roster add`): {public}")
    return 0


def _add(args: argparse.Namespace) -> int:
    from fedgov.records import atomic_write_bytes
    from privacy.secagg.roster import Roster, roster_sites, sign_roster

    path = Path(args.roster)
    sites, version = {}, 0
    if path.exists():
        signed = path.read_bytes()
        sites, version = roster_sites(signed), _version(signed)
    sites[args.site_id] = bytes.fromhex(_hex_key(args.key, "--key"))
    signed = sign_roster(Roster(version + 1, sites), [_private(args.sign)])
    atomic_write_bytes(path, signed)
    print(f"roster {path} v{version + 1}: {len(sites)} sites, 1 signature (co-sign: roster sign)")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from fedgov.records import atomic_write_bytes
    from privacy.secagg.roster import add_signatures

    path = Path(args.roster)
    if not path.exists():
        raise FedgovError(f"--roster: {path} does not exist")
    signed = add_signatures(path.read_bytes(), [_private(args.sign)])
    atomic_write_bytes(path, signed)
    count = len(json.loads(signed)["signatures"])
    print(f"roster {path} v{_version(signed)}: {count} signatures")
    return 0


def _show(args: argparse.Namespace) -> int:
    from privacy.secagg.roster import RosterError, load_anchor, roster_sites, verify_roster

    path = Path(args.roster)
    if not path.exists():
        raise FedgovError(f"--roster: {path} does not exist")
    signed = path.read_bytes()
    try:
        for site, key in sorted(roster_sites(signed).items()):
            print(f"{site}\t{key.hex()}")
        if args.anchor:
            anchor = load_anchor(Path(args.anchor).parent)
            if anchor is None:
                raise FedgovError(f"--anchor: {args.anchor} is not a secagg_anchor.json")
            roster = verify_roster(signed, anchor)
            print(f"v{roster.version}: verified against {args.anchor} (quorum {anchor.quorum})")
    except RosterError as error:
        raise FedgovError(f"{path}: {error}") from None
    return 0


def _version(signed: bytes) -> int:
    return int(json.loads(json.loads(signed)["roster"])["version"])


def _hex_key(value: str, flag: str) -> str:
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        if len(bytes.fromhex(text)) == 32:
            return text
    except ValueError:
        pass
    raise FedgovError(f"{flag}: '{value[:80]}' is not a 32-byte key in hex (or a file holding one)")


def _private(path: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise FedgovError(f"--sign: {path}: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FedgovError(f"--sign: {path} is not an Ed25519 key")
    return key
