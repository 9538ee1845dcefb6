"""Typed results of the pipeline (:func:`qkcov.analyze`, ``qkcov run``): one dataclass per
concept, with JSON (``run.json``) + safetensors (``run.safetensors``) round trips.

``run.json`` is the contract scripts read: ``heads`` is a list with one object per studied
head (``layer``, ``head``, ``rank``, ``swap``, ``random``, ``ceiling``, ``attribution``, ...),
plus ``model``, ``n_records`` and ``seconds``. Tensors (ΔC, bases, projections, the
attribution example) live in ``run.safetensors`` under ``<head>.<feature>.<group>.<name>``,
each feature, group and swap-condition name mapped by :func:`qkcov.naming.safe_component`
(plain lowercase names unchanged; real names stay in ``run.json``). A low-rank ΔC (a group's,
built from few records) is stored as exact float64 factors ``delta_left``/``delta_right``
instead of a dense ``delta`` (:mod:`qkcov.run_tensors`; both forms load).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core.subspace import FeatureSubspace
from .naming import safe_component, tensor_prefix
from .run_tensors import delta_tensors, read_delta

__all__ = [
    "format_p",
    "SubspaceResult",
    "FeatureResult",
    "ProjectionResult",
    "SwapCondition",
    "SwapResult",
    "Verdict",
    "VERDICTS",
    "Headline",
    "headline_of",
    "AttributionResult",
    "TokenViewResult",
    "HeadResult",
    "AnalysisResult",
    "RUN_JSON",
    "RUN_TENSORS",
]

RUN_JSON = "run.json"
RUN_TENSORS = "run.safetensors"
POOLED = "pooled"
SWAP_METRICS = ("delta_p", "flip_items", "flip_all", "logprob_shift")
VERDICTS = (
    "reads-feature", "separates-keys-not-feature", "confounded", "no-evidence", "not-testable",
)  # fmt: skip
"""Verdict statuses, best first (see :class:`Verdict`)."""


def _operation(name: str) -> Any:
    """An operation of a layer above the results on a result (``subspace_from_result`` of
    ``qkcov.export``, ``save_run`` of ``qkcov.report``): results.py imports neither (they
    import it), so the package root names each one's module and loads it on first use."""
    from . import _operation as operation

    return operation(name)


def headline_p(head: dict[str, Any]) -> float | None:
    """p of the headline: the pooled ΔC's, or the groups' max-T p when the headline swap
    is the union of the group subspaces."""
    sig = head.get("significance") or {}
    if (head.get("swap_condition") or "").endswith(":groups"):
        return sig.get("groups_p_value")
    return sig.get("p_value")


@dataclass(frozen=True)
class Headline:
    """The one rank a head is quoted at: what its verdict, the table, ``export``,
    ``subspace()``, compare and the report use.

    ``feature``: the head's headline feature (the run's first). ``condition``: the swap
    condition the verdict rests on (``"<feature>"``, ``"<feature>:groups"``, with
    ``"@causal"`` when the causal rank curve picked its rank), ``None`` when the swaps were
    skipped. ``rank``: that condition's dimension (the pooled rank in force without a swap).
    ``rule``: how the rank was chosen — ``"causal"`` (the causal rank curve), ``"null"``
    (whitened sequential deflated permutation test) or ``"energy"``. ``basis``: which ΔC
    the directions come from: ``"pooled"`` (the feature's pooled ΔC, so ``rank`` truncates
    its key/query bases) or ``"groups"`` (the energy-ordered union of its group subspaces).
    ``ranks``: every rank the run measured, by name (``causal``, ``null``, ``energy``; ``None``
    where not measured).
    """

    feature: str | None
    condition: str | None
    rank: int
    rule: str
    basis: str
    ranks: dict[str, int | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "condition": self.condition,
            "rank": self.rank,
            "rule": self.rule,
            "basis": self.basis,
            "ranks": dict(self.ranks),
        }

    @property
    def label(self) -> str:
        """``agreement@causal`` / ``agreement:groups`` / ``agreement (no swap)``."""
        if self.condition:
            return self.condition
        return f"{self.feature} (no swap)"


def _headline(
    feature: str | None,
    condition: str | None,
    cond_rank: int | None,
    causal: dict[str, Any] | None,
    pooled_rank: int,
    pooled_rule: str,
    rank_null: int | None,
    rank_energy: int | None,
) -> Headline:
    causal = causal if isinstance(causal, dict) else {}
    causal_rank = causal.get("rank") if causal.get("feature") in (None, feature) else None
    basis = "groups" if condition and ":groups" in condition else "pooled"
    if condition is None or cond_rank is None:
        rank, rule = pooled_rank, pooled_rule
    else:
        rank = int(cond_rank)
        by_curve = causal_rank is not None and causal.get("condition") == condition
        rule = "causal" if by_curve else pooled_rule
    ranks = {
        "causal": None if causal_rank is None else int(causal_rank),
        "null": None if rank_null is None else int(rank_null),
        "energy": None if rank_energy is None else int(rank_energy),
    }
    return Headline(feature, condition, rank, rule, basis, ranks)


