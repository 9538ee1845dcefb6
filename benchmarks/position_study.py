"""Position or feature? Post-RoPE vs query-frame contrasts on the default model.

Usage: python benchmarks/position_study.py [filter] [binding] [agreement] [recency]

For each task (120 records each, kept small: 100 permutations, 30 random subspaces, 32 swap
and attribution records) the heads are picked once by the scan (post-RoPE run) and kept for
the query-frame run. Prints one row per task, frame, head and feature: the query–key offset
test (pooled AUC, * = flagged; groups flagged by the rank or the Kolmogorov–Smirnov test), ranks (null, energy) and p, the feature's swap Δp against its
random subspaces, the attribution's explained fraction, the rotary-band positional index of
the pooled query / key subspace, and the position control (‖ΔC_pos‖/‖ΔC‖ vs the
shuffled-label null, smallest angle to the real subspace, share of keys in mixed bins; then
the same ratio and null averaged over the feature's groups, each against its own subspace).

``recency`` is a contrast of this study's own, built to be pure position: the filter
prompts with the *last listed item* as the positive key and every other item negative.
"""

from __future__ import annotations

import dataclasses
import sys
import time

from qkcov.models.loading import load_model
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records

SETTINGS = dict(n_permutations=100, n_bootstrap=0, n_random=30, n_swap=32, n_attribution=32,
                n_scan=48, progress=False)  # fmt: skip


def recency(records):
    out = []
    for r in records:
        items = sorted([*r.positives, *r.negatives], key=lambda s: s.start)
        out.append(dataclasses.replace(r, positives=[items[-1]], negatives=items[:-1],
                                       feature="recency", group=None))  # fmt: skip
    return out


def tasks():
    filt = build_task_records("filter", n_build=80, n_heldout=40)
    return {
        "filter": lambda: filt,
        "binding": lambda: build_task_records("binding", n_build=40, n_heldout=20),
        "agreement": lambda: build_task_records("agreement", n=120),
        "recency": lambda: recency(filt),
    }


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def rows(task, res):
    d = res.to_dict()
    offsets = d["position"]["offsets"]
    for h in d["heads"]:
        pos = h["position"]
        for f, fd in h["features"].items():
            g = fd["groups"]["pooled"]
            sig = g.get("significance") or {}
            cond = h["swaps"]["conditions"].get(f) or h["swaps"]["conditions"].get(f"{f}:groups")
            prof = ((pos.get("rotary_profile") or {}).get(f) or {}).get("pooled") or {}
            ctrl = (pos.get("control") or {}).get(f) or {}
            off = offsets[f]["pooled"]
            flagged = [g for g, t in offsets[f].items() if g != "pooled" and t["confounded"]]
            n_groups = len(offsets[f]) - 1
            ang = ctrl.get("angles_degrees") or []
            grp = [c for c in (ctrl.get("groups") or {}).values() if "norm_ratio" in c]
            mean = lambda k, grp=grp: sum(c[k] for c in grp) / len(grp) if grp else None  # noqa: E731
            yield [
                task, d["position"]["frame"], h["name"], f,
                _f(off["auc"], 2) + ("*" if off["confounded"] else ""),
                f"{len(flagged)}/{n_groups}" if n_groups else "–",
                str(g["rank"]), str(g["rank_energy"]), _f(sig.get("p_value")),
                "–" if cond is None else _f(cond["delta_p"]),
                "–" if cond is None else _f(cond["random"]["delta_p"]["mean"]),
                _f(None if h["attribution"]["skipped"] else h["attribution"]["explained_fraction"]),
                _f((prof.get("query") or {}).get("positional_index"), 2),
                _f((prof.get("key") or {}).get("positional_index"), 2),
                _f(ctrl.get("norm_ratio"), 2), _f(ctrl.get("null_ratio"), 2),
                _f(min(ang), 0) if ang else "–", _f(ctrl.get("mixed_fraction"), 2),
                _f(mean("norm_ratio"), 2), _f(mean("null_ratio"), 2),
            ]  # fmt: skip


COLS = ["task", "frame", "head", "feature", "offset AUC", "grp flagged", "rank", "rank(E)", "p", "Δp swap",
        "Δp rand", "explained", "q pos-idx", "k pos-idx", "‖ΔCpos‖/‖ΔC‖", "null", "angle°",
        "mixed", "groups: pos", "null"]  # fmt: skip


def main() -> None:
    lm = load_model("smollm2-135m")
    wanted = sys.argv[1:] or ["filter", "binding", "agreement", "recency"]
    table = [COLS]
    for name, build in tasks().items():
        if name not in wanted:
            continue
        records = build()
        t0 = time.perf_counter()
        post = analyze(lm.model, lm.tokenizer, records, heads="auto:2", **SETTINGS)
        heads = ",".join(h.name for h in post.heads)
        t1 = time.perf_counter()
        query = analyze(lm.model, lm.tokenizer, records, heads=heads, frame="query", **SETTINGS)
        t2 = time.perf_counter()
        print(f"# {name}: {len(records)} records, post {t1 - t0:.0f} s, query {t2 - t1:.0f} s",
              flush=True)  # fmt: skip
        for res in (post, query):
            table += list(rows(name, res))
    widths = [max(len(r[i]) for r in table) for i in range(len(COLS))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
