"""``python -m lynx_sglang.launch_server``: our flags beside SGLang's, one-line errors that come
before SGLang is even imported, ``LYNX_SGLANG_*`` env vars that round-trip into spawned processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lynx_sglang.config import LynxConfig
from lynx_sglang.sglang.args import lynx_flags, parse_lynx_args

MODULE = [sys.executable, "-m", "lynx_sglang.launch_server"]


def run_launcher(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_")}
    base["SGLANG_PLUGINS"] = "lynx_sglang"
    return subprocess.run(
        [*MODULE, *args], env={**base, **env}, capture_output=True, text=True, timeout=600
    )


def test_flags_parse_and_leave_sglang_flags_alone():
    argv = ["--model-path", "m", "--lynx-mode", "lynx+offload", "--tp-size", "1",
            "--lynx-slots", "16", "--lynx-budget=0.5", "--lynx-prefetch", "temporal",
            "--disable-cuda-graph", "--lynx-prefetch-select", "0"]  # fmt: skip
    cfg, rest = parse_lynx_args(argv, environ={})
    assert cfg == LynxConfig(
        mode="lynx+offload", slots=16, budget=0.5, prefetch="temporal", prefetch_select=False
    )
    assert rest == ["--model-path", "m", "--tp-size", "1", "--disable-cuda-graph"]


def test_flags_override_env_which_overrides_defaults():
    env = {"LYNX_SGLANG_MODE": "lynx", "LYNX_SGLANG_BUDGET": "0.3", "LYNX_SGLANG_SLOTS": "12"}
    cfg, _ = parse_lynx_args(["--lynx-budget", "0.7"], environ=env)
    assert (cfg.mode, cfg.budget, cfg.slots) == ("lynx", 0.7, 12)


def test_env_round_trip():
    cfg = LynxConfig(mode="offload", slots=24, eviction="lfu", prefetch_select=False,
                     log_interval=5.0, executor="eager")  # fmt: skip
    env = cfg.to_env()
    assert LynxConfig.from_env(env) == cfg
    assert parse_lynx_args([], environ=env)[0] == cfg
    assert sorted(env) == sorted("LYNX_SGLANG_" + f[len("--lynx-") :].replace("-", "_").upper()
                                 for f in lynx_flags())  # fmt: skip


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--lynx-mode", "bogus"], {}, "invalid choice: 'bogus'"),
        (["--lynx-slots", "many"], {}, "--lynx-slots must be int"),
        (["--lynx-budget", "1.5"], {}, "--lynx-budget must be in (0, 1]"),
        (["--lynx-colour", "red"], {}, "unrecognized argument --lynx-colour"),
        (["--lynx-mode"], {}, "expected one argument"),
        ([], {"LYNX_SGLANG_MODE": "fast"}, "--lynx-mode must be one of"),
        ([], {"LYNX_SGLANG_SLOT": "3"}, "unknown lynx-sglang environment variable LYNX_SGLANG_SLOT; did you mean LYNX_SGLANG_SLOTS?"),
    ],
)
def test_bad_values_fail_fast_with_one_line(args, env, needle):
    start = time.monotonic()
    done = run_launcher("--model-path", "some/model", *args, **env)
    elapsed = time.monotonic() - start
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("lynx-sglang-server: error: ") and needle in lines[0], lines[0]
    assert elapsed < 10  # decided before SGLang (or torch) is imported


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_ours_with_sglangs(flag, capsys, monkeypatch):
    pytest.importorskip("sglang")
    monkeypatch.setenv("SGLANG_PLUGINS", "lynx_sglang")
    from lynx_sglang.launch_server import main

    main([flag])
    out = capsys.readouterr().out
    for ours in lynx_flags():
        assert ours in out
    for theirs in ("--model-path", "--tp-size", "--moe-runner-backend", "--disable-cuda-graph"):
        assert theirs in out
    assert "LYNX_SGLANG_" in out


@pytest.mark.slow
def test_unsupported_server_config_is_one_line():
    """Through SGLang's real argument parser and plugin loader, before any process is spawned."""
    pytest.importorskip("sglang")
    done = run_launcher(
        "--model-path", "dummy", "--ep-size", "2", "--load-format", "dummy",
        "--lynx-mode", "offload", "--lynx-slots", "8",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("lynx-sglang-server: error: lynx-sglang --lynx-mode offload: ")
    assert "expert parallelism" in last and "--load-format dummy" in last
    assert "supports MoE on the triton MoE runner" in last


@pytest.mark.slow
def test_resolved_config_is_checked_in_sglangs_own_startup(tmp_path):
    """Graph defaults and the model's top-k are only known once SGLang resolves its config: our
    check_server_args hook rejects them inside SGLang's launch, before any process spawns."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sglang")
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=32, architectures=["Qwen3MoeForCausalLM"],
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    done = run_launcher(
        "--model-path", str(tmp_path), "--device", "cpu", "--lynx-mode", "offload",
        "--lynx-slots", "2", "--lynx-executor", "eager",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert "cannot run inside a CUDA graph: add --disable-cuda-graph" in errors[0]
    assert "--lynx-slots 2 is below the router's top-k (4)" in errors[0]
