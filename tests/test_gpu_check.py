"""The device check (benchmarks/gpu_check.sh): its CPU dry run passes every check, and without
CUDA the real check says so in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
CHECK = re.compile(r"^(?P<name>[a-z0-9_]+): \S+ \(.*\) (?P<verdict>ok|FAIL)$")


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def test_dry_run_passes_every_check():
    proc = _run("--dry-run", timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]
    checks = [m for m in map(CHECK.match, out.splitlines()) if m]
    names = {m["name"] for m in checks}
    # parity (attention and logits), ΔC across devices/dtypes, the timed run, the time budget
    for want in ("parity_tiny_cpu_float32", "parity_tiny_cpu_bfloat16", "logits_hooks_tiny_cpu_bfloat16",
                 "delta_c_cpu_bfloat16_vs_cpu_float32", "parity_tiny_shape_cpu_bfloat16", "run_heads", "swap_conditions_min", "peak_rss_gib"):  # fmt: skip
        assert want in names, out
    assert all(m["verdict"] == "ok" for m in checks), out
    assert "FAIL" not in out
    assert re.search(r"^run_over_limit: \S+ \(target ≤ 1\.3\) (met|not met)$", out, re.M), out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("gpu_check summary: ") and summary.endswith("— ok"), summary
    assert f"{len(checks)}/{len(checks)} checks ok" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the real check would run")
def test_without_cuda_one_line_and_exit_1():
    proc = _run(timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert len(lines) == 1 and "no CUDA device is available" in lines[0], proc.stdout
    assert "Traceback" not in proc.stderr
