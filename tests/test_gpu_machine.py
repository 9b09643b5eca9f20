"""Play the GPU machine on CPU: the tree travels to it, and `make gpu-check` starts there.

That machine receives the checkout's tracked files (64 MiB at most), has torch and triton but no
SGLang, and brings back at most 8 files of 16 MiB. So: the tracked tree stays <= 56 MiB, and with
SGLang made unimportable (a meta-path blocker in a subprocess) every gpu-check step's CPU variant
starts, imports what it needs and finishes, `pytest -m gpu` collects without errors, and what the
check leaves in $OUT fits what comes back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent
TREE_LIMIT = 56 * 2**20
BLOCKER = '''import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "sglang" or name.startswith("sglang.") or name == "sgl_kernel":
            raise ModuleNotFoundError(f"blocked {name} (a machine without SGLang)")
        return None
sys.meta_path.insert(0, _Block())
'''


def test_the_tracked_tree_travels_to_a_gpu_machine():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    sizes = {n: (ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file()}
    total = sum(sizes.values())
    largest = sorted(sizes, key=sizes.get, reverse=True)[:3]
    assert total <= TREE_LIMIT, (
        f"tracked tree {total / 2**20:.1f} MiB > 56 MiB; largest: "
        + ", ".join(f"{n} {sizes[n] / 2**20:.1f} MiB" for n in largest)
    )


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """`python -m bench.gpu_check --rehearse` with SGLang unimportable: (rc, stdout, out, back)."""
    tmp = tmp_path_factory.mktemp("gpu_machine")
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(BLOCKER)
    out, back = tmp / "results", tmp / "OUT"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYNX_SGLANG_")}
    env.update(PYTHONPATH=os.pathsep.join((str(tmp / "block"), str(ROOT))), OUT=str(back))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--rehearse", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    return done, out, back


def test_the_blocker_really_blocks_sglang(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import sglang"], env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode != 0 and "blocked sglang" in done.stderr


def test_every_gpu_check_step_starts_without_sglang(rehearsal):
    done, out, _ = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["rehearsal"] is True
    assert [s["step"] for s in report["steps"]] == [c.name for c in gpu_check.CHECKS]
    for step in report["steps"]:
        log = (out / f"{step['step']}.txt").read_text()
        assert step["rc"] == 0, log[-3000:]
        assert "Traceback" not in log, log[-3000:]


def test_pytest_collects_the_gpu_tests_without_errors(rehearsal):
    _, out, _ = rehearsal
    log = (out / "tests.txt").read_text()
    last = log.strip().splitlines()[-1]  # "N/M tests collected (D deselected) in S s"
    assert re.match(r"\d+/\d+ tests collected", last) and "error" not in last, log[-2000:]
    assert "ERROR collecting" not in log and int(last.split("/")[0]) > 0


def test_the_smoke_step_writes_facts_and_a_kernel_check_at_once(rehearsal):
    _, out, _ = rehearsal
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["torch"] and smoke["triton"] and smoke["device"] is None  # CPU: no device
    assert smoke["selection"]["equal_to_reference"] is True
    assert smoke["seconds"] <= gpu_check.SMOKE_S
    summary = json.loads((out / "gpu_check.json").read_text())["steps"][0]["summary"]
    assert summary["selection"] == smoke["selection"]


def test_sglang_rows_are_absent_or_recorded_never_estimated(rehearsal):
    _, out, _ = rehearsal
    rows = json.loads((out / "compare_offload_gpu.json").read_text())["rows"]
    sglang = [r for r in rows if "sglang" in r["system"]]
    assert sglang
    for r in sglang:
        if r["status"] == "ok":
            assert r["counter_source"].startswith("recorded by a run with SGLang")
        else:
            assert r["status"].startswith("absent: SGLang is not installed")
            assert r["misses_per_layer_step"] is None and r["tokens_per_s"] is None


def test_what_comes_back_fits_the_device_tool(rehearsal):
    _, _, back = rehearsal
    files = sorted(p for p in back.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"gpu_check.json", "smoke.txt", "compare_offload_gpu.json"}
    assert len(files) <= gpu_check.MAX_FILES_BACK, [p.name for p in files]
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
