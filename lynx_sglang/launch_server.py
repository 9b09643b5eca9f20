"""``python -m lynx_sglang.launch_server <sglang flags> --lynx-mode lynx ...``: SGLang's server
with the lynx-sglang plugin switched on.

A thin wrapper: it parses our flags, exports them as ``LYNX_SGLANG_*`` (SGLang's spawned scheduler
processes inherit them), checks that the plugin's hooks are in place, and runs SGLang's launcher.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Optional

from lynx_sglang.config import ConfigError
from lynx_sglang.sglang.args import PROG, fail, full_parser, parse_lynx_args, wants_help


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse, validate, export the settings and serve."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        _load_plugins()  # plugins may add SGLang flags
        full_parser(PROG).print_help()
        return
    cfg, sglang_argv = parse_lynx_args(argv, PROG)  # bad lynx settings fail before SGLang loads
    os.environ.update(cfg.to_env())

    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from lynx_sglang.sglang.checks import UnsupportedConfig, check, facts_from_server_args
    from lynx_sglang.sglang.hooks import HooksMissing, verify_hooks

    _load_plugins()  # as SGLang's own launcher does, before its arguments are parsed
    server_args = prepare_server_args(sglang_argv)
    try:
        verify_hooks(cfg)
        check(cfg, facts_from_server_args(server_args))
    except (HooksMissing, UnsupportedConfig) as e:
        fail(str(e), PROG)
    try:
        run_server(server_args)
    except (ConfigError, HooksMissing, UnsupportedConfig) as e:
        fail(str(e), PROG)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def _load_plugins() -> None:
    from sglang.srt.plugins import load_plugins

    load_plugins()


if __name__ == "__main__":
    main()
