"""``fedgov site ledger ...``: the privacy ledger's journal, and an explicit, logged restore.

    fedgov site ledger journal                         every write of the ledger, in order
    fedgov site ledger restore BACKUP --reason TEXT    make a backup copy the current ledger

A ledger older than its journal (a copy from an old backup) is refused by the site until an
operator restores it with this command, which is itself journalled (privacy/ledger.py).
"""

from __future__ import annotations

import argparse
import time

from fedgov.errors import FedgovError


def add_ledger_command(site_actions: argparse._SubParsersAction) -> None:
    """Add ``ledger`` and its actions under ``fedgov site``."""
    ledger = site_actions.add_parser(
        "ledger",
        help="the privacy ledger's journal, and restoring the ledger from a backup",
        description="The site's privacy ledger (privacy_ledger.json) is signed with the site key "
        "and every write is journalled (privacy_ledger.journal). Back up both, with "
        "site_key.pem.",
    )
    actions = ledger.add_subparsers(dest="ledger_command", metavar="ACTION", required=True)
    journal = actions.add_parser("journal", help="every write of the ledger, in order")
    journal.set_defaults(handler=_journal)
    restore = actions.add_parser(
        "restore",
        help="make a backup copy of this site's ledger the current one (journalled)",
        description="The backup must be this site's ledger, signed by its key. Spends made since "
        "the backup are then no longer counted: restore only a ledger you know to be complete.",
    )
    restore.add_argument("backup", metavar="BACKUP", help="a copy of privacy_ledger.json")
    restore.add_argument("--reason", required=True, help="why (kept in the journal)")
    restore.set_defaults(handler=_restore)
    for parser in (journal, restore):
        parser.add_argument(
            "--config", default="site.yaml", help="site config (default: %(default)s)"
        )


def _ledger(args: argparse.Namespace):
    from clients.daemon import load_site_settings
    from privacy.ledger import SiteLedger
    from privacy.receipts import PRIVATE_KEY_FILE

    settings = load_site_settings(args.config)
    return SiteLedger(settings.site_dir, settings.site_id, PRIVATE_KEY_FILE)


def _journal(args: argparse.Namespace) -> int:
    from privacy.ledger import LedgerError

    ledger = _ledger(args)
    try:
        entries = ledger.journal()
    except LedgerError as error:
        raise FedgovError(f"site {ledger.site_id}: {error}") from None
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.get("at", 0)))
        print(
            f"{entry['seq']:>6}  {when}  {entry.get('event', 'write'):<8} {entry['sha256']}"
            + (f"  {entry['reason']}" if entry.get("reason") else "")
        )
    return 0


def _restore(args: argparse.Namespace) -> int:
    from privacy.ledger import LedgerError

    ledger = _ledger(args)
    try:
        restored = ledger.restore(args.backup, args.reason)
    except LedgerError as error:
        raise FedgovError(f"site {ledger.site_id}: ledger restore refused: {error}") from None
    print(
        f"site {ledger.site_id}: ledger restored from {args.backup} "
        f"({len(restored.spends)} spends) as write {restored.seq}"
    )
    return 0
