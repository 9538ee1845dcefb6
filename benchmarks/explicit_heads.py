"""Wall time saved by explicit ``--heads``: the swaps need each held-out record's attention
row of the studied heads (to pick the most-attended positive key); with explicit heads only
those heads' layers are computed and each forward stops after the deepest of them, instead
of the all-head scan over every layer.

240 agreement records on the default model, ``--heads L13H8`` (and ``L25H2``), records split
and subset exactly as ``qkcov run`` does (70 % build, ``--n-swap 64`` held-out records). Times
the phase both ways in one process on one loaded model, checks the rows are identical, and
prints the seconds saved and the ratio.
"""

from __future__ import annotations

import time

import torch

from qkcov.engine.contrast import resolve_records
from qkcov.engine.scan import attention_rows
from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, _subset, plan_records
from qkcov.tasks.builtin import build_task_records


def main() -> None:
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=240)
    for heads in ("L13H8", "L25H2"):
        cfg = RunConfig(heads=heads)
        plan = plan_records(records, cfg)
        idx = _subset(plan.indices("heldout", two_sided=True), cfg.n_swap, cfg.seed, "swap-subset")
        resolved = resolve_records(lm.tokenizer, [plan.records[i] for i in idx])
        layer, head = int(heads[1:].split("H")[0]), int(heads.split("H")[1])
        out, secs = {}, {}
        for name, layers in (("all_heads", None), ("explicit", [layer])):
            t0 = time.perf_counter()
            out[name] = attention_rows(
                lm.model, lm.tokenizer, resolved, progress=False, layers=layers
            )
            secs[name] = time.perf_counter() - t0
        assert torch.equal(out["all_heads"][:, layer, head], out["explicit"][:, layer, head])
        print(
            f"{heads}: {len(resolved)} swap records of {len(records)}; all-head scan "
            f"{secs['all_heads']:.1f} s, explicit {secs['explicit']:.1f} s; "
            f"saved {secs['all_heads'] - secs['explicit']:.1f} s "
            f"({secs['all_heads'] / secs['explicit']:.1f}x)"
        )


if __name__ == "__main__":
    main()
