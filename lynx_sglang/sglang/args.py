"""The launcher's command line: ``--lynx-*`` flags beside all of SGLang's.

Our flags are parsed first, without importing SGLang, so a bad value fails in a fraction of a
second with one line; the rest of the command line goes to SGLang's own parser unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from lynx_sglang.config import ConfigError, LynxConfig, flag_name, setting_names

PROG = "lynx-sglang-server"
FLAG_PREFIX = "--lynx"
HELP_FLAGS = ("-h", "--help")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def lynx_parser(prog: str = PROG) -> OneLineParser:
    """A parser of only the ``--lynx-*`` flags (no abbreviations, no help)."""
    parser = OneLineParser(prog=prog, add_help=False, allow_abbrev=False)
    LynxConfig.add_cli_args(parser)
    return parser


def parse_lynx_args(
    argv: Sequence[str], prog: str = PROG, environ: dict | None = None
) -> tuple[LynxConfig, list[str]]:
    """Split ``argv`` into our config (flags over ``LYNX_SGLANG_*`` env over defaults) and SGLang's
    arguments. Exits with status 2 and one line on an unknown or malformed lynx setting."""
    parser = lynx_parser(prog)
    namespace, rest = parser.parse_known_args(list(argv))
    unknown = [arg for arg in rest if arg.startswith(FLAG_PREFIX)]
    if unknown:
        parser.error(
            f"unrecognized argument {unknown[0].split('=')[0]}; known: {', '.join(lynx_flags())}"
        )
    try:
        cfg = LynxConfig.from_cli_args(namespace, environ)
    except ConfigError as e:
        parser.error(str(e))
    return cfg, rest


def lynx_flags() -> list[str]:
    """Every ``--lynx-*`` flag, in config order."""
    return [flag_name(name) for name in setting_names()]


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def full_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """SGLang's server flags plus ours (for ``--help``)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=prog,
        description="SGLang's server with lynx-sglang (batch-aware expert selection and a "
        "CPU-GPU expert cache). Every --lynx-* flag can also be set as a LYNX_SGLANG_* environment "
        "variable (e.g. LYNX_SGLANG_MODE=lynx).",
    )
    ServerArgs.add_cli_args(parser)
    LynxConfig.add_cli_args(parser)
    return parser


def fail(message: str, prog: str = PROG) -> NoReturn:
    """Exit with status 2 and one line on stderr."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)