def headline_of(head: dict[str, Any]) -> Headline:
    """The :class:`Headline` of one ``run.json`` head: its ``"headline"`` object, or, in
    folders written before it existed, derived from ``swap_condition``, ``causal_rank`` and
    ``rank`` (where ``rank`` held the headline condition's rank and ``rank_rule`` the pooled
    subspace's rule)."""
    hd = head.get("headline")
    if isinstance(hd, dict) and "rank" in hd:
        return Headline(
            hd.get("feature"), hd.get("condition"), int(hd["rank"]), str(hd.get("rule", "")),
            str(hd.get("basis", "pooled")), dict(hd.get("ranks") or {}),
        )  # fmt: skip
    features = head.get("features") or {}
    feature = next(iter(features), None)
    pooled = ((features.get(feature) or {}).get("groups") or {}).get(POOLED) or {}
    sig = head.get("significance") or {}
    sw = head.get("swaps") or {}
    condition = head.get("swap_condition") or sw.get("headline")
    c = (sw.get("conditions") or {}).get(condition or "")
    return _headline(
        feature,
        condition if c is not None else None,
        None if c is None else c.get("rank"),
        head.get("causal_rank") or sw.get("causal_rank"),
        int(pooled.get("rank", head.get("rank", 0)) or 0),
        str(pooled.get("rank_rule") or head.get("rank_rule") or ""),
        sig.get("rank_null") if sig.get("available") else None,
        pooled.get("rank_energy", sig.get("rank_energy")),
    )


