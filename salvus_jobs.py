"""salvus_jobs: the operator's command line over specs, schedulers, the registry and the catalogue.

Each package contributes its commands through `add_commands(subparsers, common)`, so a command
lives next to the code it drives.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cluster.errors import SalvusError

# Packages that add subcommands, in the order they appear in --help.
COMMAND_MODULES = ("cluster.cli", "submit.cli", "jobwrappers.cli", "catalogue.cli")


def common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the option is accepted before or after the command without one hiding the other.
    common.add_argument("--spec", metavar="FILE", default=argparse.SUPPRESS,
                        help="cluster spec (default: ./cluster.yaml, then $SALVUS_SPEC)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv: debug)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="salvus_jobs", parents=[common],
        description="Run long-lived service VMs (sage, hub, cassandra) as batch jobs.",
        epilog="Every command takes --spec FILE. 'salvus_jobs COMMAND --help' explains one command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub, common)
    return parser


def setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.spec = getattr(args, "spec", None)
    args.verbose = getattr(args, "verbose", 0)
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except SalvusError as e:
        print(f"salvus_jobs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
