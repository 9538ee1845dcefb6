"""Did two runs find the same subspace? :func:`compare` (``qkcov compare RUN RUN ...``).

For every head and feature present in at least two runs (two seeds, two data sets, bfloat16
vs float32, ...): principal angles between their key subspaces and between their query
subspaces (at the rank in force and at the energy rank), their ranks and their headline
swap effects side by side. Runs on different models are refused with one line: subspaces
of different models live in different coordinates, so nothing is compared. Two runs are of the
same model when their recorded model identities (``provenance.model_identity``:
:func:`qkcov.models.identity.model_identity`) share a fingerprint, however the model was
loaded; runs written before identities were recorded compare by model name and geometry.

Everything is read from the run folders' artifacts (``run.json`` + ``run.safetensors``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core.subspace import feature_subspace, principal_angles

__all__ = ["Comparison", "compare"]

_GEOMETRY = ("n_layers", "n_heads", "n_kv_heads", "head_dim")


@dataclass
class Comparison:
    """``runs``: one label per run (its folder, or ``run<i>``); ``model``.

    ``ranks``: one row per (run, head, feature): ``verdict``; ``swap_condition``, ``rank``,
    ``rank_rule``, ``delta_p``, ``delta_p_random`` of the head's headline condition for its
    headline feature (``headline`` true; the one its verdict rests on, e.g. the causal rank)
    and of the feature's pooled condition otherwise; ``subspace_rank`` /
    ``subspace_rank_rule`` (the pooled ΔC's rank in force), ``rank_energy``, ``rank_null``,
    ``rank_causal``, ``p_value``.
    ``pairs``: one row per (head, feature, run a, run b): principal angles in degrees,
    ``key_deg`` / ``query_deg`` (rank in force, ascending), ``key_deg_energy`` /
    ``query_deg_energy`` (energy rank), and their maxima; ``None`` where a rank is 0.
    ``only_in_one``: ``"head/feature"`` present in a single run (not compared).
    """

    runs: list[str]
    model: str
    ranks: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    only_in_one: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "model": self.model,
            "ranks": self.ranks,
            "pairs": self.pairs,
            "only_in_one": self.only_in_one,
        }

    def summary(self) -> str:
        cols = ["head", "feature", "a", "b", "ranks", "k", "max key° @k", "max query° @k",
                "random @k", "top-1 key°", "top-1 query°", "max key° (energy)"]  # fmt: skip
        rows = [cols]
        for p in self.pairs:
            rows.append(
                [p["head"], p["feature"], p["a"], p["b"], f"{p['rank_a']}/{p['rank_b']}",
                 p["common_rank"], _deg(p["key_max_deg_common"]), _deg(p["query_max_deg_common"]),
                 _deg(p["random_max_deg_common"]), _deg(p["key_top1_deg"]),
                 _deg(p["query_top1_deg"]), _deg(p["key_max_deg_energy"])]
            )  # fmt: skip
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.only_in_one:
            lines.append(f"in one run only (not compared): {', '.join(self.only_in_one)}")
        lines += ["", *self.runs_table()]
        return "\n".join(lines)

    def runs_table(self) -> list[str]:
        """Each run's verdict and headline per head and feature: the condition its verdict
        rests on, its rank and rule, Δp against equal-rank random subspaces."""
        cols = ["head", "feature", "run", "verdict", "condition", "rank", "Δp", "random"]
        rows = [cols]
        for r in self.ranks:
            rows.append(
                [r["head"], r["feature"], r["run"], r.get("verdict") or "–",
                 r.get("swap_condition") or "–",
                 f"{r['rank']} ({r['rank_rule']})", _num(r["delta_p"]), _num(r["delta_p_random"])]
            )  # fmt: skip
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(cols))]
        lines = [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return lines

    def __repr__(self) -> str:
        return f"Comparison(model={self.model!r}, runs={self.runs}, pairs={len(self.pairs)})"

    def _repr_html_(self) -> str:
        from .report.compare import comparison_html

        return comparison_html(self, full_page=False)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _deg(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _load(run: Any, i: int) -> tuple[str, Any]:
    from .artifacts import artifact_errors
    from .results import AnalysisResult

    if isinstance(run, AnalysisResult):
        _check_ranks(run, f"run{i}")
        return f"run{i}", run
    where = Path(run) / "run.json"
    with artifact_errors(where, "run folder"):
        result = AnalysisResult.load(run)
        _check_ranks(result, str(where))
    return str(run), result


def _check_ranks(result: Any, where: str) -> None:
    result.check_ranges(where)


def _frame(result: Any) -> str:
    return "query" if (result.config or {}).get("frame") == "query" else "post-rope"


def _model_key(result: Any) -> tuple[Any, ...]:
    mi = result.model_info or {}
    return (result.model, *(mi.get(k) for k in _GEOMETRY))


def _model_text(result: Any, show: Sequence[str]) -> str:
    mi = result.model_info or {}
    extra = ", ".join(f"{k} {mi.get(k)}" for k in show)
    return f"{result.model}" + (f" ({extra})" if extra else "")


def _identity(result: Any) -> dict[str, Any] | None:
    """The model identity the run recorded (``provenance.model_identity``; ``None`` in runs
    written before it existed)."""
    ident = (getattr(result, "provenance", None) or {}).get("model_identity")
    return ident if isinstance(ident, dict) and ident.get("fingerprint") else None


def _same_model(a: Any, b: Any) -> bool:
    """Same model: the recorded identities' fingerprints (config, parameter shapes, weights)
    agree; for a run without one, its model name and head geometry."""
    ia, ib = _identity(a), _identity(b)
    geometry = _model_key(a)[1:] == _model_key(b)[1:]  # and the head geometry the runs record
    if ia is not None and ib is not None:
        return bool(ia["fingerprint"] == ib["fingerprint"]) and geometry
    return _model_key(a) == _model_key(b)


def _describe_model(result: Any) -> str:
    ident = _identity(result)
    if ident is None:
        return f"{result.model} (no recorded identity)"
    return f"{ident.get('name') or result.model} [{ident['fingerprint']}]"


def _angles(a: torch.Tensor, b: torch.Tensor) -> list[float] | None:
    if a.shape[1] == 0 or b.shape[1] == 0:
        return None
    return [math.degrees(float(x)) for x in principal_angles(a.double(), b.double())]


def _energy_bases(s: Any) -> tuple[torch.Tensor, torch.Tensor]:
    sub = feature_subspace(s.delta, rank=int(s.rank_energy))
    return sub.key_basis, sub.query_basis


def _max(x: list[float] | None) -> float | None:
    return None if not x else max(x)


def random_max_angle(dim: int, k: int, n: int = 200, seed: int = 0) -> float | None:
    """Median largest principal angle (degrees) between two Haar-random ``k``-dimensional
    subspaces of R^dim: the baseline an angle between two runs is read against."""
    from .core.subspace import random_orthonormal
    from .runtime import sub_seed

    if k == 0:
        return None
    draws = [
        math.degrees(float(principal_angles(
            random_orthonormal(dim, k, seed=sub_seed(seed, "compare-random", 2 * i)),
            random_orthonormal(dim, k, seed=sub_seed(seed, "compare-random", 2 * i + 1)),
        ).max()))
        for i in range(n)
    ]  # fmt: skip
    return float(torch.tensor(draws).median())


def _pair(sa: Any, sb: Any) -> dict[str, Any]:
    """Angles between two runs' subspaces of one head and feature."""
    ka, qa = _energy_bases(sa)
    kb, qb = _energy_bases(sb)
    k = min(sa.rank, sb.rank)
    key, query = _angles(sa.key_basis, sb.key_basis), _angles(sa.query_basis, sb.query_basis)
    key_c = _angles(sa.key_basis[:, :k], sb.key_basis[:, :k])
    query_c = _angles(sa.query_basis[:, :k], sb.query_basis[:, :k])
    key_e, query_e = _angles(ka, kb), _angles(qa, qb)
    top = min(1, k)
    return {
        "rank_a": sa.rank, "rank_b": sb.rank, "common_rank": k,
        "rank_energy_a": sa.rank_energy, "rank_energy_b": sb.rank_energy,
        "key_deg": key, "query_deg": query, "key_max_deg": _max(key), "query_max_deg": _max(query),
        "key_deg_common": key_c, "query_deg_common": query_c,
        "key_max_deg_common": _max(key_c), "query_max_deg_common": _max(query_c),
        "random_max_deg_common": random_max_angle(int(sa.delta.shape[1]), k),
        "key_top1_deg": _max(_angles(sa.key_basis[:, :top], sb.key_basis[:, :top])),
        "query_top1_deg": _max(_angles(sa.query_basis[:, :top], sb.query_basis[:, :top])),
        "key_deg_energy": key_e, "query_deg_energy": query_e,
        "key_max_deg_energy": _max(key_e), "query_max_deg_energy": _max(query_e),
    }  # fmt: skip


def compare(runs: Sequence[str | Path | Any], *, labels: Sequence[str] | None = None) -> Comparison:
    """Compare the subspaces of several runs (folders or :class:`AnalysisResult` objects).

    Raises ``ValueError`` (one line, nothing compared) for fewer than two runs or runs on
    different models (name or head geometry).
    """
    runs = list(runs)
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two runs, got {len(runs)}")
    loaded = [_load(r, i) for i, r in enumerate(runs)]
    names = list(labels) if labels is not None else [n for n, _ in loaded]
    if len(names) != len(loaded):
        raise ValueError(f"got {len(names)} labels for {len(loaded)} runs")
    first = loaded[0][1]
    if not all(_same_model(first, r) for _, r in loaded[1:]):
        # name what differs: the model, or (same name) the head geometry the runs record
        keys = {_model_key(r) for _, r in loaded}
        differ = [k for i, k in enumerate(_GEOMETRY) if len({key[i + 1] for key in keys}) > 1]
        same_name = len({r.model for _, r in loaded}) == 1
        if same_name and differ:
            what = "the same model name with different head geometry"
            models = "; ".join(
                f"{n}: {_model_text(r, differ)}" for n, (_, r) in zip(names, loaded, strict=True)
            )
        else:
            what = "different models"
            models = ", ".join(
                f"{n}: {_describe_model(r)}" for n, (_, r) in zip(names, loaded, strict=True)
            )
        raise ValueError(
            f"the runs are on {what} ({models}); subspaces of different models "
            "are in different coordinates, so nothing was compared"
        )
    frames = {_frame(r) for _, r in loaded}
    if len(frames) > 1:
        shown = "; ".join(f"{n}: {_frame(r)}" for n, (_, r) in zip(names, loaded, strict=True))
        raise ValueError(
            f"the runs' subspaces are in different frames ({shown}): post-RoPE keys and keys "
            "in their query's rotary frame (--frame query) are different coordinates, so "
            "nothing was compared; compare runs made with the same --frame"
        )
    cmp = Comparison(names, loaded[0][1].model)
    found: dict[tuple[str, str], list[tuple[str, Any, Any]]] = {}
    for name, (_, res) in zip(names, loaded, strict=True):
        data = res.to_dict()
        by_name = {h["name"]: h for h in data["heads"]}
        for h in res.heads:
            hd = by_name[h.name]
            causal = hd.get("causal_rank") or getattr(h, "causal_rank", None)
            hl = h.headline_rank
            for fname, fr in h.features.items():
                s = fr.pooled
                sig = s.significance or {}
                # the head's headline condition for its headline feature (the one its verdict
                # rests on), the feature's own pooled condition for any other feature
                is_headline = fname == hl.feature and hl.condition is not None
                c = h.swaps.conditions.get(hl.condition if is_headline else fname)
                cr = (
                    causal.get("rank")
                    if isinstance(causal, dict) and causal.get("feature") in (None, fname)
                    else None
                )
                cmp.ranks.append(
                    {"run": name, "head": h.name, "feature": fname,
                     "verdict": None if h.verdict is None else h.verdict.status,
                     "headline": is_headline,
                     "rank": c.rank if c is not None else s.rank,
                     "rank_rule": (hl.rule if is_headline else s.rank_rule)
                     if c is not None else s.rank_rule,
                     "subspace_rank": s.rank, "subspace_rank_rule": s.rank_rule,
                     "rank_energy": s.rank_energy,
                     "rank_null": sig.get("rank_null") if sig.get("available") else None,
                     "rank_causal": cr, "p_value": sig.get("p_value"),
                     "delta_p": None if c is None else c.metrics.get("delta_p"),
                     "delta_p_random": None if c is None or not c.random else c.random["delta_p"]["mean"],
                     "swap_condition": None if c is None else c.name}
                )  # fmt: skip
                found.setdefault((h.name, fname), []).append((name, s, c))
    for (head, fname), items in found.items():
        if len(items) < 2:
            cmp.only_in_one.append(f"{head}/{fname}")
            continue
        for (na, sa, _), (nb, sb, _) in itertools.combinations(items, 2):
            cmp.pairs.append({"head": head, "feature": fname, "a": na, "b": nb, **_pair(sa, sb)})
    return cmp
