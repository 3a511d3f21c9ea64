"""The `millrace` command: one entry point, one subcommand group per role.

Each group lives next to the code it drives (`edge/cli.py`, `cloud/cli.py` ...)
and is imported only when named, so a gateway without the cloud extra can
still run `millrace edge`. A group module exposes `register(subparsers)`,
which adds its parser and sets `func` to a handler taking the parsed args and
returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from millrace import __version__
from millrace.errors import MillraceError

# subcommand -> module holding its `register`; kept lazy (see module docstring).
COMMAND_MODULES: dict[str, str] = {
    "pki": "millrace.ops.pki_cli",
    "broker": "millrace.ops.broker_cli",
    "db": "millrace.cloud.cli",
    "ingest": "millrace.cloud.cli",
    "cmd": "millrace.cloud.cli",
    "edge": "millrace.edge.cli",
    "sim": "millrace.fieldsim.cli",
    "dash": "millrace.dashboards.cli",
    "provision": "millrace.ops.provision_cli",
    "up": "millrace.ops.stack_cli",
    "down": "millrace.ops.stack_cli",
    "status": "millrace.ops.stack_cli",
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="millrace", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"millrace {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MILLRACE_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING or ERROR (env MILLRACE_LOG_LEVEL)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else []
    if not modules:
        modules = list(dict.fromkeys(COMMAND_MODULES.values()))
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if command in COMMAND_MODULES:
                raise MillraceError(
                    f"'millrace {command}' is not available here ({exc}); "
                    "install the matching extra, e.g. pip install 'millrace[edge]'"
                ) from exc
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line and exit 2, never a traceback."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    try:
        parser = _build_parser(command)
        args = parser.parse_args(args_list)
        logging.basicConfig(
            level=getattr(logging, str(args.log_level).upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except MillraceError as exc:
        print(f"millrace: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `millrace status | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
