"""Report tables of the position diagnostics (offsets, rotary profile, position control),
read only from ``run.json``."""

from __future__ import annotations

from typing import Any

__all__ = ["position_tables"]


def _f(x: Any, nd: int = 3) -> Any:
    return "–" if x is None else round(float(x), nd)


def position_tables(info: dict[str, Any]) -> list[dict[str, Any]]:
    tables = []
    offsets = (info.get("position") or {}).get("offsets") or {}
    rows = [
        [f, g, t.get("n_pos"), t.get("n_neg"), _f(t.get("median_pos"), 1), _f(t.get("median_neg"), 1),
         _f(t.get("auc")), "–" if t.get("p_value") is None else f"{t['p_value']:.2g}",
         "yes" if t.get("confounded") else "no"]
        for f, groups in offsets.items() for g, t in groups.items()
    ]  # fmt: skip
    if rows:
        tables.append(
            {
                "caption": "Query–key offsets of positive vs negative keys (build records; "
                "Mann–Whitney, AUC = P(offset⁺ > offset⁻))",
                "columns": [
                    "feature",
                    "group",
                    "n+",
                    "n−",
                    "median offset+",
                    "median offset−",
                    "AUC",
                    "p",
                    "confounded",
                ],  # fmt: skip
                "rows": rows,
            }
        )
    prof_rows, ctrl_rows = [], []
    for h in info.get("heads", []):
        pos = h.get("position") or {}
        for f, groups in (pos.get("rotary_profile") or {}).items():
            p = groups.get("pooled") or {}
            if p.get("key"):
                prof_rows.append([h["name"], f, p["rank_used"], _f(p["query"]["positional_index"]),
                                  _f(p["key"]["positional_index"]), _f(p["key"]["non_rotary"])])  # fmt: skip
        controls = [
            (f, g, cg)
            for f, c in (pos.get("control") or {}).items()
            for g, cg in [("pooled", c), *sorted((c.get("groups") or {}).items())]
        ]
        for f, g, c in controls:
            if "skipped" in c:
                continue
            ang = c["angles_degrees"]
            ctrl_rows.append([h["name"], f, g, c["rank"], _f(c["norm_ratio"]), _f(c["null_ratio"]),
                              _f(c["real_energy_in_position"]), _f(c["chance"]),
                              _f(min(ang), 1) if ang else "–", _f(c["mixed_fraction"])])  # fmt: skip
    if prof_rows:
        tables.append(
            {
                "caption": "Rotary-band profile of each pooled subspace (positional index: 1 = "
                "all energy in the fastest rotary pair, 0 = slowest or non-rotary)",
                "columns": [
                    "head",
                    "feature",
                    "rank",
                    "query index",
                    "key index",
                    "key non-rotary",
                ],
                "rows": prof_rows,
            }
        )
    if ctrl_rows:
        tables.append(
            {
                "caption": "Position control: ΔC of keys relabelled by offset alone (labels shuffled "
                "within offset bins) beside the real ΔC. ‖ΔC_pos‖/‖ΔC‖ near the shuffled-label "
                "null = little is position; near 1 with a small angle = the subspace is position; "
                "mixed = share of keys in bins holding both labels (0: the records cannot tell)",
                "columns": [
                    "head",
                    "feature",
                    "group",
                    "rank",
                    "‖ΔC_pos‖/‖ΔC‖",
                    "null",
                    "energy in pos. subspace",
                    "chance",
                    "min angle°",
                    "mixed",
                ],  # fmt: skip
                "rows": ctrl_rows,
            }
        )
    return tables
