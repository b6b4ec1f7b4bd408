"""``fedgov site apps ...``: the app code a site runs, reviewed and approved by its operator.

    fedgov site apps list                       approved apps, then the refusals logged
    fedgov site apps show FAB_OR_DIGEST         a FAB's files and its diff against approved apps
    fedgov site apps approve DIGEST [--comment] run this app from now on
    fedgov site apps revoke DIGEST              stop running it

Everything lives in the site's signed, append-only app log (clients/app_approval.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedgov.errors import FedgovError


def add_apps_command(site_actions: argparse._SubParsersAction) -> None:
    """Add ``apps`` and its actions under ``fedgov site``."""
    apps = site_actions.add_parser(
        "apps",
        help="list, review, approve or revoke the app code this site runs",
        description="A site runs a task only when the FAB's files are byte-identical to an app "
        "its operator approved (by app digest). Approvals, revocations and refusals go into "
        "the site's signed, append-only log (apps/app_log.jsonl).",
    )
    actions = apps.add_subparsers(dest="apps_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="approved apps and logged refusals")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_list)

    show = actions.add_parser(
        "show",
        help="what a FAB contains and its diff against the approved apps",
        description="FAB_OR_DIGEST: a .fab file, or the digest (or a unique prefix) of a FAB "
        "this site refused (kept under apps/fabs/, never unpacked).",
    )
    show.add_argument("fab_or_digest", metavar="FAB_OR_DIGEST")
    show.set_defaults(handler=_show)

    approve = actions.add_parser("approve", help="run the app with this digest from now on")
    approve.add_argument("digest", metavar="DIGEST", help="64 hex digits, or a kept FAB's prefix")
    approve.add_argument("--comment", default="", help="why (kept in the signed log)")
    approve.set_defaults(handler=_approve)

    revoke = actions.add_parser("revoke", help="stop running the app with this digest")
    revoke.add_argument("digest", metavar="DIGEST", help="an approved app's digest or prefix")
    revoke.add_argument("--comment", default="", help="why (kept in the signed log)")
    revoke.set_defaults(handler=_revoke)

    for parser in (listing, show, approve, revoke):
        parser.add_argument(
            "--config", default="site.yaml", help="site config (default: %(default)s)"
        )


def _log(args: argparse.Namespace):
    from clients.app_approval import AppLog
    from clients.daemon import load_site_settings

    settings = load_site_settings(args.config)
    return AppLog(settings.site_dir, settings.site_id)


def _resolve(log, digest_or_prefix: str, candidates: set[str]) -> str:
    """A full digest from a digest or a unique prefix of a known one."""
    from clients.app_approval import DIGEST_PATTERN

    text = digest_or_prefix.strip().lower()
    if DIGEST_PATTERN.match(text):
        return text
    kept = log.stored_fab(text) if text else None
    matches = {d for d in candidates if d.startswith(text)} | ({kept[0]} if kept else set())
    if len(matches) != 1 or not text:
        raise FedgovError(
            f"site apps: '{digest_or_prefix}' names {'no' if not matches else 'more than one'} "
            "known app; expected a 64-hex-digit app digest or a unique prefix"
        )
    return matches.pop()


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _list(args: argparse.Namespace) -> int:
    from clients.app_approval import REFUSE, entry_as_dict

    log = _log(args)
    entries = log.entries()
    approved = log.approved(entries)
    refusals = [e for e in entries if e.event == REFUSE and e.digest not in approved]
    if args.json:
        print(
            json.dumps(
                {
                    "approved": [entry_as_dict(e) for e in approved.values()],
                    "refused": [entry_as_dict(e) for e in refusals],
                    "log": str(log.path),
                },
                indent=2,
            )
        )
        return 0
    print(f"site {log.site_id}: {len(approved)} approved app(s); log {log.path}")
    for entry in approved.values():
        print(f"  approved {entry.digest}  {_when(entry.at)}  {entry.comment}")
    for entry in refusals:
        print(f"  refused  {entry.digest}  {_when(entry.at)}  run {entry.run}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from clients.app_approval import diff_files, fab_app_digest, fab_files

    log = _log(args)
    approved = log.approved()
    path = Path(args.fab_or_digest)
    if path.is_file():
        fab = path.read_bytes()
    else:
        kept = log.stored_fab(_resolve(log, args.fab_or_digest, set(approved)))
        if kept is None:
            raise FedgovError(f"site apps: no FAB kept for '{args.fab_or_digest}' in {log.folder}")
        fab = kept[1]
    try:
        files, digest = fab_files(fab), fab_app_digest(fab)
    except ValueError as error:
        raise FedgovError(f"site apps: {args.fab_or_digest}: {error}") from None
    state = "APPROVED" if digest in approved else "not approved"
    print(f"app {digest} ({state}): {len(files)} files, {sum(map(len, files.values()))} bytes")
    for name in sorted(files):
        print(f"  {len(files[name]):>8}  {name}")
    for other in approved:
        if other == digest:
            continue
        kept = log.stored_fab(other)
        if kept is None:
            print(f"diff against approved {other}: its FAB is not kept here")
            continue
        print(f"diff against approved {other}:")
        for line in diff_files(fab_files(kept[1]), files):
            print(f"  {line}")
    return 0


def _approve(args: argparse.Namespace) -> int:
    from clients.app_approval import APPROVE

    log = _log(args)
    entries = log.entries()
    approved = log.approved(entries)
    digest = _resolve(log, args.digest, {e.digest for e in entries})
    if digest in approved:
        print(f"site {log.site_id}: app {digest} is already approved")
        return 0
    entry = log.append(APPROVE, digest, comment=args.comment)
    print(f"site {log.site_id}: approved app {digest} (log entry {entry.seq})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from clients.app_approval import REVOKE

    log = _log(args)
    approved = log.approved()
    digest = _resolve(log, args.digest, set(approved))
    if digest not in approved:
        raise FedgovError(f"site apps: app {digest} is not approved at site {log.site_id}")
    entry = log.append(REVOKE, digest, comment=args.comment)
    print(f"site {log.site_id}: revoked app {digest} (log entry {entry.seq})")
    return 0
