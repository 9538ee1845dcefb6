"""`qkcov filter` end to end on the default model: the pre-pipeline implementation (git
commit BASE, run from a temporary worktree) against this tree, on the same records.

Both run the filter task at the old defaults (300 build / 200 held-out prompts, 1 auto head,
64 swap prompts); the new run additionally computes the permutation null and bootstrap and uses
100 offline random subspaces instead of 10. Prints ``filter_speedup=`` (old ÷ new wall time,
measured back to back) and the largest relative ΔC difference and rank agreement of the head.

Usage: python benchmarks/filter_speed.py [BASE]   (default BASE: 042b1ea)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "042b1ea"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_tree = tmp / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), base],
            check=True,
            capture_output=True,
        )
        try:
            env_old = dict(os.environ, PYTHONPATH=str(old_tree / "src"))
            env_new = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
            t_old = timed(
                [sys.executable, "-m", "qkcov", "filter", "--out", str(tmp / "old-out"), "--quiet"],
                env_old,
            )
            t_new = timed([sys.executable, "-m", "qkcov", "filter", "--out", str(tmp / "new-out"), "--quiet",
                           "--n-build", "300", "--n-heldout", "200", "--heads", "auto:1", "--n-swap", "64"], env_new)  # fmt: skip
            old = load_file(tmp / "old-out" / "filter.safetensors")
            new = load_file(tmp / "new-out" / "run.safetensors")
            import json

            old_info = json.loads((tmp / "old-out" / "filter.json").read_text())
            new_info = json.loads((tmp / "new-out" / "run.json").read_text())
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                capture_output=True,
            )
    head = old_info["heads"][0]["name"]
    new_head = new_info["heads"][0]
    print(f"old head {head}, new head {new_head['name']}")
    worst, ranks_equal = 0.0, True
    for g, r_old in old_info["heads"][0]["rank"].items():
        if g == "union":
            continue
        d_old = old[f"{head}.delta.{g}"].double()
        d_new = new[f"{head}.feature.{g}.delta"].double()
        worst = max(worst, float((d_old - d_new).norm() / d_old.norm()))
        r_new = new_head["features"]["feature"]["groups"][g]["rank_energy"]
        ranks_equal &= r_old == r_new
        print(
            f"  {g:12s} rank old {r_old} new (energy) {r_new} (null) {new_head['features']['feature']['groups'][g]['rank']}"
        )
    print(f"old_seconds={t_old:.1f} new_seconds={t_new:.1f}")
    print(f"filter_speedup={t_old / t_new:.2f}")
    print(
        f"delta_max_rel_diff={worst:.2e} (old artifacts store ΔC in float32) ranks_equal={ranks_equal}"
    )


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
