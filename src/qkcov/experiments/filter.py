"""Categorical semantic features ("filter heads"): METHOD §4, paper Figs. 6–7.

Pipeline (:func:`run_filter`):

1. build seeded filter records (build / held-out, disjoint prompts) and check that every
   vocabulary word tokenises with the model's tokenizer;
2. head scan over every layer and head in one pass per batch (:func:`attention_rows` on the
   build records) → ranked table (:func:`scan_heads`), re-sorted by ``cfg.scan_key``;
3. pick heads (``"auto"`` = top-K of the scan, or an explicit list);
4. per head, ΔC per asked category (positives = items of the asked category, negatives = the
   other items, keys averaged per side within a record) and pooled over categories
   (:func:`run_contrast` on build records); ranks at ``energy``; union of the per-category
   key subspaces; principal angles between categories;
5. Fig. 6: queries/keys of held-out prompts (:func:`collect_qk`) projected on the top-3
   directions of the **category subspace** (union of the per-category key/query subspaces,
   ordered by energy: left singular vectors of ``[V_c S_c]`` stacked over categories, so
   each category contributes its directions weighted by its contrast strength). The pooled
   ΔC's top-3 is reported too (``cluster_acc.pooled_top3``): pooling sums the categories'
   contrasts and lets the strongest ones dominate. Number: nearest-centroid category
   accuracy of held-out keys in that 3-D projection, centroids fit on build keys, against
   random 3-D subspaces (mean over ``n_random`` draws) and the keys' own top-3 principal
   components (fit on the build keys);
6. Fig. 7: in-forward key swaps on held-out prompts (:func:`run_swaps`): orig = the
   most-attended positive item, target = a random negative item; conditions: the category
   subspace (union of the per-category key subspaces), the pooled key subspace, random
   orthonormal subspaces of equal rank (``n_random`` draws each) and the full-key ceiling.

Artifacts: ``filter.json``, ``filter.safetensors``, figures drawn from those two files only
(:mod:`qkcov.report.figures.filter`), and ``section.json`` for ``qkcov report``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import save_tensors, write_json
from ..config import ConfigMixin, check_positive_int, check_range
from ..core.projection import nearest_centroid_accuracy, pca_basis, project
from ..core.subspace import principal_angles, random_orthonormal, union_basis
from ..engine.contrast import (
    POOLED,
    HeadVectors,
    ResolvedRecord,
    collect_qk,
    resolve_records,
    run_contrast,
)
from ..engine.scan import attention_rows, check_heads_spec, scan_heads, scan_matrix, select_heads
from ..engine.swaps import metric_summary, random_summary, run_swaps, swap_pairs
from ..models.heads import format_head, parse_heads
from ..models.loading import DEFAULT_MODEL, model_info
from ..tasks.filter import FilterTaskConfig, build_filter_records, check_words_tokenize
from ..tasks.records import ContrastRecord

__all__ = [
    "FilterConfig",
    "SCAN_KEYS",
    "run_filter",
    "run_filter_demo",
    "check_task_words",
    "key_categories",
    "cluster_accuracy",
    "summarize",
    "records_for",
]

SCAN_KEYS = ("diff", "ratio", "top_match", "mean_pos")
CATEGORY = "category"  # swap condition: union of per-category key subspaces
PROJ_DIMS = 3
Head = tuple[int, int]


@dataclass
class FilterConfig(ConfigMixin):
    """Settings of the filter-head experiment.

    Args:
        model: preset name, local path or ``.gguf`` file (see :func:`load_model`).
        heads: ``"auto"`` (top ``n_heads`` of the scan), ``"auto:K"`` or ``"L20H26,L16H19"``.
        n_heads: heads studied with ``heads="auto"``.
        scan_key: scan column heads are ranked by (``diff`` = mean attention on asked-
            category items minus other items; ``ratio``; ``top_match`` = how often the
            most-attended item is of the asked category; ``mean_pos``).
        n_build: records for ΔC. n_heldout: held-out records (projections, swaps).
        n_scan: build records used for the head scan (``0`` = all build records).
        n_swap: held-out records used for the in-forward swaps (``0`` = all held-out).
        n_centroid: build records whose keys fit the nearest-centroid classifier (0 = all).
        categories, n_categories_per_prompt, items_per_category, template, answer_prefix:
            task options (:class:`FilterTaskConfig`); ``categories=None`` = whole vocabulary.
        chat: format prompts with the tokenizer's chat template.
        energy: cumulative singular-value energy fixing each rank.
        n_random: random equal-rank subspaces per swap condition and random 3-D bases for
            the clustering baseline (at least 10).
        batch_size, seed: batching and the seed of records, pairs and random bases.
        swap_subspace: the headline swap condition reported as ``swap``/``random``:
            ``"pooled"`` = key subspace of the pooled ΔC (asked-category items vs the rest,
            over all categories: the predicate-match feature the head reads) or ``"union"``
            = the per-category key subspaces stacked (one direction or more per category).
            Both are always run and stored (``swap_pooled``, ``swap_union``).
    """

    model: str = DEFAULT_MODEL
    heads: str = "auto"
    n_heads: int = 1
    scan_key: str = "diff"
    n_build: int = 300
    n_heldout: int = 200
    n_scan: int = 0
    n_swap: int = 64
    n_centroid: int = 96
    categories: tuple[str, ...] | None = None
    n_categories_per_prompt: int = 3
    items_per_category: int = 2
    template: str = "all"
    answer_prefix: str = "Answer:"
    chat: bool = False
    energy: float = 0.99
    n_random: int = 10
    batch_size: int = 16
    seed: int = 0
    n_boot: int = 200
    swap_subspace: str = "pooled"

    def __post_init__(self) -> None:
        if self.swap_subspace not in ("pooled", "union"):
            raise ValueError(
                f"swap_subspace must be 'pooled' or 'union', got {self.swap_subspace!r}"
            )
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        check_heads_spec(self.heads)
        check_positive_int("n_heads", self.n_heads, 1)
        if self.scan_key not in SCAN_KEYS:
            raise ValueError(f"scan_key must be one of {list(SCAN_KEYS)}, got {self.scan_key!r}")
        check_positive_int("n_scan", self.n_scan, 0)
        check_positive_int("n_swap", self.n_swap, 0)
        check_positive_int("n_centroid", self.n_centroid, 0)
        check_positive_int("n_random", self.n_random, 10)
        check_positive_int("batch_size", self.batch_size, 1)
        check_positive_int("n_boot", self.n_boot, 10)
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)):
            raise ValueError(f"energy must be a number in (0, 1], got {self.energy!r}")
        check_range("energy", float(self.energy), 0.0, 1.0, low_open=True)
        if self.categories is not None and not isinstance(self.categories, str):
            self.categories = tuple(self.categories)
        task = self.task_config()  # validates categories, sizes, template
        if task.n_heldout < 1:
            raise ValueError(
                "n_heldout must be at least the number of categories (projections and swaps use held-out prompts)"
            )

    def task_config(self) -> FilterTaskConfig:
        """The task options as a :class:`FilterTaskConfig` (validated there)."""
        return FilterTaskConfig(
            categories=self.categories,
            n_categories_per_prompt=self.n_categories_per_prompt,
            items_per_category=self.items_per_category,
            template=self.template,
            chat=self.chat,
            answer_prefix=self.answer_prefix,
            seed=self.seed,
            n_build=self.n_build,
            n_heldout=self.n_heldout,
        )


# --------------------------------------------------------------------------- helpers
def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[filter] {msg}", flush=True)


def _load(name: str) -> tuple[torch.nn.Module, Any]:
    from ..models.loading import load_model

    lm = load_model(name)
    return lm.model, lm.tokenizer


def check_task_words(tokenizer: Any, task: FilterTaskConfig) -> dict[str, int]:
    """Every word of the task's categories tokenises to at least one token (else ``ValueError``)."""
    words = [w for c in task.resolved_categories() for w in c.words]
    return check_words_tokenize(tokenizer, words)


