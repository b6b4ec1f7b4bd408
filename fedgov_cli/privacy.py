"""``fedgov privacy report RUN_DIR [--format html|json|md] [--output FILE]``.

Reads the run's ``privacy_report.json``, verifies it again from its own content (every receipt's
signature, every ε replayed by a fresh accountant and recomputed by an independent one) and
prints it as HTML, JSON or Markdown. Exit status 0 when everything verifies, 1 when something does
not (the report is still printed, with the problems), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedgov.errors import FedgovError

REPORT_FILE = "privacy_report.json"
FORMATS = ("html", "json", "md")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register ``fedgov privacy ...`` on the top-level parser's subcommands."""
    privacy = commands.add_parser(
        "privacy",
        help="differential privacy: budget reports of a run",
        description="Differential privacy of fedgov runs.",
    )
    actions = privacy.add_subparsers(dest="privacy_command", metavar="ACTION")
    report = actions.add_parser(
        "report",
        help="verify and print a run's privacy budget report",
        description=(
            "Read RUN_DIR/privacy_report.json, verify every site's signed receipts and recompute "
            "every ε with a fresh and an independent accountant, then print the report. "
            "Exit status 1 when anything fails to verify."
        ),
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    report.add_argument(
        "--format", choices=FORMATS, default="md", help="output format (default: %(default)s)"
    )
    report.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    report.set_defaults(handler=_report)
    privacy.set_defaults(handler=lambda args: _help(privacy))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def load_report(run_dir: str | Path) -> dict:
    """The run's report document; FedgovError (one line) when missing or unreadable."""
    path = Path(run_dir) / REPORT_FILE
    if not Path(run_dir).is_dir():
        raise FedgovError(f"RUN_DIR: {run_dir} is not a folder")
    if not path.is_file():
        raise FedgovError(
            f"RUN_DIR: {path} does not exist (was privacy on in that run? privacy=sample_dp, "
            "site_dp or both)"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedgovError(f"{path}: not a readable privacy report ({error})") from None
    if not isinstance(document, dict) or "delta" not in document or "accountant" not in document:
        raise FedgovError(f"{path}: not a fedgov privacy report (no 'delta'/'accountant')")
    return document


def _report(args: argparse.Namespace) -> int:
    from privacy.report import render_html, render_markdown, summary_paragraph, verify_report

    document = load_report(args.run_dir)
    try:
        document["verification"] = verify_report(document)
    except (KeyError, TypeError, ValueError) as error:
        raise FedgovError(f"{args.run_dir}/{REPORT_FILE}: malformed report ({error!r})") from None
    document["summary"] = summary_paragraph(document)
    if args.format == "json":
        text = json.dumps(document, indent=2) + "\n"
    elif args.format == "html":
        text = render_html(document)
    else:
        text = render_markdown(document)
    if args.output:
        from fedgov.records import atomic_write_bytes

        atomic_write_bytes(args.output, text.encode("utf-8"))
        print(f"fedgov: wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    verification = document["verification"]
    if not verification["ok"]:
        print(
            "fedgov: privacy report verification FAILED: " + "; ".join(verification["problems"]),
            file=sys.stderr,
        )
        return 1
    return 0
