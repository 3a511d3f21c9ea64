"""The `millrace` command: one entry point, one subcommand group per role.

Each group lives next to the code it drives (`edge/cli.py`, `cloud/cli.py` ...)
and is imported only when named, so a gateway without the cloud extra can
still run `millrace edge`. A group module exposes `register(subparsers)`,
which adds its parser and sets `func` to a handler taking the parsed args and
returning an exit code.

Exit codes (docs/cli.md) are the constants in `millrace.errors`: 0 ok, 1 the
command ran and found a failure, 2 usage or configuration error, 3 a service
it needs did not answer, 70 a bug.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from millrace import __version__, logsetup
from millrace.errors import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    MillraceError,
)

# subcommand -> module holding its `register`; kept lazy (see module docstring).
COMMAND_MODULES: dict[str, str] = {
    "pki": "millrace.ops.pki_cli",
    "broker": "millrace.ops.broker_cli",
    "db": "millrace.cloud.cli",
    "ingest": "millrace.cloud.cli",
    "sparkplug": "millrace.cloud.sparkplug.cli",
    "cmd": "millrace.cloud.cli",
    "alerts": "millrace.cloud.cli",
    "edge": "millrace.edge.cli",
    "sim": "millrace.fieldsim.cli",
    "dash": "millrace.dashboards.cli",
    "provision": "millrace.ops.provision_cli",
    "up": "millrace.ops.stack_cli",
    "down": "millrace.ops.stack_cli",
    "status": "millrace.ops.stack_cli",
}


EXIT_CODES_EPILOG = f"""\
exit codes:
  {EXIT_OK:<4} success
  {EXIT_FAILED:<4} the command ran and found a failure (edge check: the plant broker refused
       the device or a signal could not be read; cmd: the device replied with an error)
  {EXIT_USAGE:<4} usage or configuration error: fix the command line or the config file
  {EXIT_UNREACHABLE:<4} a service it needs did not answer (database, broker, the device for cmd)
  {EXIT_INTERNAL:<4} internal error (a bug; the traceback is printed)
  {EXIT_INTERRUPTED:<4} interrupted
"""
LOG_LEVEL_HELP = "DEBUG, INFO, WARNING or ERROR (env MILLRACE_LOG_LEVEL; default INFO)"


def _log_level(text: str) -> int:
    try:
        return logsetup.parse_level(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept `--log-level` after any subcommand too (`millrace edge run --log-level DEBUG`)."""
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                sub.add_argument(
                    "--log-level",
                    type=_log_level,
                    default=argparse.SUPPRESS,
                    metavar="LEVEL",
                    help=LOG_LEVEL_HELP,
                )
                _add_log_level_everywhere(sub)


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="millrace",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"millrace {__version__}")
    parser.add_argument(
        "--log-level", type=_log_level, default=None, metavar="LEVEL", help=LOG_LEVEL_HELP
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
    _add_log_level_everywhere(parser)
    return parser


def _env_log_level() -> int:
    text = os.environ.get("MILLRACE_LOG_LEVEL", "").strip()
    try:
        return logsetup.parse_level(text) if text else logging.INFO
    except ValueError as exc:
        raise MillraceError(f"MILLRACE_LOG_LEVEL: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line and exit 2, never a traceback."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    try:
        parser = _build_parser(command)
        args = parser.parse_args(args_list)
        level = args.log_level if args.log_level is not None else _env_log_level()
        logsetup.configure(level, stream=sys.stderr)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except MillraceError as exc:
        print(f"millrace: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `millrace status | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:  # a bug: show it, and keep exit 1 meaning "the check found a failure"
        traceback.print_exc()
        print(
            "millrace: internal error (a bug; please report the traceback above)", file=sys.stderr
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