def _r(x: float | None, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def format_p(p: float | None, floor: float | None = None, nd: int = 3) -> str:
    """A p-value as text; at (or below) its draw floor ``1/(n+1)`` it reads ``≤floor`` (the
    smallest p the draws can give, not an effect size)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤{floor:.2g}"
    return f"{p:.{nd}g}" if p < 0.001 else f"{p:.{nd}f}"


def html_table(columns: list[str], rows: list[list[Any]]) -> str:
    """A small escaped HTML table (notebook ``_repr_html_``; :mod:`qkcov.htmlsafe`)."""
    from .htmlsafe import table

    return table(columns, rows, lambda v: _r(v) if isinstance(v, float) else str(v))


@dataclass
class SubspaceResult:
    """ΔC of one head for one feature and group (``group="pooled"``: all groups).

    Attributes:
        rank: rank under the rule in force (``rank_rule``).
        rank_energy: rank at the energy threshold (always reported).
        subspace: SVD summary (``query_basis [D, rank]``, ``key_basis [D, rank]``, all
            ``singular_values [D]``).
        delta: ΔC ``[D, D]`` (float64).
        n_pos / n_neg: records contributing to each side.
        significance: statistics of the permutation null and bootstrap (or ``None``).
    """

    feature: str
    group: str
    rank: int
    rank_energy: int
    rank_rule: str
    subspace: FeatureSubspace
    delta: torch.Tensor
    n_pos: int
    n_neg: int
    significance: dict[str, Any] | None = None

    @property
    def key_basis(self) -> torch.Tensor:
        return self.subspace.key_basis[:, : self.rank]

    @property
    def query_basis(self) -> torch.Tensor:
        return self.subspace.query_basis[:, : self.rank]

    def __repr__(self) -> str:
        return (
            f"SubspaceResult({self.feature!r}/{self.group}, rank={self.rank} ({self.rank_rule}), "
            f"rank_energy={self.rank_energy}, D={self.delta.shape[0]}, n_pos={self.n_pos}, "
            f"n_neg={self.n_neg})"
        )

    def to_dict(self, n_sv: int = 16) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "rank_energy": self.rank_energy,
            "rank_rule": self.rank_rule,
            "singular_values": self.subspace.singular_values[:n_sv].tolist(),
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "significance": self.significance,
        }


@dataclass
class FeatureResult:
    """All subspaces of one feature for one head.

    ``groups``: per group with both sides, plus ``"pooled"``. ``union_key`` / ``union_query``:
    per-group subspaces stacked and ordered by energy (``None`` with fewer than 2 groups).
    ``principal_angles``: smallest angle (degrees) between each pair of group key subspaces.
    ``groups_p_value``: p of "some group's ΔC is above its null" (max-T over the groups).
    """

    name: str
    groups: dict[str, SubspaceResult]
    union_key: torch.Tensor | None = None
    union_query: torch.Tensor | None = None
    principal_angles: list[dict[str, Any]] = field(default_factory=list)
    groups_p_value: float | None = None  # max-T permutation p over the per-group ΔCs

    @property
    def pooled(self) -> SubspaceResult:
        return self.groups[POOLED]

    def __repr__(self) -> str:
        ranks = ", ".join(f"{g}={s.rank}" for g, s in self.groups.items())
        return f"FeatureResult({self.name!r}, ranks: {ranks})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": {g: s.to_dict() for g, s in self.groups.items()},
            "union_rank": None if self.union_key is None else int(self.union_key.shape[1]),
            "principal_angles": self.principal_angles,
            "groups_p_value": self.groups_p_value,
        }


@dataclass
class ProjectionResult:
    """Held-out keys/queries of one feature projected on its top-3 key/query directions.

    ``keys [m, 3]``, ``queries [n, 3]``; ``key_labels`` (m) / ``query_labels`` (n) are the
    record groups (``""`` for negative keys); ``key_groups`` (m): every key's record group
    (negative keys too; empty in runs saved before it); ``key_positive [m]``. ``accuracy``:
    nearest-centroid group accuracy of positive keys in 3-D (subspace / random / PCA /
    chance), ``None`` with fewer than 2 groups.
    """

    feature: str
    keys: torch.Tensor
    queries: torch.Tensor
    key_positive: torch.Tensor
    key_labels: list[str]
    query_labels: list[str]
    accuracy: dict[str, float] | None = None
    key_names: list[str] = field(default_factory=list)  # (m) token and JSONL line, for hover
    query_names: list[str] = field(default_factory=list)  # (n)
    key_groups: list[str] = field(default_factory=list)  # (m) every key's record group

    def __repr__(self) -> str:
        acc = (
            "" if not self.accuracy else f", accuracy={self.accuracy.get('subspace', math.nan):.3f}"
        )
        return f"ProjectionResult({self.feature!r}, keys={list(self.keys.shape)}{acc})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "key_labels": self.key_labels,
            "query_labels": self.query_labels,
            "key_names": self.key_names,
            "query_names": self.query_names,
            "key_groups": self.key_groups,
        }


@dataclass
class SwapCondition:
    """One swap condition: mean metrics over prompts, with optional per-prompt values
    (``per_prompt[metric] [n]``), CIs and the p-value against the random subspaces."""

    name: str
    rank: int
    metrics: dict[str, float]
    random: dict[str, dict[str, Any]] | None = None  # metric -> {"mean","std","draws"}
    per_prompt: dict[str, list[float]] | None = None
    ci: dict[str, list[float]] | None = None
    p_value: float | None = None
    permuted: dict[str, dict[str, Any]] | None = None  # label-permuted subspaces' metrics
    p_permuted: float | None = None  # p of Δp against the label-permuted subspaces

    def __repr__(self) -> str:
        m = ", ".join(f"{k}={v:.3f}" for k, v in self.metrics.items())
        rnd = ""
        if self.random and "delta_p" in self.random:
            rnd = f", random Δp {self.random['delta_p']['mean']:.3f}"
        p = "" if self.p_value is None else f", p={self.p_value:.3f}"
        return f"SwapCondition({self.name!r}, rank={self.rank}, {m}{rnd}{p})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            **{k: float(v) for k, v in self.metrics.items()},
            "random": self.random,
            "ci": self.ci,
            "p_value": self.p_value,
            "p_floor": _floor(self.random),
            "permuted": self.permuted,
            "p_permuted": self.p_permuted,
            "p_permuted_floor": _floor(self.permuted),
        }


def _floor(baseline: dict[str, dict[str, Any]] | None) -> float | None:
    """Smallest p the baseline's Δp draws can give, ``1/(draws + 1)`` (None without draws)."""
    draws = ((baseline or {}).get("delta_p") or {}).get("draws")
    return None if not draws else 1.0 / (len(draws) + 1)


@dataclass
class SwapResult:
    """In-forward key swaps of one head on held-out records (or why they were skipped).

    ``headline``: the condition the summary reports (the causal-rank subspace when the
    curve ran). ``causal_rank``: ``{"feature", "rank", "R", "fraction", "condition", "note",
    "curve": [{"r", "delta_p", "ci", "random_mean", "random_std", "permuted_mean",
    "permuted_std"}, ...]}``. ``label_test``: the label-sensitive centroid patch on the
    headline subspace (``effect``, ``ci``, ``permuted`` mean/std, ``p_value``). ``answers``:
    the unedited model's accuracy on the records' ``answer`` (``n``, ``top1``,
    ``mean_rank``, 1 = top). ``scored_token``: which token the log-prob shift scores.
    ``relation_test``: the cross-record exchange on the headline subspace
    (:func:`qkcov.engine.relational.relational_result`: ``effect``, ``p_value``, ``p_floor``,
    ``n_pairs``, ``relation_share``, ``declared_kind``…). ``transfer``: the headline's rank
    built on one position pattern and swapped on the other
    (:func:`qkcov.engine.relational.transfer_result`).
    """

    n: int
    headline: str | None
    conditions: dict[str, SwapCondition]
    ceiling: SwapCondition | None
    null: dict[str, float] | None
    n_random: int
    skipped: str | None = None
    causal_rank: dict[str, Any] | None = None
    label_test: dict[str, Any] | None = None
    answers: dict[str, Any] | None = None
    scored_token: str | None = None
    n_permuted: int = 0
    permuted_skipped: str | None = None
    relation_test: dict[str, Any] | None = None
    transfer: dict[str, Any] | None = None

    def __repr__(self) -> str:
        if self.skipped:
            return f"SwapResult(skipped: {self.skipped})"
        return (
            f"SwapResult(n={self.n}, headline={self.headline!r}, "
            f"conditions={list(self.conditions)}, n_random={self.n_random})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "headline": self.headline,
            "n_random": self.n_random,
            "n_permuted": self.n_permuted,
            "permuted_skipped": self.permuted_skipped,
            "conditions": {k: c.to_dict() for k, c in self.conditions.items()},
            "ceiling": None if self.ceiling is None else self.ceiling.to_dict(),
            "null": self.null,
            "skipped": self.skipped,
            "causal_rank": self.causal_rank,
            "label_test": self.label_test,
            "relation_test": self.relation_test,
            "transfer": self.transfer,
            "answers": self.answers,
            "scored_token": self.scored_token,
        }


@dataclass
class Verdict:
    """One verdict per head, the same in the summary, ``run.json`` and the report.

    ``status``: one of :data:`VERDICTS` — ``reads-feature`` (significant ΔC, its swap beats
    random subspaces and the label-sensitive centroid patch beats permuted labels),
    ``separates-keys-not-feature`` (significant, swap beats random and label-permuted
    subspaces, but the patch is not above permuted labels: no fixed class coordinate),
    ``confounded`` (the swap moves attention, but within the strata of the controls — the
    query–key offset, named rival attributes — the labels are (almost) fixed, so nothing
    beyond the controls can be tested; the sentence names the control and the way out),
    ``no-evidence`` (no subspace above the permutation null, its swap does not beat random or
    falls below the effect floor, or neither label-sensitive comparison passes) or
    ``not-testable`` (a test could not run; the sentence says why). ``sentence``: one line
    a reader can quote. ``evidence``: the numbers it rests on.
    """

    status: str
    sentence: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in VERDICTS:
            raise ValueError(f"verdict status must be one of {VERDICTS}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "sentence": self.sentence, "evidence": self.evidence}


@dataclass
class AttributionResult:
    """Exact split of each held-out prompt's logits over the features' query subspaces.

    ``names``: parts in priority order, then ``"residual"``. ``example_parts [P+1, S]`` and
    ``example_total [S]`` are the first prompt's logits per part; ``example_tokens`` (S).
    """

    names: list[str]
    n: int
    explained_fraction: float
    explained_fraction_centred: float
    random: dict[str, float]
    share: dict[str, float]
    max_abs_error: float
    example_parts: torch.Tensor | None = None
    example_total: torch.Tensor | None = None
    example_tokens: list[str] = field(default_factory=list)
    skipped: str | None = None

    def __repr__(self) -> str:
        if self.skipped:
            return f"AttributionResult(skipped: {self.skipped})"
        return (
            f"AttributionResult(n={self.n}, parts={self.names}, "
            f"explained={self.explained_fraction:.3f}, random={self.random.get('mean', math.nan):.3f})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "n": self.n,
            "explained_fraction": self.explained_fraction,
            "explained_fraction_centred": self.explained_fraction_centred,
            "random": self.random,
            "share": self.share,
            "max_abs_error": self.max_abs_error,
            "example_tokens": self.example_tokens,
            "skipped": self.skipped,
        }


@dataclass
class TokenViewResult:
    """Per-prompt data of the report's token view (a few held-out prompts, bounded).

    ``info`` (JSON): ``condition`` (the headline swap, ``None`` without one), ``cap``,
    ``n_eligible``, ``part_names`` and ``prompts`` (record index, JSONL ``line``, ``tokens``,
    ``query``, ``positives``, ``negatives``, ``orig``/``target``, ``offset``/``length`` into
    the flat tensors). ``tensors``: ``attn_before [T]``, ``attn_after [T]``, ``logit [T]``,
    ``parts [P+1, T]`` over all prompts' keys concatenated (see
    :func:`qkcov.engine.tokenview.collect_token_view`).
    """

    info: dict[str, Any]
    tensors: dict[str, torch.Tensor]


@dataclass
class HeadResult:
    """Everything the pipeline found for one head."""

    layer: int
    head: int
    features: dict[str, FeatureResult]
    projections: dict[str, ProjectionResult]
    swaps: SwapResult
    attribution: AttributionResult
    scan: dict[str, Any] | None = None
    token_view: TokenViewResult | None = None
    # rotary-band profiles and the position control (engine/position.py), or None
    position: dict[str, Any] | None = None
    verdict: Verdict | None = None

    @property
    def name(self) -> str:
        return f"L{self.layer}H{self.head}"

    @property
    def headline(self) -> SubspaceResult:
        """The headline feature's pooled ΔC subspace (at the rank of its significance
        rule); the rank the head is quoted at is :attr:`headline_rank`."""
        return next(iter(self.features.values())).pooled

    @property
    def headline_rank(self) -> Headline:
        """The one rank this head is quoted at, its condition and rule, and the other ranks
        by name (:class:`Headline`)."""
        feature = next(iter(self.features), None)
        pooled = self.headline
        sig = pooled.significance or {}
        c = self.swaps.conditions.get(self.swaps.headline or "")
        return _headline(
            feature,
            None if c is None else c.name,
            None if c is None else c.rank,
            self.swaps.causal_rank,
            pooled.rank,
            pooled.rank_rule,
            sig.get("rank_null") if sig.get("available") else None,
            pooled.rank_energy,
        )

    def __repr__(self) -> str:
        c = self.swaps.conditions.get(self.swaps.headline or "")
        swap = (
            f", swap Δp={c.metrics['delta_p']:.3f}"
            + ("" if not c.random else f" vs random {c.random['delta_p']['mean']:.3f}")
            if c is not None
            else ""
        )
        return (
            f"HeadResult({self.name}, features={list(self.features)}, "
            f"rank={self.headline.rank} ({self.headline.rank_rule}){swap})"
        )

    def _repr_html_(self) -> str:
        rows = [
            [f, g, s.rank, s.rank_energy, s.n_pos, s.n_neg]
            for f, fr in self.features.items()
            for g, s in fr.groups.items()
        ]
        return f"<b>{self.name}</b>" + html_table(
            ["feature", "group", "rank", "rank (energy)", "n_pos", "n_neg"], rows
        )

    def swap_margin(self) -> float:
        """Headline swap Δp minus its random baseline's mean (``-inf`` when skipped)."""
        c = self.swaps.conditions.get(self.swaps.headline or "")
        if c is None or c.random is None:
            return -math.inf
        return c.metrics["delta_p"] - c.random["delta_p"]["mean"]

    def to_dict(self) -> dict[str, Any]:
        c = self.swaps.conditions.get(self.swaps.headline or "")
        ceiling = self.swaps.ceiling
        att = self.attribution
        feature = next(iter(self.features.values()))
        hl = self.headline_rank
        sig = dict(self.headline.significance or {}) or None
        if sig is not None:
            sig["groups_p_value"] = feature.groups_p_value
        return {
            "layer": self.layer,
            "head": self.head,
            "name": self.name,
            # the headline rank and the rule that chose it (the causal rank when the curve
            # ran); the pooled subspace's own rule stays in features[f].groups.pooled
            "rank": hl.rank,
            "rank_rule": hl.rule,
            "headline": hl.to_dict(),
            "significance": sig,
            "swap": None if c is None else {m: c.metrics.get(m) for m in SWAP_METRICS},
            "swap_condition": self.swaps.headline,
            "random": None
            if c is None or c.random is None
            else {m: {"mean": c.random[m]["mean"], "std": c.random[m]["std"]} for m in c.random},
            "ceiling": None
            if ceiling is None
            else {m: ceiling.metrics.get(m) for m in SWAP_METRICS},
            "attribution": att.to_dict(),
            "swaps": self.swaps.to_dict(),
            "features": {k: f.to_dict() for k, f in self.features.items()},
            "projections": {k: p.to_dict() for k, p in self.projections.items()},
            "scan": self.scan,
            "token_view": None if self.token_view is None else self.token_view.info,
            "position": self.position,
            "causal_rank": self.swaps.causal_rank,
            "verdict": None if self.verdict is None else self.verdict.to_dict(),
        }

    def verdict_rank(self) -> int:
        """Position of the verdict's status in :data:`VERDICTS` (best first)."""
        return VERDICTS.index(self.verdict.status) if self.verdict else len(VERDICTS)

    def tensors(self, factor_deltas: bool = True) -> dict[str, torch.Tensor]:
        """The head's tensors under their run.safetensors names; ``factor_deltas=False``
        keeps every ΔC dense (checkpoints: a resumed head must re-save bit-identically, and
        an SVD of factors multiplied back out differs from the original's in the last bits)."""
        out: dict[str, torch.Tensor] = {}
        for fname, feat in self.features.items():
            for g, s in feat.groups.items():
                p = tensor_prefix(self.name, fname, g)
                if factor_deltas:
                    out.update(delta_tensors(p, s.delta))  # dense, or exact low-rank factors
                else:
                    out[p + "delta"] = s.delta.detach().to("cpu", torch.float64).contiguous()
                out.update({p + k: v.double() for k, v in s.subspace.to_tensors().items()})
            if feat.union_key is not None:
                out[tensor_prefix(self.name, fname) + "union_key"] = feat.union_key.double()
                out[tensor_prefix(self.name, fname) + "union_query"] = feat.union_query.double()
        for fname, pr in self.projections.items():
            p = tensor_prefix(self.name, fname) + "proj."
            out[p + "keys"] = pr.keys.float()
            out[p + "queries"] = pr.queries.float()
            out[p + "key_positive"] = pr.key_positive.to(torch.uint8)
        if self.attribution.example_parts is not None:
            out[f"{self.name}.attribution.parts"] = self.attribution.example_parts.double()
            out[f"{self.name}.attribution.total"] = self.attribution.example_total.double()
        for cname, c in self.swaps.conditions.items():
            if c.per_prompt:
                for m, v in c.per_prompt.items():
                    key = f"{self.name}.swap.{safe_component(cname)}.{m}"
                    out[key] = torch.tensor(v, dtype=torch.float64)
        if self.token_view is not None:
            for k, v in self.token_view.tensors.items():
                out[f"{self.name}.token_view.{k}"] = v.float().contiguous()
        return out


_CONDITIONED = (
    "≤x: p at its draw floor 1/(draws+1); control / conditioned on: label-permuted nulls "
    "permute labels only within those strata (mixed: share of keys in strata holding both labels)"
)


@dataclass
class AnalysisResult:
    """The whole run: config, model, records, head scan and one :class:`HeadResult` per head.

    ``summary()`` prints a table; ``save(dir)`` writes ``run.json`` + ``run.safetensors``;
    ``load(dir)`` reads them back; ``report(dir)`` adds figures, the report section and
    ``report.html``.
    """

    config: dict[str, Any]
    model: str
    model_info: dict[str, Any]
    features: list[dict[str, Any]]
    n_records: int
    heads: list[HeadResult]
    scan: list[dict[str, Any]] | None
    timings: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # see pipeline.provenance
    # the frame and the query–key offset diagnostics per feature (engine/position.py)
    position: dict[str, Any] | None = None

    @property
    def best(self) -> HeadResult:
        """The head with the best verdict; among equal verdicts, the one whose headline swap
        beats its random baseline by the widest margin."""
        return min(self.heads, key=lambda h: (h.verdict_rank(), -h.swap_margin()))

    def head(self, name: str) -> HeadResult:
        for h in self.heads:
            if h.name == name:
                return h
        raise ValueError(f"no head {name!r}; have {[h.name for h in self.heads]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_info": self.model_info,
            "n_records": self.n_records,
            "seconds": self.seconds,
            "features": self.features,
            "heads": [h.to_dict() for h in self.heads],
            "best_head": self.best.name if self.heads else None,
            "scored_token": next(
                (h.swaps.scored_token for h in self.heads if h.swaps.scored_token), None
            ),
            "answers": next((h.swaps.answers for h in self.heads if h.swaps.answers), None),
            "scan": self.scan,
            "timings_s": self.timings,
            "config": self.config,
            "notes": self.notes,
            "provenance": self.provenance,
            "position": self.position,
        }

    def ordered_heads(self) -> list[HeadResult]:
        """The heads best first: verdict, then the headline swap's margin over random."""
        return sorted(self.heads, key=lambda h: (h.verdict_rank(), -h.swap_margin()))

    def summary_rows(self, wide: bool = False) -> list[list[str]]:
        """One row per head, best head first (``*`` marks it), under
        :attr:`SUMMARY_COLUMNS` (or :attr:`WIDE_COLUMNS` with ``wide=True``)."""
        rows = []
        best = self.best.name if self.heads else None
        for h in self.ordered_heads():
            d = h.to_dict()
            hl = h.headline_rank
            sig = d["significance"] or {}
            avail = bool(sig.get("available"))
            c = h.swaps.conditions.get(h.swaps.headline or "")
            swap, rnd = d["swap"], d["random"]
            lab = h.swaps.label_test or {}
            lab = lab if lab.get("available") else {}
            prm = (c.permuted or {}).get("delta_p") if c is not None else None
            ev = h.verdict.evidence if h.verdict else {}
            fl = ev.get("p_floors") or {}
            on = ev.get("conditioned_on") or []
            mixed = ev.get("mixed_fraction")
            cond = ("+".join(on) + ("" if mixed is None else f" ({mixed:.2f})")) if on else "–"
            name = h.name + ("*" if h.name == best else "")
            verdict = h.verdict.status if h.verdict else "–"
            dp = "–" if swap is None else _r(swap["delta_p"])
            if not wide:
                # the label-sensitive test the verdict used: the centroid patch, or for a
                # relational feature the cross-record exchange (marked ×)
                if ev.get("kind") == "relation":
                    effect = (
                        "–"
                        if ev.get("relation_effect") is None
                        else _r(ev["relation_effect"]) + "×"
                    )
                    p_lab = format_p(ev.get("p_relation"), fl.get("p_relation"))
                else:
                    effect, p_lab = (
                        _r(lab.get("effect")),
                        format_p(lab.get("p_value"), lab.get("p_floor")),
                    )
                rows.append([
                    name, verdict, str(hl.rank), hl.label, dp,
                    "–" if rnd is None else _r(rnd["delta_p"]["mean"]),
                    "–" if prm is None else _r(prm["mean"]), effect, p_lab, cond,
                ])  # fmt: skip
                continue

            def rank(x: int | None) -> str:
                return "–" if x is None else str(x)

            rows.append(
                [
                    name, verdict, str(hl.rank), hl.rule, hl.label,
                    rank(hl.ranks.get("causal")), rank(hl.ranks.get("null")),
                    rank(hl.ranks.get("energy")),
                    format_p(sig.get("p_value"), fl.get("p_null")) if avail else "–",
                    _r(sig.get("groups_p_value")) if avail else "–",
                    dp,
                    "–" if rnd is None
                    else f"{rnd['delta_p']['mean']:.3f} ± {rnd['delta_p']['std']:.3f}",
                    "–" if c is None else format_p(c.p_value, fl.get("p_vs_random")),
                    "–" if prm is None else f"{prm['mean']:.3f} ± {prm['std']:.3f}",
                    "–" if c is None else format_p(c.p_permuted, fl.get("p_vs_permuted")),
                    _r(lab.get("effect")),
                    format_p(lab.get("p_value"), lab.get("p_floor")),
                    "–" if d["ceiling"] is None else _r(d["ceiling"]["delta_p"]),
                    _r(d["attribution"]["explained_fraction"])
                    if not d["attribution"]["skipped"] else "–",
                    cond,
                ]
            )  # fmt: skip
        return rows

    SUMMARY_COLUMNS = (
        "head", "verdict", "rank", "headline condition", "Δp", "random", "permuted", "label",
        "p label", "control (mixed)",
    )  # fmt: skip
    """The compact table (``qkcov run`` prints it; ``--wide`` prints :attr:`WIDE_COLUMNS`)."""

    WIDE_COLUMNS = (
        "head", "verdict", "rank", "rule", "headline condition", "rank (causal)", "rank (null)",
        "rank (energy)", "p (pooled ΔC)", "p (groups ΔC)", "Δp swap", "Δp random",
        "p vs random", "Δp permuted", "p vs permuted", "label effect", "p (label)",
        "Δp full key", "explained", "conditioned on (mixed)",
    )  # fmt: skip

    def summary_lines(self) -> list[str]:
        """The lines under the table: each head's verdict sentence (``*`` = best head),
        skip reasons, the model's accuracy on the answers and the scored token."""
        lines = []
        best = self.best.name if self.heads else None
        for h in self.heads:
            mark = " (* best head)" if h.name == best else ""
            if h.verdict is not None:
                lines.append(f"{h.verdict.status}{mark}: {h.verdict.sentence}")
            if h.swaps.skipped:
                lines.append(f"{h.name}: swaps skipped — {h.swaps.skipped}")
            if h.swaps.permuted_skipped and not h.swaps.skipped:
                lines.append(f"{h.name}: {h.swaps.permuted_skipped}")
            if h.attribution.skipped:
                lines.append(f"{h.name}: attribution skipped — {h.attribution.skipped}")
        sw = next((h.swaps for h in self.heads if h.swaps.scored_token), None)
        if sw is not None:
            lines.append(f"log-prob shift scores: {sw.scored_token}")
            if sw.answers:
                a = sw.answers
                lines.append(
                    f"model accuracy on the answers ({a['n']} held-out records): top-1 "
                    f"{a['top1']:.3f}, mean rank {a['mean_rank']:.2f}"
                )
        return lines

    def _legend(self, wide: bool) -> list[str]:
        if wide:
            return [
                "rank: the headline rank (rule: how it was chosen; causal = the causal rank "
                "curve); p (pooled ΔC) / p (groups ΔC): the pooled ΔC's / the groups' max-T "
                "permutation p; p vs random / p vs permuted: the swap's Δp vs equal-rank random "
                "/ label-permuted subspaces; p (label): the centroid patch vs permuted labels",
                _CONDITIONED,
            ]
        return [
            "rank: the headline rank (the causal rank when its curve ran); Δp: swap in the "
            "headline condition; random / permuted: mean Δp of equal-rank random / "
            "label-permuted subspaces; label: the label-sensitive test the verdict used — the "
            "centroid patch's effect, p label its p vs permuted labels, or for a relational "
            "feature the cross-record exchange (×) and its sign-flip p; --wide "
            "(summary(wide=True)): every column",
            _CONDITIONED,
        ]

    def to_rows(self) -> list[dict[str, Any]]:
        """The summary as one dict per head in run order (numbers, ``None`` where absent),
        e.g. for ``pandas.DataFrame(result.to_rows())``: the headline rank, its rule and
        condition, the other ranks by name, the swap against both baselines and the
        label-sensitive test."""
        rows = []
        for h in self.heads:
            d = h.to_dict()
            hl = h.headline_rank
            sig = d["significance"] or {}
            avail = bool(sig.get("available"))
            swap, rnd, ceil, att = d["swap"], d["random"], d["ceiling"], d["attribution"]
            c = h.swaps.conditions.get(h.swaps.headline or "")
            prm = (c.permuted or {}).get("delta_p") if c is not None else None
            lab = h.swaps.label_test or {}
            lab = lab if lab.get("available") else {}
            rows.append(
                {
                    "head": h.name,
                    "layer": h.layer,
                    "head_index": h.head,
                    "feature": hl.feature,
                    "verdict": None if h.verdict is None else h.verdict.status,
                    "rank": hl.rank,
                    "rank_rule": hl.rule,
                    "headline_condition": hl.condition,
                    "rank_causal": hl.ranks.get("causal"),
                    "rank_null": hl.ranks.get("null"),
                    "rank_energy": hl.ranks.get("energy"),
                    "p": headline_p(d) if avail else None,
                    "p_pooled": sig.get("p_value") if avail else None,
                    "p_groups": sig.get("groups_p_value") if avail else None,
                    "swap_condition": d["swap_condition"],
                    "delta_p": None if swap is None else swap["delta_p"],
                    "delta_p_random": None if rnd is None else rnd["delta_p"]["mean"],
                    "delta_p_random_std": None if rnd is None else rnd["delta_p"]["std"],
                    "p_vs_random": None if c is None else c.p_value,
                    "delta_p_permuted": None if prm is None else prm["mean"],
                    "delta_p_permuted_std": None if prm is None else prm["std"],
                    "p_vs_permuted": None if c is None else c.p_permuted,
                    "label_effect": lab.get("effect"),
                    "label_effect_ci": lab.get("ci"),
                    "label_permuted": (lab.get("permuted") or {}).get("mean"),
                    "label_permuted_std": (lab.get("permuted") or {}).get("std"),
                    "p_label": lab.get("p_value"),
                    "delta_p_full_key": None if ceil is None else ceil["delta_p"],
                    "explained": None if att["skipped"] else att["explained_fraction"],
                }
            )
        return rows

    def subspace(self, head: str, feature: str | None = None, group: str = POOLED) -> Any:
        """:class:`qkcov.export.Subspace` of ``head`` / ``feature`` (default: the first
        feature) — bases, singular values, ranks, head, frame, model (built by
        ``qkcov.export.subspace_from_result``)."""
        if feature is None:
            feature = self.features[0]["name"] if self.features else "feature"
        return _operation("subspace_from_result")(self, head, feature, group)

    def _repr_html_(self) -> str:
        cols = list(self.WIDE_COLUMNS)
        return f"<b>{self.model}</b>, {self.n_records} records" + html_table(
            cols, self.summary_rows(wide=True)
        )

    def summary(self, wide: bool = False) -> str:
        """A compact table, best head first (head, verdict, headline rank and condition,
        Δp vs random and label-permuted subspaces, the label-sensitive effect), then each
        head's verdict sentence, skip reasons and notes. ``wide=True``: every column (the
        other ranks by name, p-values named for what they test, ceiling, explained
        fraction)."""
        cols = list(self.WIDE_COLUMNS if wide else self.SUMMARY_COLUMNS)
        rows = [cols, *self.summary_rows(wide)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += [w for text in self._legend(wide) for w in textwrap.wrap(text, 120)]
        for text in [*self.summary_lines(), *self.notes]:  # at the table's 120 characters
            lines += textwrap.wrap(text, 120, subsequent_indent="  ", break_on_hyphens=False)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"AnalysisResult(model={self.model!r}, heads={[h.name for h in self.heads]})"

    def write_artifacts(self, folder: str | Path) -> Path:
        """``run.json`` + ``run.safetensors`` into ``folder`` (no manifest; see :meth:`save`)."""
        from .artifacts import save_tensors, write_json

        out = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        for h in self.heads:
            tensors.update(h.tensors())
        save_tensors(out / RUN_TENSORS, tensors, {"heads": [h.name for h in self.heads]})
        write_json(out / RUN_JSON, self.to_dict(), compact=True)
        return out

    def save(
        self, out_dir: str | Path, *, section: dict[str, Any] | None = None, force: bool = False
    ) -> Path:
        """Write the complete run folder: artifacts, figures, ``section.json``,
        ``report.html`` and a manifest, replacing ``out_dir`` as a whole (never a mix of
        two runs; an existing folder only when empty or a complete qkcov run, else
        ``force=True`` writes inside it, keeping its other files). ``section`` overrides the
        report section's key/title/text (written by ``qkcov.report.save.save_run``)."""
        return _operation("save_run")(self, out_dir, section=section, force=force)

    @classmethod
    def load(cls, out_dir: str | Path) -> AnalysisResult:
        """Read a saved run back into typed results (tensors included); the folder's
        manifest is checked first, so a partial or mixed folder is refused."""

        from safetensors.torch import load as load_safetensors

        from .artifacts import artifact_errors, parse_json, read_run_files

        out = Path(out_dir)
        if not (out / RUN_JSON).is_file():
            raise FileNotFoundError(f"{out}: no {RUN_JSON} (not a qkcov run folder)")
        raw = read_run_files(out, [RUN_JSON, RUN_TENSORS])  # both from one run, verified
        # a tampered file (bad tensors, missing keys, wrong types): one line naming the run
        with artifact_errors(out, "run folder (run.json + run.safetensors)"):
            data = parse_json(raw[RUN_JSON], out / RUN_JSON, expect=dict)
            tensors = load_safetensors(raw[RUN_TENSORS])
            heads = [_head_from_dict(h, tensors) for h in data["heads"]]
            result = cls._from_saved(data, heads)
            result.check_ranges(str(out / RUN_JSON))
        return result

    @classmethod
    def _from_saved(cls, data: dict[str, Any], heads: list[HeadResult]) -> AnalysisResult:
        return cls(
            config=data["config"],
            model=data["model"],
            model_info=data["model_info"],
            features=data["features"],
            n_records=data["n_records"],
            heads=heads,
            scan=data.get("scan"),
            timings=data.get("timings_s", {}),
            seconds=data["seconds"],
            notes=data.get("notes", []),
            provenance=data.get("provenance") or {},
            position=data.get("position"),
        )

    def check_ranges(self, where: str = "run") -> None:
        """``ValueError`` (one line naming ``where``, the head and the field) unless every
        saved subspace's ranks are integers in ``[0, D]`` and its ΔC is finite (a tampered
        ``run.json`` would otherwise slice ``[:, :-3]`` or feed NaN to an SVD)."""
        import torch

        mi = self.model_info if isinstance(self.model_info, dict) else {}
        for h in self.heads:
            for field_name, bound in (("layer", mi.get("n_layers")), ("head", mi.get("n_heads"))):
                v = getattr(h, field_name)
                top = bound if isinstance(bound, int) and not isinstance(bound, bool) else None
                if (
                    isinstance(v, bool)
                    or not isinstance(v, int)
                    or v < 0
                    or (top is not None and v >= top)
                ):
                    span = f"[0, {top - 1}]" if top is not None else ">= 0"
                    raise ValueError(
                        f"{where}: heads[{h.name}].{field_name}: expected an integer {span}, got {v!r}"
                    )
            for fname, fr in h.features.items():
                for g, s in fr.groups.items():
                    d = int(s.delta.shape[1]) if s.delta.ndim == 2 else 0
                    for field_name in ("rank", "rank_energy"):
                        v = getattr(s, field_name)
                        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= d:
                            raise ValueError(
                                f"{where}: heads[{h.name}].features[{fname}].groups[{g}]."
                                f"{field_name}: expected an integer in [0, {d}], got {v!r}"
                            )
                    if not bool(torch.isfinite(s.delta).all()):
                        raise ValueError(
                            f"{where}: {h.name} {fname}/{g}: ΔC holds NaN or infinite values"
                        )

    def report(self, out_dir: str | Path) -> Path:
        """Save the run to ``out_dir`` (see :meth:`save`) and return its ``report.html``."""
        return self.save(out_dir) / "report.html"


def _head_from_dict(d: dict[str, Any], t: dict[str, torch.Tensor]) -> HeadResult:
    name = d["name"]
    features: dict[str, FeatureResult] = {}
    for fname, fd in d["features"].items():
        groups = {}
        for g, sd in fd["groups"].items():
            p = tensor_prefix(name, fname, g)
            sub = FeatureSubspace(
                rank=sd["rank"],
                singular_values=t[p + "singular_values"],
                query_basis=t[p + "query_basis"],
                key_basis=t[p + "key_basis"],
                energy_curve=t[p + "energy_curve"],
                energy=float("nan"),
            )
            groups[g] = SubspaceResult(
                fname, g, sd["rank"], sd["rank_energy"], sd["rank_rule"], sub,
                read_delta(t, p), sd["n_pos"], sd["n_neg"], sd.get("significance"),
            )  # fmt: skip
        features[fname] = FeatureResult(
            fname,
            groups,
            t.get(tensor_prefix(name, fname) + "union_key"),
            t.get(tensor_prefix(name, fname) + "union_query"),
            fd.get("principal_angles", []),
            fd.get("groups_p_value"),
        )
    projections = {}
    for fname, pd in d["projections"].items():
        p = tensor_prefix(name, fname) + "proj."
        projections[fname] = ProjectionResult(
            fname, t[p + "keys"], t[p + "queries"], t[p + "key_positive"].bool(),
            pd["key_labels"], pd["query_labels"], pd.get("accuracy"),
            pd.get("key_names", []), pd.get("query_names", []), pd.get("key_groups", []),
        )  # fmt: skip
    sw = d["swaps"]

    def cond(cname: str, cd: dict[str, Any] | None) -> SwapCondition | None:
        if cd is None:
            return None
        prefix = f"{name}.swap.{safe_component(cname)}."
        per = {k[len(prefix) :]: v.tolist() for k, v in t.items() if k.startswith(prefix)}
        skip = ("rank", "random", "ci", "p_value", "permuted", "p_permuted", "p_floor",
                "p_permuted_floor")  # fmt: skip
        metrics = {k: v for k, v in cd.items() if k not in skip}
        return SwapCondition(
            cname,
            cd["rank"],
            metrics,
            cd.get("random"),
            per or None,
            cd.get("ci"),
            cd.get("p_value"),
            cd.get("permuted"),
            cd.get("p_permuted"),
        )

    swaps = SwapResult(
        sw["n"],
        sw["headline"],
        {k: cond(k, v) for k, v in sw["conditions"].items()},
        cond("ceiling", sw["ceiling"]),
        sw["null"],
        sw["n_random"],
        sw.get("skipped"),
        sw.get("causal_rank"),
        sw.get("label_test"),
        sw.get("answers"),
        sw.get("scored_token"),
        sw.get("n_permuted", 0),
        sw.get("permuted_skipped"),
        sw.get("relation_test"),
        sw.get("transfer"),
    )
    ad = d["attribution"]
    attribution = AttributionResult(
        ad["names"], ad["n"], ad["explained_fraction"], ad["explained_fraction_centred"],
        ad["random"], ad["share"], ad["max_abs_error"], t.get(f"{name}.attribution.parts"),
        t.get(f"{name}.attribution.total"), ad.get("example_tokens", []), ad.get("skipped"),
    )  # fmt: skip
    v = d.get("verdict")
    tv = d.get("token_view")
    prefix = f"{name}.token_view."
    token_view = (
        None
        if tv is None
        else TokenViewResult(
            tv, {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}
        )
    )
    return HeadResult(
        d["layer"], d["head"], features, projections, swaps, attribution, d.get("scan"),
        token_view=token_view, position=d.get("position"),
        verdict=None if v is None else Verdict(v["status"], v["sentence"], v.get("evidence") or {}),
    )  # fmt: skip
