"""Subcommands of salvus_jobs contributed by the catalogue package."""
from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds this package's subcommands (none yet)."""
