"""`millrace sparkplug --config FILE`: run the Sparkplug B primary host application."""

from __future__ import annotations

import argparse
from pathlib import Path


def _sparkplug(args: argparse.Namespace) -> int:
    from millrace.cloud.sparkplug.config import load_config
    from millrace.cloud.sparkplug.host import run_host

    return run_host(load_config(Path(args.config)))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `sparkplug` subcommand."""
    parser = subparsers.add_parser(
        "sparkplug",
        help="run the Sparkplug B primary host application",
        description="Bring Sparkplug B edge nodes in: publish the host's STATE, judge births, "
        "data and deaths by bdSeq and seq, ask for rebirths, and store windows, events and "
        "online/offline like any millrace device (docs/sparkplug.md).",
    )
    parser.add_argument("--config", required=True, help="sparkplug TOML file (docs/sparkplug.md)")
    parser.set_defaults(func=_sparkplug)
