"""The ``fedgov`` command line. Every command has ``--help``; a user's mistake ends in one line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedgov.errors import FedgovError


def _demo(args: argparse.Namespace) -> int:
    from fedgov_cli.demo import run_demo

    run_demo(args.out, rounds=args.rounds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedgov",
        description="Federated learning across sites with Flower: simulate, deploy, govern.",
        epilog="Simulations: python -m simulations.run [hydra overrides] (see README).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a federation of hospital sites end to end on embedded defaults",
        description=(
            "Simulate 6 hospital sites (RAND HIE) training a model together with Flower, "
            "then print a per-round table and the paths written. Everything goes under --out."
        ),
    )
    demo.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--rounds", type=_positive_int, default=5, help="training rounds (default: %(default)s)"
    )
    demo.set_defaults(handler=_demo)
    from fedgov_cli import privacy as cli_privacy  # fedgov privacy report

    cli_privacy.add_commands(commands)
    from fedgov_cli import registry as cli_registry  # fedgov registry ..., fedgov serve

    cli_registry.add_commands(commands)
    from fedgov_cli import deploy as cli_deploy  # fedgov server ..., fedgov site ..., fedgov run

    cli_deploy.add_commands(commands)
    from console import cli as cli_console  # fedgov console

    cli_console.add_commands(commands)
    from fedgov_cli import roster as cli_roster  # fedgov roster ... (SecAgg+ identities)

    cli_roster.add_commands(commands)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedgov`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args))
    except FedgovError as error:
        print(f"fedgov: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedgov: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