def key_categories(resolved: Sequence[ResolvedRecord]) -> list[str]:
    """Category of every key site, in :func:`collect_qk` key order (from ``meta["items"]``).

    Records without item metadata fall back to ``"positive"``/``"negative"``.
    """
    out: list[str] = []
    for r in resolved:
        items = {it["word"]: it["category"] for it in r.record.meta.get("items", [])}
        for k in r.keys:
            out.append(items.get(k.label, "positive" if k.positive else "negative"))
    return out


def cluster_accuracy(
    train_x: torch.Tensor,
    train_y: Sequence[str],
    test_x: torch.Tensor,
    test_y: Sequence[str],
    basis: torch.Tensor,
) -> float:
    """Nearest-centroid accuracy of ``test_x [m, D]`` projected on ``basis [D, k]``."""
    return nearest_centroid_accuracy(
        project(train_x, basis), list(train_y), project(test_x, basis), list(test_y)
    )


def _subset(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` (all when ``k == 0`` or ``k >= n``), seeded, sorted."""
    if k == 0 or k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _balanced_subset(resolved: Sequence[ResolvedRecord], k: int) -> list[int]:
    """First records in order, ``k`` in all (records are already category-balanced cycles)."""
    return list(range(len(resolved))) if k == 0 or k >= len(resolved) else list(range(k))


def _degrees(rad: torch.Tensor) -> list[float]:
    return [float(math.degrees(float(a))) for a in rad]


def _head_analysis(
    contrast: Any,
    head: Head,
    energy: float,
    groups: Sequence[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Ranks, union, principal angles of one head → (json part, tensors, bases)."""
    name = format_head(*head)
    subs = contrast.subspaces(head, energy)
    cats = [g for g in groups if g in subs]
    union_k = union_basis([subs[g].key_basis for g in cats]) if cats else subs[POOLED].key_basis
    union_q = union_basis([subs[g].query_basis for g in cats]) if cats else subs[POOLED].query_basis
    tensors: dict[str, torch.Tensor] = {}
    for g, s in subs.items():
        tensors[f"{name}.delta.{g}"] = contrast.delta(head, g).float()
        for k, v in s.to_tensors(f"{name}.{g}.").items():
            tensors[k] = v.float()
    tensors[f"{name}.union.key_basis"] = union_k.float()
    tensors[f"{name}.union.query_basis"] = union_q.float()
    # principal angles between the per-category key subspaces (degrees)
    G = len(cats)
    smallest = torch.full((G, G), float("nan"))
    pairs = []
    for i in range(G):
        smallest[i, i] = 0.0
        for j in range(i + 1, G):
            ang = _degrees(principal_angles(subs[cats[i]].key_basis, subs[cats[j]].key_basis))
            smallest[i, j] = smallest[j, i] = ang[0] if ang else float("nan")
            pairs.append({"a": cats[i], "b": cats[j], "degrees": ang})
    tensors[f"{name}.principal_angles_min"] = smallest
    off = [p["degrees"][0] for p in pairs if p["degrees"]]
    info = {
        "layer": head[0],
        "head": head[1],
        "name": name,
        "rank": {
            **{g: subs[g].rank for g in cats},
            POOLED: subs[POOLED].rank,
            "union": int(union_k.shape[1]),
        },
        "rank_query_union": int(union_q.shape[1]),
        "singular_values": {g: subs[g].singular_values[:10].tolist() for g in subs},
        "counts": {g: list(contrast.accumulators[head].counts(g)) for g in cats},
        "principal_angles": {
            "categories": cats,
            "min_degrees": smallest.tolist(),
            "mean_min_degrees": float(sum(off) / len(off)) if off else None,
            "pairs": pairs,
        },
    }
    bases = {
        "union_key": union_k,
        "union_key_ordered": _ordered_union([subs[g] for g in cats], "key") if cats else union_k,
        "union_query_ordered": (
            _ordered_union([subs[g] for g in cats], "query") if cats else union_q
        ),
        "pooled_key": subs[POOLED].key_basis,
        "pooled_query": subs[POOLED].query_basis,
    }
    return info, tensors, bases


def _ordered_union(subs: Sequence[Any], side: str) -> torch.Tensor:
    """Union of per-category bases ordered by energy: left singular vectors of
    ``[V_1 S_1, V_2 S_2, ...]`` (each category's directions weighted by its singular values),
    ``[D, r]``. Its first columns are the dominant directions of the category subspace."""
    cols = [getattr(s, f"{side}_basis") * s.singular_values[: s.rank] for s in subs]
    u, sv, _ = torch.linalg.svd(torch.cat(cols, 1).double(), full_matrices=False)
    return u[:, sv > 1e-10 * max(float(sv[0]), 1e-300)]


def _top_directions(basis: torch.Tensor, D: int, seed: int) -> torch.Tensor:
    """First ``PROJ_DIMS`` columns of ``basis``, padded with random orthogonal directions."""
    b = basis[:, :PROJ_DIMS].double()
    if b.shape[1] < PROJ_DIMS:  # rank < 3: complete with random directions orthogonal to it
        extra = random_orthonormal(D, PROJ_DIMS, seed=seed)
        extra = extra - b @ (b.T @ extra)
        b = union_basis([b, extra])[:, :PROJ_DIMS]
    return b


def _projection(
    vec_build: HeadVectors,
    vec_held: HeadVectors,
    cat_build: list[str],
    cat_held: list[str],
    held_groups: list[str],
    bases: Mapping[str, torch.Tensor],
    n_random: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    D = vec_held.keys.shape[1]
    kb = _top_directions(bases["union_key_ordered"], D, seed)  # [D, 3]
    qb = _top_directions(bases["union_query_ordered"], D, seed + 1)
    acc_sub = cluster_accuracy(vec_build.keys, cat_build, vec_held.keys, cat_held, kb)
    pk = _top_directions(bases["pooled_key"], D, seed)
    acc_pooled = cluster_accuracy(vec_build.keys, cat_build, vec_held.keys, cat_held, pk)
    rand = [
        cluster_accuracy(
            vec_build.keys,
            cat_build,
            vec_held.keys,
            cat_held,
            random_orthonormal(D, PROJ_DIMS, seed=seed * 7919 + 101 + d),
        )
        for d in range(n_random)
    ]
    pb = pca_basis(vec_build.keys, PROJ_DIMS)
    acc_pca = cluster_accuracy(vec_build.keys, cat_build, vec_held.keys, cat_held, pb)
    union = bases["union_key"]
    acc_union = cluster_accuracy(vec_build.keys, cat_build, vec_held.keys, cat_held, union)
    rt = torch.tensor(rand, dtype=torch.float64)
    info = {
        "subspace": acc_sub,
        "random": float(rt.mean()),
        "random_std": float(rt.std(unbiased=True)),
        "pca": acc_pca,
        "pooled_top3": acc_pooled,
        "union_full": acc_union,
        "union_rank": int(union.shape[1]),
        "chance": 1.0 / max(len(set(cat_held)), 1),
        "n_test_keys": len(cat_held),
        "n_train_keys": len(cat_build),
    }
    tensors = {
        "proj.keys": project(vec_held.keys, kb).float(),
        "proj.key_positive": vec_held.key_positive.to(torch.uint8),
        "proj.queries": project(vec_held.q, qb).float(),
        "proj.key_basis": kb.float(),
        "proj.query_basis": qb.float(),
    }
    labels = {"key_category": cat_held, "query_category": held_groups}
    return {**info, "_labels": labels}, tensors


def _write_section(out: Path, result: Mapping[str, Any], figures: list, interactive: list) -> None:
    from ..report import write_section

    best = next((h for h in result["heads"] if h["name"] == result["best_head"]), None)
    rows = []
    for h in result["heads"]:
        rows.append(
            [
                h["name"],
                h["rank"][POOLED],
                h["rank"]["union"],
                round(h["swap_pooled"]["delta_p"], 3),
                f"{h['random_pooled']['delta_p']['mean']:.3f} ± {h['random_pooled']['delta_p']['std']:.3f}",
                round(h["swap_union"]["delta_p"], 3),
                f"{h['random_union']['delta_p']['mean']:.3f} ± {h['random_union']['delta_p']['std']:.3f}",
                round(h["ceiling"]["delta_p"], 3),
                round(h["swap"]["flip_items"], 3),
                round(h["cluster_acc"]["subspace"], 3),
                round(h["cluster_acc"]["random"], 3),
                round(h["cluster_acc"]["pca"], 3),
            ]
        )
    scan_rows = [
        [r["name"], round(r["diff"], 4), [round(x, 4) for x in r["diff_ci"]], round(r["ratio"], 2),
         round(r["top_match"], 3)]
        for r in result["scan"][:10]
    ]  # fmt: skip
    summary: dict[str, Any] = {"model": result["model"]["name"], "best head": result["best_head"]}
    if best is not None:
        summary.update(
            {
                f"swap Δp ({best['swap_subspace']} subspace)": round(best["swap"]["delta_p"], 3),
                "swap Δp (random, mean)": round(best["random"]["delta_p"]["mean"], 3),
                "swap Δp (full key)": round(best["ceiling"]["delta_p"], 3),
                "3-D cluster accuracy (subspace / random / PCA)": (
                    f"{best['cluster_acc']['subspace']:.2f} / {best['cluster_acc']['random']:.2f}"
                    f" / {best['cluster_acc']['pca']:.2f}"
                ),
            }
        )
    cfg = result["config"]
    text = [
        "Prompts list items from several categories and ask for the items of one category "
        f"(template {cfg['template']!r}, {cfg['n_categories_per_prompt']} categories × "
        f"{cfg['items_per_category']} items per prompt). Query = last prompt token; keys = "
        "last token of each item; positives = items of the asked category.",
        "The head scan ranks every head by how much more its last-token attention goes to "
        f"asked-category items than to others (sorted by {cfg['scan_key']!r}); the studied "
        "heads get one ΔC per category and a pooled ΔC from the build prompts.",
        "Fig. 6 projects held-out keys/queries on the top-3 energy-ordered directions of the "
        "category subspace (union of the per-category subspaces); "
        "cluster accuracy is nearest-centroid (centroids from build keys) in those 3 "
        "dimensions, against random 3-D subspaces and the keys' own top-3 principal components.",
        "Fig. 7 swaps the most-attended asked-category item's key with a random other item's "
        "key inside the category subspace (union of per-category key subspaces) in the "
        "forward pass; Δp is the mean change of a_target / (a_orig + a_target). Random "
        "subspaces of equal rank are the baseline, the full-key swap the ceiling.",
    ]
    write_section(
        out,
        key="filter",
        title="Filter heads: categorical semantic features (Figs. 6–7)",
        order=20,
        summary=summary,
        text=text,
        tables=[
            {
                "caption": "Studied heads",
                "columns": [
                    "head",
                    "rank pooled",
                    "rank union",
                    "Δp pooled",
                    "Δp random (pooled rank)",
                    "Δp union",
                    "Δp random (union rank)",
                    "Δp ceiling",
                    "flip items",
                    "acc subspace",
                    "acc random",
                    "acc PCA",
                ],
                "rows": rows,
            },  # fmt: skip
            {
                "caption": "Head scan (top 10)",
                "columns": ["head", "diff", "95% CI", "ratio", "top match"],
                "rows": scan_rows,
            },
        ],
        figures=figures,
        interactive=interactive,
    )


# --------------------------------------------------------------------------- main entry
def run_filter(
    cfg: FilterConfig,
    out_dir: str | Path,
    *,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the filter-head experiment and write its artifacts to ``out_dir``.

    Args:
        loaded: ``(model, tokenizer)`` to use instead of loading ``cfg.model``.

    Returns the content of ``filter.json`` (see the module docstring).
    """
    if not isinstance(cfg, FilterConfig):
        raise ValueError(f"cfg must be a FilterConfig, got {type(cfg).__name__}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def tick(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    task = cfg.task_config()
    build_recs, held_recs = build_filter_records(task)
    _log(progress, f"{len(build_recs)} build / {len(held_recs)} held-out prompts")
    t = time.perf_counter()
    model, tokenizer = loaded if loaded is not None else _load(cfg.model)
    info = model_info(model)
    t = tick("load", t)
    check_task_words(tokenizer, task)
    if not cfg.heads.strip().lower().startswith("auto"):
        parse_heads(cfg.heads, info.n_layers, info.n_heads)  # range check before any compute
    build = resolve_records(tokenizer, build_recs, chat=cfg.chat)
    held = resolve_records(tokenizer, held_recs, chat=cfg.chat)
    swap_idx = _subset(len(held), cfg.n_swap, cfg.seed + 1)
    swap_recs = [held[i] for i in swap_idx]

    # --- head scan: every layer and head, one pass (build prompts + the swap subset)
    _log(progress, f"head scan over {info.n_layers} layers x {info.n_heads} heads")
    scan_recs = [build[i] for i in _balanced_subset(build, cfg.n_scan)]
    rows = attention_rows(
        model, tokenizer, [*scan_recs, *swap_recs], batch_size=cfg.batch_size, progress=progress
    )
    scan = scan_heads(rows[: len(scan_recs)], scan_recs, n_boot=cfg.n_boot, seed=cfg.seed)
    scan.sort(key=lambda r: r[cfg.scan_key], reverse=True)
    for rank, r in enumerate(scan):
        r["rank"] = rank
    heads = select_heads(cfg.heads, scan, info.n_layers, info.n_heads, k=cfg.n_heads)
    _log(progress, f"studied heads: {', '.join(format_head(*h) for h in heads)}")
    t = tick("scan", t)

    # --- ΔC per category + pooled on build prompts
    contrast = run_contrast(
        model, tokenizer, build, heads, batch_size=cfg.batch_size, progress=progress
    )
    t = tick("contrast", t)

    # --- q/k for projections: held-out (all) + build subset for centroids
    cent_idx = _balanced_subset(build, cfg.n_centroid)
    cent_recs = [build[i] for i in cent_idx]
    vecs = collect_qk(
        model, tokenizer, [*cent_recs, *held], heads, batch_size=cfg.batch_size, progress=progress
    )
    n_cent_keys = sum(len(r.keys) for r in cent_recs)
    cat_build = key_categories(cent_recs)
    cat_held = key_categories(held)
    held_groups = [r.record.group or "" for r in held]
    t = tick("collect", t)

    tensors: dict[str, torch.Tensor] = {}
    for key in ("diff", "ratio", "top_match", "mean_pos", "mean_neg"):
        tensors[f"scan.{key}"] = scan_matrix(scan, key)
    head_infos: list[dict[str, Any]] = []
    proj_labels: dict[str, Any] = {}
    for hi, head in enumerate(heads):
        name = format_head(*head)
        hinfo, htensors, bases = _head_analysis(contrast, head, cfg.energy, contrast.groups)
        tensors.update(htensors)
        v = vecs[head]
        n_cent = len(cent_recs)
        vb = HeadVectors(
            v.q[:n_cent], v.keys[:n_cent_keys], v.key_record[:n_cent_keys],
            v.key_positive[:n_cent_keys], v.key_labels[:n_cent_keys], v.record_groups[:n_cent],
        )  # fmt: skip
        vh = HeadVectors(
            v.q[n_cent:], v.keys[n_cent_keys:], v.key_record[n_cent_keys:],
            v.key_positive[n_cent_keys:], v.key_labels[n_cent_keys:], v.record_groups[n_cent:],
        )  # fmt: skip
        pinfo, ptensors = _projection(
            vb, vh, cat_build, cat_held, held_groups, bases, cfg.n_random, cfg.seed + hi
        )
        proj_labels = pinfo.pop("_labels")
        tensors.update({f"{name}.{k}": x for k, x in ptensors.items()})
        hinfo["cluster_acc"] = pinfo

        # --- causal swaps (held-out subset)
        head_rows = rows[len(scan_recs) :, head[0], head[1]]
        pairs = swap_pairs(swap_recs, head_rows, seed=cfg.seed)
        sw = run_swaps(
            model,
            tokenizer,
            swap_recs,
            head[0],
            head[1],
            pairs,
            {CATEGORY: bases["union_key"].float(), POOLED: bases["pooled_key"].float()},
            n_random=cfg.n_random,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        hinfo["swap_union"] = metric_summary(sw["conditions"][CATEGORY])
        hinfo["random_union"] = random_summary(sw["random"][CATEGORY])
        hinfo["swap_pooled"] = metric_summary(sw["conditions"][POOLED])
        hinfo["random_pooled"] = random_summary(sw["random"][POOLED])
        # the headline condition (cfg.swap_subspace); both stay in the artifact
        hinfo["swap_subspace"] = cfg.swap_subspace
        hinfo["swap"] = hinfo[f"swap_{cfg.swap_subspace}"]
        hinfo["random"] = hinfo[f"random_{cfg.swap_subspace}"]
        hinfo["ceiling"] = metric_summary(sw["ceiling"])
        hinfo["swap_detail"] = {
            "n": sw["n"],
            "ranks": sw["ranks"],
            "null": sw["null"],
            CATEGORY: sw["conditions"][CATEGORY],
            POOLED: sw["conditions"][POOLED],
            "ceiling_full": sw["ceiling"],
            "random_delta_p_draws": sw["random"][CATEGORY]["delta_p"]["draws"],
            "random_pooled_delta_p_draws": sw["random"][POOLED]["delta_p"]["draws"],
        }
        head_infos.append(hinfo)
        t = tick(f"swaps_{name}", t)

    # best head: largest margin of the headline swap over its equal-rank random baseline
    best = max(head_infos, key=lambda h: h["swap"]["delta_p"] - h["random"]["delta_p"]["mean"])
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "model": {
            "name": cfg.model if loaded is None else type(model).__name__,
            "architecture": info.architecture,
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            "n_kv_heads": info.n_kv_heads,
            "head_dim": info.head_dim,
        },
        "n_records": {
            "build": len(build),
            "heldout": len(held),
            "scan": len(scan_recs),
            "swap": len(swap_recs),
            "centroid": len(cent_recs),
        },
        "categories": list(contrast.groups),
        "scan": scan,
        "heads": head_infos,
        "best_head": best["name"],
        "projection": {
            "basis": "top-3 energy-ordered directions of the union of per-category key "
            "(query) subspaces",
            "labels": proj_labels,
        },
        "split_disjoint": not ({r.prompt for r in build_recs} & {r.prompt for r in held_recs}),
    }
    timings["total_before_figures"] = round(time.perf_counter() - t0, 2)
    result["timings_s"] = timings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "filter.safetensors", tensors, {"heads": [h["name"] for h in head_infos]})
    write_json(out / "filter.json", result)

    from ..report.figures.filter import plot_all

    figures, interactive = plot_all(out)
    _write_section(out, result, figures, interactive)
    result["timings_s"]["total"] = round(time.perf_counter() - t0, 2)
    write_json(out / "filter.json", result)
    _log(progress, f"done in {result['timings_s']['total']:.1f}s; artifacts in {out}")
    return result


def summarize(result: Mapping[str, Any]) -> dict[str, Any]:
    """Short summary of a :func:`run_filter` result (best head, Δp vs random, cluster acc)."""
    best = next(h for h in result["heads"] if h["name"] == result["best_head"])
    return {
        "best_head": best["name"],
        "delta_p": round(best["swap"]["delta_p"], 4),
        "delta_p_random": round(best["random"]["delta_p"]["mean"], 4),
        "delta_p_ceiling": round(best["ceiling"]["delta_p"], 4),
        "flip_items": round(best["swap"]["flip_items"], 4),
        "cluster_acc": {k: round(best["cluster_acc"][k], 4) for k in ("subspace", "random", "pca")},
        "rank": best["rank"],
        "seconds": result["timings_s"].get("total"),
    }


def run_filter_demo(
    out_dir: str | Path, model: str = DEFAULT_MODEL, *, progress: bool = True
) -> dict[str, Any]:
    """The filter experiment with default settings on ``model``; returns :func:`summarize`."""
    return summarize(run_filter(FilterConfig(model=model), out_dir, progress=progress))


def records_for(cfg: FilterConfig) -> tuple[list[ContrastRecord], list[ContrastRecord]]:
    """The ``(build, held-out)`` records ``cfg`` produces (for inspection)."""
    return build_filter_records(cfg.task_config())
