"""The one orchestrator: contrast records → the whole method, for any contrast.

:func:`analyze` (notebook) and :func:`run` (``qkcov run`` and the built-in tasks) go through
the same steps:

1. **plan** (no model): group records by ``feature`` (one ΔC family each, e.g. order-ID and
   lexical), split them into build / held-out records (``meta["split"]`` when every record
   pins it, else a seeded ``holdout`` fraction per feature) and check that ΔC is computable;
2. **scan** every head on build records that hold both a positive and a negative key and pick
   heads (``auto``, ``auto:K`` or ``L20H26,...``);
3. **ΔC** per feature, group and pooled on build records; subspaces by the rank rule; unions
   of group subspaces and their principal angles;
4. **projections** of held-out keys/queries on each feature's top-3 directions and
   nearest-centroid group accuracy against random 3-D subspaces and PCA;
5. **swaps** of held-out records' most-attended positive key with a negative key inside each
   feature's key subspace, in the forward pass, against equal-rank random subspaces and the
   full-key ceiling;
6. **attribution** of held-out logits over the features' query subspaces (exact);
   beside them, **position** (:mod:`qkcov.engine.position`): query–key offsets of the build
   keys (a note names a confounded feature), rotary-band profiles of every subspace and the
   position-only control; ``frame="query"`` runs steps 3–6 in each query's rotary frame;
7. typed results (:mod:`qkcov.results`), artifacts, figures and a report section.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigMixin, check_positive_int, check_range
from .core.attribution import explain_logits
from .core.projection import nearest_centroid_accuracy, pca_basis, project
from .core.subspace import (
    energy_ordered_union,
    feature_subspace,
    principal_angles,
    random_orthonormal,
    top_directions,
)
from .results import (
    POOLED,
    AnalysisResult,
    AttributionResult,
    FeatureResult,
    HeadResult,
    ProjectionResult,
    SubspaceResult,
    SwapCondition,
    SwapResult,
    TokenViewResult,
    Verdict,
    headline_p,
)
from .runtime import Timer, sub_seed
from .tasks.records import ContrastRecord

__all__ = ["RunConfig", "Plan", "plan_records", "analyze", "run", "DEFAULT_FEATURE", "DTYPES"]

DEFAULT_FEATURE = "feature"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
RANK_RULES = ("null", "energy")
STEPS = ("projections", "swaps", "attribution")
FRAMES = ("post", "query")
ATTRIBUTION_RANDOM = 20  # random subspace pairs for the explained-fraction baseline
PROJ_DIMS = 3
CAUSAL_MAX = 32  # largest rank of the causal rank curve
CAUSAL_FRACTION = 0.9  # causal rank: smallest r reaching this fraction of the curve's best
CURVE_RANDOM = 20  # random draws per rank of the causal rank curve
Head = tuple[int, int]


def _help(text: str, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help (flags are derived from the fields)."""
    return field(metadata={"help": text}, **kw)


@dataclass
class RunConfig(ConfigMixin):
    """Settings of one pipeline run; every ``qkcov run`` flag is one of these fields."""

    model: str = _help("preset, Hugging Face id, local path or .gguf", default="smollm2-135m")
    device: str = _help(
        "torch device of the forward pass (auto = cuda when available, else cpu; cpu, cuda:1)",
        default="auto",
    )
    dtype: str = _help(
        f"forward dtype, one of {', '.join(DTYPES)}; ΔC accumulates in float64", default="auto"
    )
    device_map: str | None = _help(
        "accelerate device map (e.g. auto) for models bigger than one device", default=None
    )
    heads: str = _help(
        "'auto' (top --n-heads of the head scan), 'auto:K' or L20H26,L16H19", default="auto"
    )
    n_heads: int = _help("heads kept by 'auto'", default=3)
    batch_size: int = _help("prompts per forward pass", default=8)
    seed: int = _help("seed of the split, swap targets, random subspaces and resampling", default=0)
    holdout: float = _help(
        "fraction of records held out for projections, swaps and attribution", default=0.3
    )
    chat: bool = _help("format prompts with the tokenizer's chat template", default=False)
    energy: float = _help("cumulative singular-value energy of the energy rank rule", default=0.99)
    rank_rule: str = _help(
        "rank in force: 'null' (above the permutation null) or 'energy'", default="null"
    )
    alpha: float = _help("significance level of the null rank and p-values", default=0.05)
    n_permutations: int = _help("permutations of the ΔC null (0 = off)", default=200)
    n_bootstrap: int = _help("bootstrap resamples of records (0 = off)", default=200)
    n_random: int = _help(
        "random equal-rank subspaces per swap condition (attention metrics, computed offline)",
        default=100,
    )
    n_random_downstream: int = _help(
        "random draws per condition that also get a downstream (log-prob) pass", default=3
    )
    n_swap: int = _help("held-out records used for swaps (0 = all)", default=64)
    n_permuted: int = _help(
        "label-permuted subspaces per swap condition and label-permuted centroids of the "
        "label-sensitive centroid patch (the permutation null's relabelling; 0 = off)",
        default=20,
    )
    causal_max_rank: int = _help(
        "largest rank R of the causal rank curve Δp(1..R) (raised to the null rank, at most "
        f"{CAUSAL_MAX}, clamped to the head dimension; 0 = no curve)",
        default=16,
    )
    n_scan: int = _help(
        "build records used for the head scan (0 = all; the scan reports bootstrap CIs)",
        default=128,
    )
    n_attribution: int = _help("held-out records used for attribution (0 = all)", default=64)
    n_centroid: int = _help(
        "build records whose keys fit the group centroids (0 = all)", default=96
    )
    steps: str = _help(
        "steps after ΔC, comma-separated subset of projections,swaps,attribution ('' = ΔC only)",
        default="projections,swaps,attribution",
    )
    checkpoint_every: int = _help(
        "save long phases every N batches to a checkpoint beside --out (0 = off; see --resume)",
        default=0,
    )
    max_tokens: int | None = _help(
        "longest prompt allowed (default: the model's positions)", default=None
    )
    trust_remote_code: bool = _help(
        "allow model code from the checkpoint (off by default)", default=False
    )
    frame: str = _help(
        "q/k frame of ΔC, swaps and attribution: 'post' (post-RoPE) or 'query' (each key in "
        "its query's rotary frame; logits unchanged)",
        default="post",
    )

    def __post_init__(self) -> None:
        from .engine.scan import check_heads_spec

        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"--model must be a non-empty name or path, got {self.model!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(
                f"--device must be a torch device such as cpu or cuda, got {self.device!r}"
            )
        try:
            torch.device(auto_device(self.device))
        except (RuntimeError, ValueError):
            raise ValueError(
                f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1)"
            ) from None
        check_heads_spec(self.heads)
        for name in ("n_heads", "batch_size"):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        for name in (
            "n_permutations",
            "n_bootstrap",
            "n_swap",
            "n_scan",
            "n_attribution",
            "n_centroid",
            "checkpoint_every",
            "n_permuted",
        ):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name), 0)
        check_positive_int("--causal-max-rank", self.causal_max_rank, 0)
        if self.causal_max_rank > CAUSAL_MAX:
            raise ValueError(
                f"--causal-max-rank must be at most {CAUSAL_MAX}, got {self.causal_max_rank}"
            )
        check_positive_int("--n-random", self.n_random, 10)
        check_positive_int("--n-random-downstream", self.n_random_downstream, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"--seed must be an integer, got {self.seed!r}")
        for name, lo, hi, lo_open in (
            ("holdout", 0.0, 1.0, True),
            ("energy", 0.0, 1.0, True),
            ("alpha", 0.0, 1.0, True),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise ValueError(f"--{name} must be a number, got {v!r}")
            check_range(f"--{name}", float(v), lo, hi, low_open=lo_open)
        if self.holdout >= 1.0:
            raise ValueError(f"--holdout must be in (0, 1), got {self.holdout!r}")
        if self.rank_rule not in RANK_RULES:
            raise ValueError(
                f"--rank-rule must be one of {', '.join(RANK_RULES)}, got {self.rank_rule!r}"
            )
        if self.max_tokens is not None:
            check_positive_int("--max-tokens", self.max_tokens, 1)
        if self.frame not in FRAMES:
            raise ValueError(f"--frame must be one of {', '.join(FRAMES)}, got {self.frame!r}")
        unknown = set(self.step_list()) - set(STEPS)
        if not isinstance(self.steps, str) or unknown:
            raise ValueError(f"--steps must name some of {','.join(STEPS)}, got {self.steps!r}")

    def step_list(self) -> list[str]:
        return [s.strip() for s in str(self.steps).split(",") if s.strip()]


def auto_device(device: str) -> str:
    """``--device auto`` → ``cuda`` when CUDA is available, else ``cpu``; others unchanged."""
    if isinstance(device, str) and device.strip().lower() == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def provenance(
    model: Any, plan: Plan | None, records_path: str | Path | None, command_line: str | None
) -> dict[str, Any]:
    """What reproduces a run: dtype and device actually used, the records file (path,
    sha256, the JSONL line of every build / held-out record), versions, the command line."""
    import hashlib
    import platform
    import sys

    import transformers

    from . import __version__

    param = next(iter(model.parameters()), None)
    out: dict[str, Any] = {
        "dtype": None if param is None else str(param.dtype).removeprefix("torch."),
        "device": None if param is None else str(param.device),
        "device_map": getattr(model, "hf_device_map", None),
        "versions": {"qkcov": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "command_line": command_line if command_line is not None else " ".join(sys.argv),
        "revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "records": None,
    }  # fmt: skip
    if records_path is not None and plan is not None:
        path = Path(records_path)
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
        # the records are the non-blank lines in order (tasks.records.parse_records)
        lines = [n for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if len(lines) == len(plan.records):
            split = {
                k: [lines[i] for i in range(len(lines)) if plan.split[i] == k]
                for k in ("build", "heldout")
            }
        else:
            split = {"build": None, "heldout": None}
        out["records"] = {
            "path": str(path.expanduser().absolute()),
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_lines": len(lines),
            "build_lines": split["build"],
            "heldout_lines": split["heldout"],
        }
    elif plan is not None:
        out["records"] = {
            "path": None,
            "build_index": [i for i, s in enumerate(plan.split) if s == "build"],
            "heldout_index": [i for i, s in enumerate(plan.split) if s == "heldout"],
        }
    return out


# --------------------------------------------------------------------------- plan
@dataclass
class Plan:
    """Records grouped by feature and split, checked before any model is loaded.

    ``features``: feature names in first-seen order (the first is the headline feature and
    has attribution priority). ``split[i]`` is ``"build"`` or ``"heldout"`` for record i.
    """

    records: list[ContrastRecord]
    features: list[str]
    split: list[str]
    notes: list[str] = field(default_factory=list)
    kinds: dict[str, str | None] = field(default_factory=dict)  # feature -> declared kind

    def feature_of(self, i: int) -> str:
        return self.records[i].feature or DEFAULT_FEATURE

    def indices(
        self, split: str | None = None, feature: str | None = None, two_sided: bool | None = None
    ) -> list[int]:
        out = []
        for i, r in enumerate(self.records):
            if split is not None and self.split[i] != split:
                continue
            if feature is not None and self.feature_of(i) != feature:
                continue
            if two_sided is not None and (bool(r.positives) and bool(r.negatives)) != two_sided:
                continue
            out.append(i)
        return out


def _as_records(records: Sequence[ContrastRecord | Mapping[str, Any]]) -> list[ContrastRecord]:
    out = []
    for i, r in enumerate(records):
        if isinstance(r, ContrastRecord):
            out.append(r)
        elif isinstance(r, Mapping):
            try:
                out.append(ContrastRecord.from_dict(dict(r)))
            except ValueError as err:
                raise ValueError(f"records[{i}]: {err}") from None
        else:
            raise ValueError(
                f"records[{i}] must be a ContrastRecord or a dict, got {type(r).__name__}"
            )
    if not out:
        raise ValueError("no records given")
    return out


def plan_records(records: Sequence[ContrastRecord | Mapping[str, Any]], cfg: RunConfig) -> Plan:
    """Group, split and check records (``ValueError`` naming the problem; no model needed)."""
    recs = _as_records(records)
    from .checks import check_pins
    from .naming import check_record_names

    check_record_names(recs, DEFAULT_FEATURE)
    check_pins(recs)
    features: list[str] = []
    for r in recs:
        f = r.feature or DEFAULT_FEATURE
        if f not in features:
            features.append(f)
    pinned = [r.meta.get("split") for r in recs]
    if not cfg.step_list():  # ΔC only: every record builds it
        split = ["build"] * len(recs)
    elif all(s in ("build", "heldout") for s in pinned):
        split = [str(s) for s in pinned]
    else:
        split = ["build"] * len(recs)
        gen = torch.Generator().manual_seed(sub_seed(cfg.seed, "split"))
        for f in features:
            idx = [i for i, r in enumerate(recs) if (r.feature or DEFAULT_FEATURE) == f]
            n_held = min(len(idx) - 1, max(1, round(cfg.holdout * len(idx)))) if len(idx) > 1 else 0
            for j in torch.randperm(len(idx), generator=gen)[:n_held].tolist():
                split[idx[j]] = "heldout"
    from .tasks.records import feature_kinds

    kinds = {k or DEFAULT_FEATURE: v for k, v in feature_kinds(recs).items()}
    plan = Plan(recs, features, split, kinds=kinds)
    for f in features:
        build = plan.indices("build", f)
        n_pos = sum(1 for i in build if recs[i].positives)
        n_neg = sum(1 for i in build if recs[i].negatives)
        if not build or not n_pos or not n_neg:
            where = "" if f == DEFAULT_FEATURE else f" of feature {f!r}"
            side = "positive" if not n_pos else "negative"
            raise ValueError(
                f"the build records{where} have no {side} key: ΔC = E[q k+ᵀ] − E[q k−ᵀ] needs "
                f"both sides ({len(build)} build records, {n_pos} with positives, {n_neg} with negatives)"
            )
    if cfg.heads.strip().lower().startswith("auto") and not plan.indices("build", two_sided=True):
        raise ValueError(
            "--heads auto scans heads on records holding both a positive and a negative key, "
            "and no build record does; name the heads instead (e.g. --heads L3H1,L5H0)"
        )
    if "swaps" in cfg.step_list() and not plan.indices("heldout", two_sided=True):
        plan.notes.append(
            "swaps skipped: no held-out record holds both a positive and a negative key, so no "
            "swap pair exists"
        )
    return plan


# --------------------------------------------------------------------------- steps
def _subspace_results(
    contrast: Any, head: Head, feature: str, cfg: RunConfig, stats: Any = None
) -> FeatureResult:
    acc = contrast.accumulators[head]
    groups: dict[str, SubspaceResult] = {}
    names = [g for g in contrast.groups if all(acc.counts(g))] + [POOLED]
    for g in names:
        key = None if g == POOLED else g
        delta = acc.delta(key)
        sub = feature_subspace(delta, cfg.energy)
        n_pos, n_neg = acc.counts(key)
        sig = _significance(stats, key, delta, cfg) if stats is not None else None
        rank, rule = sub.rank, "energy"  # the energy rule stands in when the null is unavailable
        if cfg.rank_rule == "null" and sig is not None and sig["available"]:
            rank, rule = (int(sig["rank_null"]) if sig["significant"] else 0), "null"
        # the bases hold the rank in force; rank_energy is kept beside it
        in_force = sub if rank == sub.rank else feature_subspace(delta, cfg.energy, rank=rank)
        groups[g] = SubspaceResult(
            feature, g, rank, sub.rank, rule, in_force, delta, int(n_pos), int(n_neg), sig
        )
    per_group = [s for g, s in groups.items() if g != POOLED and s.rank > 0]
    union_k = union_q = None
    angles: list[dict[str, Any]] = []
    if len(per_group) > 1:
        trimmed = [
            dataclasses.replace(
                s.subspace, rank=s.rank, key_basis=s.key_basis, query_basis=s.query_basis
            )
            for s in per_group
        ]
        union_k = energy_ordered_union(trimmed, "key")
        union_q = energy_ordered_union(trimmed, "query")
        for i, a in enumerate(per_group):
            for b in per_group[i + 1 :]:
                ang = principal_angles(a.key_basis, b.key_basis)
                angles.append(
                    {"a": a.group, "b": b.group, "min_degrees": math.degrees(float(ang.min()))}
                )
    combined = _groups_max_t(groups)
    for sr in groups.values():
        if sr.significance:
            sr.significance.pop(NULL_TOP, None)
            sr.significance.pop(OBS_TOP, None)
    return FeatureResult(feature, groups, union_k, union_q, angles, combined)


NULL_TOP = "_null_top"
OBS_TOP = "_obs_top"  # the observed statistic matching NULL_TOP (raw top when absent)


def _groups_max_t(groups: Mapping[str, SubspaceResult]) -> float | None:
    """p of "some group's ΔC is above its null": a max-T permutation test over the groups.

    Groups hold disjoint records, so the j-th draws of the per-group nulls together are one
    permutation of the whole design; each group's top singular value is standardised by its
    null median, and the observed maximum is compared with the permuted maxima (exact at the
    permutations' resolution, unlike a Bonferroni bound, whose floor G/(P+1) can exceed α)."""
    obs, draws = [], []
    for g, sr in groups.items():
        sig = sr.significance or {}
        if g == POOLED or not sig.get("available") or NULL_TOP not in sig:
            continue
        null = sig[NULL_TOP].double()
        scale = float(null.median()) or 1.0
        obs.append(float(sig.get(OBS_TOP, sr.subspace.singular_values[0])) / scale)
        draws.append(null / scale)
    if not obs or len({d.numel() for d in draws}) != 1:
        return None
    t_null = torch.stack(draws).max(0).values
    return float((1 + (t_null >= max(obs)).sum()) / (1 + t_null.numel()))


def _significance(
    stats: Any, group: str | None, delta: torch.Tensor, cfg: RunConfig
) -> dict[str, Any]:
    """Permutation null (p-value, null rank, 5–95 % band) and record bootstrap (rank CI,
    stability) of one ΔC, from the kept per-record statistics (no recapture)."""
    import warnings

    from .core import statistics as st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.StatisticsWarning)
        null = st.permutation_null(
            stats, cfg.n_permutations, seed=sub_seed(cfg.seed, f"null:{group}"), group=group
        )
        sig = st.significance(delta, null, alpha=cfg.alpha, energy=cfg.energy)
        null_top = null.singular_values[:, 0].clone() if null.available else None
        if sig.step_null is not None and len(sig.step_null):  # the rank test's first step
            null_top = sig.step_null[0].clone()
        rule = cfg.rank_rule if sig.available else "energy"
        boot = (
            st.bootstrap(stats, cfg.n_bootstrap, seed=sub_seed(cfg.seed, f"boot:{group}"), group=group,
                         rank_rule=rule, null=null if null.available else None, alpha=cfg.alpha, energy=cfg.energy,
                         sig=sig if null.available else None)
            if cfg.n_bootstrap
            else None
        )  # fmt: skip
    out = {
        "available": sig.available,
        "significant": sig.significant,
        "reason": sig.reason,
        "p_value": sig.p_value,
        "p_value_frobenius": sig.p_value_frobenius,
        "rank_null": sig.rank_null,
        "rank_energy": sig.rank_energy,
        "test": sig.test,
        "p_value_raw_top": sig.p_value_raw_top,
        "rank_parallel": sig.rank_parallel,
        "step_p_values": sig.step_p_values,
        "n_records": null.n_records,
        "n_distinct": null.n_distinct,
        "duplicates": None
        if null.n_distinct is None or null.n_distinct >= null.n_records
        else st.duplicates_note(null.n_records, null.n_distinct),
        "alpha": cfg.alpha,
        "n_permutations": cfg.n_permutations,
        # the band reaches well beyond the ranks, so the scree shows where the rank ends
        "null_band": None
        if sig.null_band is None
        else sig.null_band[
            :, : max(16, max(sig.rank_null or 0, sig.rank_energy or 0) + 16)
        ].tolist(),
        "rank_ci": None,
        "stability_deg": None,
        "singular_value_ci": None,
        "bootstrap": None
        if boot is None
        else {"available": boot.available, "reason": boot.reason, "n_boot": boot.n_boot},
    }
    if boot is not None and boot.available:
        out["rank_ci"] = list(boot.rank_ci) if boot.rank_ci is not None else None
        out["rank_ci_percentile"] = boot.rank_ci_percentile and list(boot.rank_ci_percentile)
        out["stability_deg"] = boot.stability_deg
        out["singular_value_ci"] = boot.singular_value_ci[:, :16].tolist()
    if null_top is not None:
        out[NULL_TOP] = null_top  # for the max-T test over groups; dropped before saving
        if sig.whitened_singular_values is not None and len(sig.step_null):
            out[OBS_TOP] = float(sig.whitened_singular_values[0])
    return out


def _duplicate_notes(heads: Sequence[HeadResult]) -> list[str]:
    """One run note per feature and group whose build records hold exact duplicates."""
    notes: dict[str, None] = {}
    for h in heads:
        for f, feat in h.features.items():
            for g, sr in feat.groups.items():
                if sr.significance and sr.significance.get("duplicates"):
                    where = f"feature {f!r}, " if len(heads[0].features) > 1 else ""
                    notes[f"statistics: {where}{g}: {sr.significance['duplicates']}"] = None
    return list(notes)


def _projection(
    feature: FeatureResult,
    train: Any,
    test: Any,
    train_groups: list[str],
    test_groups: list[str],
    cfg: RunConfig,
    seed: int,
) -> ProjectionResult:
    """Held-out vectors on the feature's top-3 directions (+ group accuracy with ≥ 2 groups)."""
    pooled = feature.pooled
    D = test.keys.shape[1]
    kdir = feature.union_key if feature.union_key is not None else pooled.key_basis
    qdir = feature.union_query if feature.union_query is not None else pooled.query_basis
    kb = top_directions(kdir, PROJ_DIMS, seed)
    qb = top_directions(qdir, PROJ_DIMS, seed + 1)
    key_labels = [
        test_groups[int(r)] if p else ""
        for r, p in zip(test.key_record, test.key_positive, strict=True)
    ]
    query_labels = list(test_groups)
    accuracy = None
    groups = sorted({g for g in test_groups if g})
    if len(groups) > 1 and train is not None:
        tr = [i for i, p in enumerate(train.key_positive.tolist()) if p]
        te = [i for i, p in enumerate(test.key_positive.tolist()) if p]
        ytr = [train_groups[int(train.key_record[i])] for i in tr]
        yte = [key_labels[i] for i in te]
        xtr, xte = train.keys[tr].double(), test.keys[te].double()

        def acc(basis: torch.Tensor) -> float:
            return nearest_centroid_accuracy(project(xtr, basis), ytr, project(xte, basis), yte)

        rand = torch.tensor(
            [
                acc(random_orthonormal(D, PROJ_DIMS, seed=sub_seed(cfg.seed, "proj-random", d)))
                for d in range(cfg.n_random)
            ],
            dtype=torch.float64,
        )
        accuracy = {
            "subspace": acc(kb),
            "random": float(rand.mean()),
            "random_std": float(rand.std()),
            "pca": acc(pca_basis(xtr, PROJ_DIMS)),
            "chance": 1.0 / len(groups),
            "n_test": len(te),
        }
    return ProjectionResult(
        feature.name, project(test.keys.double(), kb).float(), project(test.q.double(), qb).float(),
        test.key_positive.clone(), key_labels, query_labels, accuracy,
    )  # fmt: skip


def _name_points(proj: ProjectionResult, tokenizer: Any, resolved: Sequence[Any]) -> None:
    """Hover names of the projected points: token and JSONL line (or record index), in the
    order :func:`qkcov.engine.contrast.collect_qk` stacks them (record order, key order)."""

    def where(r: Any) -> str:
        return f"line {r.record.line}" if r.record.line is not None else f"record {r.index}"

    keys = [
        f"{tokenizer.decode([r.input_ids[p]])!r} · {where(r)}"
        for r in resolved
        for p in r.key_positions
    ]
    queries = [f"{tokenizer.decode([r.input_ids[r.query]])!r} · {where(r)}" for r in resolved]
    if len(keys) == len(proj.key_labels) and len(queries) == len(proj.query_labels):
        proj.key_names, proj.query_names = keys, queries


def _swap_conditions(
    features: Mapping[str, FeatureResult], energy: float
) -> dict[str, torch.Tensor]:
    """Key bases to swap in: each feature's pooled subspace (and, when the rank in force
    differs, its energy-rank subspace ``<feature>@energy``), its group union, all features."""
    bases: dict[str, torch.Tensor] = {}
    for name, f in features.items():
        if f.pooled.rank > 0:
            bases[name] = f.pooled.key_basis
            r_e = f.pooled.rank_energy
            if 0 < r_e != f.pooled.rank:
                bases[f"{name}@energy"] = feature_subspace(
                    f.pooled.delta, energy, rank=r_e
                ).key_basis
        if f.union_key is not None and f.union_key.shape[1] > 0:
            bases[f"{name}:groups"] = f.union_key
    if len(features) > 1:
        from .core.subspace import union_basis

        parts = [f.pooled.key_basis for f in features.values() if f.pooled.rank > 0]
        if len(parts) > 1:
            bases["all"] = union_basis(parts)
    return bases


def _swaps(
    model: Any,
    tokenizer: Any,
    resolved: Sequence[Any],
    swap_base: Callable[[], Any],
    head: Head,
    features: Mapping[str, FeatureResult],
    cfg: RunConfig,
    progress: bool,
    skip_reason: str | None,
    stats: Mapping[str, Any] | None = None,
    kind: str | None = None,
    build_patterns: Sequence[str | None] | None = None,
) -> SwapResult:
    """Swaps of every condition against random and label-permuted subspaces, the causal rank
    curve (its causal-rank subspace becomes the headline) and the label-sensitive centroid
    patch on the headline, all from the unedited forward every head shares (``swap_base()``,
    :func:`qkcov.engine.swaps.capture_swap_base`; see :func:`_causal_plan`), then the relational
    test and the transfer across position patterns from the same forward (``kind``: the
    feature's declared kind; ``build_patterns``: each build record's position pattern in the
    record statistics' order, see :mod:`qkcov.core.transfer`)."""
    from .engine.swaps import run_swaps

    headline_feature = next(iter(features))
    if skip_reason is None and not resolved:
        skip_reason = (
            "no held-out record holds both a positive and a negative key, so no swap pair exists"
        )
    bases = _swap_conditions(features, cfg.energy)
    # headline: the first feature's pooled subspace, or the union of its significant group
    # subspaces when the pooled contrast is not significant (a categorical feature can live
    # in per-value directions that pooling averages away)
    headline = next(
        (c for c in (headline_feature, f"{headline_feature}:groups") if c in bases), None
    )
    if skip_reason is None and headline is None:
        sig = features[headline_feature].pooled.significance or {}
        skip_reason = sig.get("reason") or f"feature {headline_feature!r} has rank 0"
    if skip_reason is not None:
        return SwapResult(0, None, {}, None, None, cfg.n_random, skipped=skip_reason)
    base = swap_base()
    pairs = base.pairs[head]
    D = next(iter(bases.values())).shape[0]
    causal = _causal_plan(
        features, bases, headline, stats or {}, cfg, D, f"L{head[0]}H{head[1]}",
        [r.record.group for r in resolved], build_patterns,
    )  # fmt: skip
    sw = run_swaps(
        model, tokenizer, resolved, head[0], head[1], pairs, {k: v.float() for k, v in bases.items()},
        n_random=cfg.n_random, n_random_downstream=min(cfg.n_random_downstream, cfg.n_random),
        seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
        offline=causal.offline, late=causal.late, base=base,
    )  # fmt: skip
    per = sw.get("per_prompt", {})
    conditions = {
        name: SwapCondition(
            name,
            int(sw["ranks"][name]),
            dict(sw["conditions"][name]),
            sw["random"][name],
            per.get(name),
        )
        for name in sw["conditions"]
    }
    _swap_statistics(conditions, cfg)
    _permuted_baselines(conditions, sw["offline"], causal)
    ceiling = SwapCondition(
        "ceiling", int(model_head_dim(model)), dict(sw["ceiling"]), None, per.get("ceiling")
    )
    relation, transfer = _relation_and_transfer(
        base, head, resolved, sw, causal, (stats or {}).get(headline_feature), kind, cfg
    )
    return SwapResult(
        int(sw["n"]), causal.headline or headline, conditions, ceiling, dict(sw["null"]),
        cfg.n_random, causal_rank=causal.curve_result(sw["offline"], cfg),
        label_test=causal.label_result(sw["patches"], cfg), answers=sw.get("answers"),
        scored_token=_scored_token(resolved), n_permuted=causal.n_permuted,
        permuted_skipped=causal.skipped, relation_test=relation, transfer=transfer,
    )  # fmt: skip


def _relation_and_transfer(
    base: Any, head: Head, resolved: Sequence[Any], sw: Mapping[str, Any], causal: _Causal,
    st: Any, kind: str | None, cfg: RunConfig,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The relational test on the headline subspace (label-permuted subspaces as its reported
    baseline) and the transfer rows (:mod:`qkcov.engine.relational`)."""
    from .engine.relational import (
        relation_inputs,
        relational_result,
        swap_patterns,
        transfer_result,
    )

    name = f"L{head[0]}H{head[1]}"
    if causal.label_stack is None:
        relation: dict[str, Any] = {"available": False, "reason": "no headline subspace"}
    else:
        relation = relational_result(
            relation_inputs(base.views[head], resolved), causal.label_stack, st,
            seed=sub_seed(cfg.seed, f"relation:{name}"), n_boot=max(cfg.n_bootstrap, 200),
        )  # fmt: skip
    relation["declared_kind"] = kind
    if causal.transfer_skipped:
        return relation, {"available": False, "reason": causal.transfer_skipped}
    pats = swap_patterns(base.pairs[head])
    held = [pats[i] for i in base.keep]
    fam = sw["offline"]
    per = {
        p[len("transfer:") :]: v["delta_p"][0] for p, v in fam.items() if p.startswith("transfer:")
    }
    head_dp = torch.tensor(sw["per_prompt"][causal.headline]["delta_p"], dtype=torch.float64)
    transfer = transfer_result(
        per, held, head_dp, fam["transfer-random"]["delta_p"], causal.transfer_rank
    )
    return relation, transfer


def _scored_token(resolved: Sequence[Any]) -> str:
    """Which token the swaps' log-prob shift scores (said in run.json and the report)."""
    n = sum(r.answer_id is not None for r in resolved)
    if n == len(resolved):
        return "answer: each record's answer token (shift = −Δ log p(answer))"
    first = "first token of each key span (shift = Δ[log p(target's) − log p(orig's)])"
    return first if n == 0 else f"answer where given ({n} of {len(resolved)} records), else {first}"


@dataclass
class _Causal:
    """What :func:`_causal_plan` asks the swap engine for, and how to read it back."""

    headline_feature: str
    headline: str | None = None  # set by the late step: the causal-rank condition
    offline: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    families: dict[str, str] = field(default_factory=dict)  # condition -> permuted family
    n_permuted: int = 0
    skipped: str | None = None
    R: int = 0
    note: str = ""
    curve_source: torch.Tensor | None = None  # [D, R] ordered real basis of the curve
    perm_source: list[torch.Tensor] = field(default_factory=list)  # [D, >=R] per permutation
    means: tuple[torch.Tensor, torch.Tensor] | None = None  # [1+P, D] real + permuted centroids
    label_condition: str | None = None
    rank: int = 0
    late: Any = None
    guard: dict[str, Any] | None = None  # the guarded causal rank (core.transfer)
    label_stack: torch.Tensor | None = None  # [1+P, D, r] headline + label-permuted bases
    transfer_skipped: str | None = "no position patterns"
    transfer_rank: int = 0

    def curve_result(self, offline: Mapping[str, Any], cfg: RunConfig) -> dict[str, Any] | None:
        if not self.R:
            return None

        curve = []
        for r in range(1, self.R + 1):
            dp = offline[f"curve:{r}"]["delta_p"][0]
            rnd = offline[f"curve-random:{r}"]["delta_p"].mean(1)
            prm = offline.get(f"curve-permuted:{r}", {}).get("delta_p")
            ci = _quiet_ci(dp, cfg, f"curve-ci:{r}")
            curve.append({
                "r": r, "delta_p": float(dp.mean()), "ci": _finite(ci),
                "random_mean": float(rnd.mean()), "random_std": float(rnd.std()),
                "permuted_mean": None if prm is None else float(prm.mean(1).mean()),
                "permuted_std": None if prm is None else float(prm.mean(1).std()),
            })  # fmt: skip
        return {
            "feature": self.headline_feature, "rank": self.rank, "R": self.R,
            "fraction": CAUSAL_FRACTION, "condition": self.headline, "note": self.note,
            "guard": self.guard, "curve": curve,
        }  # fmt: skip

    def label_result(self, patches: Mapping[str, Any], cfg: RunConfig) -> dict[str, Any] | None:
        if "label" not in patches:
            return {"available": False, "reason": self.skipped or "label-sensitive test off"}
        from .core import statistics as st

        eff = patches["label"]["effect"]  # [1+P, n]
        dp = patches["label"]["delta_p"]
        real, perm = eff[0], eff[1:].mean(1)
        ci = _quiet_ci(real, cfg, "label-ci")
        return {
            "available": True, "reason": "", "condition": self.label_condition,
            "effect": float(real.mean()), "ci": _finite(ci), "delta_p": float(dp[0].mean()),
            "permuted": {"mean": float(perm.mean()), "std": float(perm.std()), "draws": perm.tolist()},
            "p_value": st.random_p_value(float(real.mean()), perm), "n_permuted": int(perm.numel()),
        }  # fmt: skip


def _finite(values: Sequence[float]) -> list[float | None]:
    """NaN (too few prompts for a CI) as None, as ``run.json`` stores it."""
    return [None if math.isnan(float(x)) else float(x) for x in values]


def _quiet_ci(values: torch.Tensor, cfg: RunConfig, purpose: str) -> tuple[float, float]:
    """Paired-bootstrap CI over prompts ((nan, nan) with fewer than 10, without a warning)."""
    import warnings

    from .core import statistics as st

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", st.StatisticsWarning)
        return st.paired_bootstrap_ci(
            values, n_boot=max(cfg.n_bootstrap, 200), seed=sub_seed(cfg.seed, purpose)
        )


def _causal_plan(
    features: Mapping[str, FeatureResult],
    bases: Mapping[str, torch.Tensor],
    headline: str,
    stats: Mapping[str, Any],
    cfg: RunConfig,
    D: int,
    head_name: str,
    record_groups: Sequence[str | None] = (),
    build_patterns: Sequence[str | None] | None = None,
) -> _Causal:
    """Offline families for the swap engine: label-permuted subspaces of every condition
    (``permuted:<condition>``, the null's relabellings of the build records, from the kept
    record statistics), the causal rank curve (``curve:<r>``, ``curve-random:<r>``,
    ``curve-permuted:<r>``, r = 1..R) and, once the curve is known (``late``), the
    causal-rank condition and the centroid patch on the headline subspace."""
    from .core.causal import causal_rank, class_key_means, relabel_signs, relabelled_deltas
    from .core.subspace import union_basis
    from .core.transfer import guarded_causal_rank, pattern_bases

    f0 = next(iter(features))
    plan = _Causal(f0, headline)
    P = cfg.n_permuted
    perm_key: dict[str, list[torch.Tensor]] = {}  # feature -> full key bases per permutation
    perm_groups: dict[str, list[torch.Tensor]] = {}  # feature -> energy-ordered group unions
    signs0 = None
    if P and all(stats.get(f) is not None for f in features):
        for f, feat in features.items():
            st_f = stats[f]
            signs = relabel_signs(st_f, P, seed=sub_seed(cfg.seed, f"permuted:{head_name}:{f}"))
            if f == f0:
                signs0 = signs
            deltas = relabelled_deltas(st_f, signs)
            perm_key[f] = list(torch.linalg.svd(deltas).Vh.transpose(1, 2))
            groups = [g for g, sr in feat.groups.items() if g != POOLED and sr.rank > 0]
            if f"{f}:groups" in bases and groups:
                group_deltas = {g: relabelled_deltas(st_f, signs, g) for g in groups}
                perm_groups[f] = [
                    energy_ordered_union(
                        [feature_subspace(dg[j], cfg.energy, rank=feat.groups[g].rank)
                         for g, dg in group_deltas.items()]
                    )
                    for j in range(P)
                ]  # fmt: skip
        plan.n_permuted = P
    else:
        plan.skipped = (
            "label-permuted baselines off (--n-permuted 0)"
            if not P
            else "label-permuted baselines need the record statistics (--n-permutations or "
            "--n-bootstrap > 0)"
        )

    def permuted_bases(name: str, r: int) -> list[torch.Tensor] | None:
        if not perm_key:
            return None
        base = name.split("@")[0]
        if name == "all":
            return [
                union_basis([perm_key[f][j][:, : features[f].pooled.rank]
                             for f in features if features[f].pooled.rank > 0])[:, :r]
                for j in range(P)
            ]  # fmt: skip
        if base.endswith(":groups"):
            src = perm_groups.get(base[: -len(":groups")])
            return None if src is None else [u[:, :r] for u in src]
        return [v[:, :r] for v in perm_key[base]]

    for name, b in bases.items():
        pb = permuted_bases(name, int(b.shape[1]))
        if pb:
            plan.offline[f"permuted:{name}"] = pb
            plan.families[name] = f"permuted:{name}"
    # the causal rank curve over the headline's ordered directions
    pooled = features[f0].pooled
    if headline == f0:
        source = feature_subspace(pooled.delta, cfg.energy, rank=min(D, CAUSAL_MAX)).key_basis
        perm_src = perm_key.get(f0, [])
    else:
        source = features[f0].union_key
        perm_src = perm_groups.get(f0, [])
    if cfg.causal_max_rank:
        want = max(cfg.causal_max_rank, int(bases[headline].shape[1]))
        R = min(want, CAUSAL_MAX, source.shape[1])
        notes = []
        if want > CAUSAL_MAX:
            notes.append(f"R capped at {CAUSAL_MAX} (the rank in force is {want})")
        if min(want, CAUSAL_MAX) > R:
            notes.append(
                f"R clamped to {R}, the "
                + ("head dimension" if headline == f0 else "width of the group union")
            )
        plan.R, plan.note = R, "; ".join(notes)
        plan.curve_source = source[:, :R]
        # the first r columns of a Haar-random rank-R basis are a Haar-random rank-r basis
        rand = [
            random_orthonormal(D, R, seed=sub_seed(cfg.seed, "curve-random", d))
            for d in range(min(cfg.n_random, CURVE_RANDOM))
        ]
        for r in range(1, R + 1):
            plan.offline[f"curve:{r}"] = [source[:, :r]]
            plan.offline[f"curve-random:{r}"] = [u[:, :r] for u in rand]
            if perm_src:
                plan.offline[f"curve-permuted:{r}"] = [
                    u[:, :r] for u in perm_src if u.shape[1] >= r
                ]
    if signs0 is not None and record_groups:
        # centroids of each held-out record's group (the query's feature value in categorical
        # designs, where pooled means would average the matching values away); pooled for
        # records without a group that has both sides among the build records
        st0 = stats[f0]
        signs = torch.cat([torch.ones(1, st0.n, dtype=torch.float64), signs0])

        def means(group: str | None) -> tuple[torch.Tensor, torch.Tensor]:
            return class_key_means(st0, signs, group)

        cache = {None: means(None)}
        for g in set(record_groups):
            if g is not None and g in st0.groups and all(st0.counts(g)):
                cache[g] = means(g)
        per = [cache.get(g, cache[None]) for g in record_groups]
        plan.means = (torch.stack([m[0] for m in per], 1), torch.stack([m[1] for m in per], 1))

    def late(out: Mapping[str, Any]) -> dict[str, Any]:
        chosen, extra, extra_offline = headline, {}, {}
        if plan.R:
            curve = [
                float(out["offline"][f"curve:{r}"]["delta_p"].mean()) for r in range(1, plan.R + 1)
            ]
            rnd = [
                float(out["offline"][f"curve-random:{r}"]["delta_p"].mean())
                for r in range(1, plan.R + 1)
            ]
            # never settle where random subspaces move more than MAX_RANDOM_SHARE of the
            # effect; when no rank qualifies keep the plain rule's rank and say so
            plan.guard = guarded_causal_rank(curve, rnd, CAUSAL_FRACTION)
            plan.rank = int(plan.guard["rank"]) or causal_rank(curve, CAUSAL_FRACTION)
            if plan.rank:
                same = [n for n in (headline, f"{f0}@energy") if n in bases
                        and int(bases[n].shape[1]) == plan.rank
                        and torch.allclose(bases[n].double(), source[:, : plan.rank].double())]  # fmt: skip
                if same:
                    chosen = same[0]
                else:
                    chosen = f"{headline}@causal"
                    extra[chosen] = source[:, : plan.rank].float()
                    pb = permuted_bases(headline, plan.rank)
                    if pb:
                        plan.families[chosen] = f"permuted:{chosen}"
                        extra_offline[f"permuted:{chosen}"] = pb
        plan.headline = chosen
        basis = (extra.get(chosen) if chosen in extra else bases[chosen]).double()
        more: dict[str, Any] = {"bases": extra, "offline": extra_offline, "patches": {}}
        # the centroid patch: real labels in the real subspace, each permutation's labels in
        # its own subspace (the same estimator on relabelled records)
        pbl = permuted_bases(chosen, int(basis.shape[1]))
        plan.label_stack = torch.stack([basis, *[b.double() for b in pbl or []]])
        if plan.means is not None and pbl:
            plan.label_condition = chosen
            more["patches"]["label"] = (plan.label_stack, *plan.means)
        # transfer: the headline's rank built on each position pattern's build records
        st0 = stats.get(f0)
        r = int(basis.shape[1])
        if st0 is None:
            plan.transfer_skipped = (
                "needs the record statistics (--n-permutations or --n-bootstrap > 0)"
            )
        elif build_patterns is None or len(build_patterns) != st0.n:
            plan.transfer_skipped = "no position pattern per build record"
        else:
            pb = pattern_bases(st0, build_patterns, r)
            if len(pb) < 2:
                plan.transfer_skipped = (
                    "the build records hold one position pattern only (the positives always "
                    "farther from the query than the negatives, or always nearer): nothing to "
                    "build the other pattern's subspace on"
                )
            else:
                plan.transfer_skipped, plan.transfer_rank = None, r
                more["offline"].update(
                    {f"transfer:{p}": [b.float().double()] for p, b in pb.items()}
                )
                more["offline"]["transfer-random"] = [
                    random_orthonormal(D, r, seed=sub_seed(cfg.seed, "transfer-random", d))
                    for d in range(CURVE_RANDOM)
                ]
        return more

    plan.late = late
    return plan


def _permuted_baselines(
    conditions: Mapping[str, SwapCondition], offline: Mapping[str, Any], plan: _Causal
) -> None:
    """Each condition's label-permuted baseline (mean ± std over the permutations) and the
    p of its Δp against it."""
    from .core import statistics as st

    for name, c in conditions.items():
        fam = offline.get(plan.families.get(name, ""))
        if fam is None:
            continue
        c.permuted = {
            m: {"mean": float(v.mean(1).mean()), "std": float(v.mean(1).std()), "draws": v.mean(1).tolist()}
            for m, v in fam.items() if m in ("delta_p", "flip_items", "flip_all")
        }  # fmt: skip
        c.p_permuted = st.random_p_value(float(c.metrics["delta_p"]), fam["delta_p"].mean(1))


def _token_view(
    model: Any,
    tokenizer: Any,
    resolved: Sequence[Any],
    swap_base: Callable[[], Any] | None,
    head: Head,
    features: Mapping[str, FeatureResult],
    swaps: SwapResult,
    cfg: RunConfig,
) -> TokenViewResult | None:
    """The report's per-prompt view: the swap records' first prompts (same swap pairs and
    the same unedited forward as :func:`_swaps`), attention before/after the headline swap
    and the exact logit split (in the run's frame)."""
    from .engine.tokenview import collect_token_view

    if swap_base is None or not resolved:
        return None
    base = swap_base()
    basis = _condition_basis(features, swaps, cfg, int(model_head_dim(model)))
    qb = _query_bases(features)
    info, tensors = collect_token_view(
        model, tokenizer, resolved, base.pairs[head], head[0], head[1], basis, qb,
        condition=swaps.headline, batch_size=cfg.batch_size, batches=base.views[head],
    )  # fmt: skip
    if basis is None:
        info["after_reason"] = swaps.skipped or f"condition {swaps.headline!r} has no key basis"
    return TokenViewResult(info, tensors)


def _condition_basis(
    features: Mapping[str, FeatureResult], swaps: SwapResult, cfg: RunConfig, D: int
) -> torch.Tensor | None:
    """The key basis of the headline swap condition: one of :func:`_swap_conditions` or the
    causal-rank subspace ``<condition>@causal`` (the first r directions the curve ordered)."""
    name = swaps.headline or ""
    bases = _swap_conditions(features, cfg.energy)
    if name in bases or not name.endswith("@causal"):
        return bases.get(name)
    r = int((swaps.causal_rank or {}).get("rank") or 0)
    base, f0 = name[: -len("@causal")], next(iter(features))
    if not r:
        return None
    if base == f0:
        pooled = features[f0].pooled
        return feature_subspace(pooled.delta, cfg.energy, rank=min(D, CAUSAL_MAX)).key_basis[:, :r]
    union = features[f0].union_key
    return None if union is None else union[:, :r]


def _swap_statistics(conditions: Mapping[str, SwapCondition], cfg: RunConfig) -> None:
    """Paired bootstrap CIs over prompts and the p-value against the random subspaces."""
    try:
        from .core import statistics as st
    except ImportError:  # statistics layer not available
        return
    for c in conditions.values():
        if c.random is not None and "delta_p" in c.random:
            draws = torch.tensor(c.random["delta_p"]["draws"], dtype=torch.float64)
            c.p_value = st.random_p_value(float(c.metrics["delta_p"]), draws)
        if c.per_prompt and cfg.n_bootstrap:
            c.ci = {
                m: list(
                    st.paired_bootstrap_ci(
                        torch.tensor(v, dtype=torch.float64),
                        n_boot=max(cfg.n_bootstrap, 200),
                        seed=sub_seed(cfg.seed, f"ci:{c.name}:{m}"),
                    )
                )
                for m, v in c.per_prompt.items()
            }


def _rotary(model: Any, n_layers: int, frame: str) -> tuple[dict[int, Any], str | None]:
    """Rotary specs of every layer and why there are none; ``--frame query`` refuses a model
    without a known rotary layout here, before any heavy work."""
    from .models.rotary import rotary_specs

    try:
        return rotary_specs(model, range(n_layers)), None
    except ValueError as err:
        if frame == "query":
            raise
        return {}, str(err).replace("--frame query: ", "").replace("; use --frame post", "")


def _head_position(
    features: Mapping[str, FeatureResult],
    spec: Any,
    vecs: Any,
    build: Sequence[Any],
    feature_of: list[str],
    cfg: RunConfig,
    name: str,
    no_rotary: str | None = None,
) -> dict[str, Any]:
    """Rotary-band profiles of the head's subspaces and the position-only control."""
    from .engine.position import position_controls, rotary_profiles

    out: dict[str, Any] = {"frame": cfg.frame}
    if spec is None:
        out["rotary_profile"] = None
        out["rotary_skipped"] = no_rotary or "the model has no rotary layout qkcov knows"
    else:
        out["rotary"] = {"layout": spec.layout, "rotary_dim": spec.rotary_dim,
                         "wavelengths": [float(x) for x in spec.wavelengths()]}  # fmt: skip
        out["rotary_profile"] = rotary_profiles(features, spec)
    if vecs is not None and build:
        out["control"] = position_controls(
            vecs.select(list(range(len(build)))), build, features, feature_of,
            seed=sub_seed(cfg.seed, f"position:{name}"),
        )  # fmt: skip
    else:
        out["control"] = None
        out["control_skipped"] = "needs the projections step (its build-record vectors)"
    return out


def _label_kind(sw: SwapResult) -> tuple[str, str, float | None]:
    """Which label-sensitive test the verdict uses: ``(kind, source, relational share)`` —
    the feature's declared ``kind`` when its records give one, else ``"relation"`` when the
    build records' ΔC inside the headline subspace is mostly relational (share above
    :data:`qkcov.engine.relational.RELATION_SHARE`), else ``"class"``."""
    from .engine.relational import RELATION_SHARE

    rel = sw.relation_test or {}
    share = rel.get("relation_share")
    if rel.get("declared_kind"):
        return str(rel["declared_kind"]), "declared", share
    return (
        ("relation" if share is not None and share > RELATION_SHARE else "class"),
        "detected",
        share,
    )


def _verdict(h: HeadResult, cfg: RunConfig) -> Verdict:
    """One verdict per head from the significance test, the swap against random and
    label-permuted subspaces and the label-sensitive test that fits the feature: the centroid
    patch for a class feature, the cross-record exchange for a relational one (see
    :class:`Verdict` and :func:`_label_kind`); plus the guarded causal rank and the transfer
    across position patterns where they ran."""
    a = cfg.alpha
    d = h.to_dict()
    sig = d["significance"] or {}
    sw = h.swaps
    c = sw.conditions.get(sw.headline or "")
    kind, source, share = _label_kind(sw)
    rel = sw.relation_test or {}
    lab = (sw.label_test or {}) if kind == "class" else rel
    p_null = headline_p(d) if sig.get("available") else None
    guard = (sw.causal_rank or {}).get("guard") or {}
    ev: dict[str, Any] = {
        "p_null": p_null,
        "rank_null": sig.get("rank_null"),
        "rank_energy": h.headline.rank_energy,
        "rank_ci": sig.get("rank_ci"),
        "causal_rank": (sw.causal_rank or {}).get("rank"),
        "condition": sw.headline,
        "alpha": a,
        "test": "centroid patch" if kind == "class" else "cross-record exchange",
        "kind": kind,
        "kind_source": source,
        "relation_share": share,
        "rank_guard": guard.get("reason"),
    }
    if c is not None:
        ev.update(
            rank=c.rank, delta_p=c.metrics.get("delta_p"), delta_p_ci=(c.ci or {}).get("delta_p"),
            random_mean=(c.random or {}).get("delta_p", {}).get("mean"), p_vs_random=c.p_value,
            permuted_mean=(c.permuted or {}).get("delta_p", {}).get("mean"),
            p_vs_permuted=c.p_permuted,
            full_key=None if sw.ceiling is None else sw.ceiling.metrics.get("delta_p"),
        )  # fmt: skip
    if (sw.label_test or {}).get("available"):
        cl = sw.label_test
        ev.update(label_effect=cl["effect"], label_ci=cl["ci"],
                  label_permuted_mean=cl["permuted"]["mean"], p_label=cl["p_value"])  # fmt: skip
    if rel.get("available"):
        ev.update(relation_effect=rel["effect"], relation_ci=rel["ci"], p_relation=rel["p_value"],
                  p_relation_floor=rel["p_floor"])  # fmt: skip
    name = h.name

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3g}"

    no_subspace = sig.get("available") and not (p_null is not None and p_null < a)
    if c is None:
        if no_subspace or (sig.get("available") and not sig.get("significant")):
            return Verdict("no-evidence", f"{name}: no key subspace above the permutation null "
                           f"(p (null) = {f(p_null)}, α = {a:g}); nothing to swap.", ev)  # fmt: skip
        return Verdict("not-testable", f"{name}: not testable — {sw.skipped or 'no swap ran'}.", ev)
    if not sig.get("available"):
        return Verdict("not-testable", f"{name}: not testable — {sig.get('reason') or 'no significance test'} "
                       f"(the rank-{c.rank} swap gives Δp {f(ev['delta_p'])} vs {f(ev['random_mean'])} random).", ev)  # fmt: skip
    swap = (f"its rank-{c.rank} key subspace swap moves Δp {f(ev['delta_p'])} vs "
            f"{f(ev['random_mean'])} for random (p = {f(c.p_value)})"
            + ("" if c.p_permuted is None else
               f" and {f(ev['permuted_mean'])} for label-permuted subspaces (p = {f(c.p_permuted)})"))  # fmt: skip
    extra = _transfer_clause(sw) + (
        f"; causal rank: {guard['reason']}" if guard.get("reason") else ""
    )
    which = (f" [{'declared' if source == 'declared' else 'detected'} {kind} feature"
             + ("" if share is None else f", relational share {share:.2f}") + "]")  # fmt: skip
    if no_subspace or c.p_value is None or c.p_value >= a:
        return Verdict("no-evidence", f"{name}: ΔC is above its null (p (null) = {f(p_null)}) "
                       f"but {swap}: no causal evidence{extra}.", ev)  # fmt: skip
    if not lab.get("available"):
        return Verdict("not-testable", f"{name}: {swap}, but the label-sensitive test did not run "
                       f"({lab.get('reason') or 'off'}), so whether the labels live in it is untested{which}.", ev)  # fmt: skip
    if kind == "class":
        patch = (
            f"moving keys to the other class's centroid inside it shifts Δp by {f(lab['effect'])} "
            f"vs {f(lab['permuted']['mean'])} with permuted labels (p = {f(lab['p_value'])})"
        )
        label_ok = lab["p_value"] < a and lab["effect"] > 0
    else:
        patch = (
            f"giving the positive key another record's positive coordinates inside it moves "
            f"attention by {f(lab['effect'])} more than the same exchange on the negative keys "
            f"(exact sign-flip p = {f(lab['p_value'])}, floor {f(lab['p_floor'])}, "
            f"{lab['n_pairs']} record pairs)"
        )
        label_ok = lab["p_value"] < a and lab["effect"] > 0
    if label_ok:
        what = "the feature" if kind == "class" else "the query–key relation"
        return Verdict("reads-feature", f"{name} reads {what}: {patch}; {swap}{extra}{which}.", ev)
    if c.p_permuted is not None and c.p_permuted < a:
        return Verdict("separates-keys-not-feature", f"{name} separates the keys but not by the "
                       f"feature: {swap}, yet {patch}{extra}{which}.", ev)  # fmt: skip
    # neither label-sensitive test passes: a subspace of Σ ±q(k⁺−k⁻)ᵀ with any labels would
    # move attention as far (the swap touches the key difference, whatever the labels)
    return Verdict("no-evidence", f"{name}: {swap}, no further than label-permuted subspaces, "
                   f"and {patch}: the swap touches the key difference whatever the labels, so "
                   f"nothing says the labels live in it{extra}{which}.", ev)  # fmt: skip


def _transfer_clause(sw: SwapResult) -> str:
    """``"; built on <one pattern> …"``: the transfer's smallest cross-pattern Δp beside its
    in-distribution Δp, or ``""`` when no transfer ran."""
    tr = sw.transfer or {}
    if not tr.get("available"):
        return ""
    rows = tr["rows"]
    cross = [r for r in rows if not r["in_distribution"]]
    worst = min(cross, key=lambda r: r["delta_p"])
    same = next(
        (r for r in rows if r["in_distribution"] and r["tested_on"] == worst["tested_on"]), None
    )
    return (f"; built on the records with the positive {worst['built_on'].split('-')[1]} and "
            f"swapped on those with it {worst['tested_on'].split('-')[1]}, a rank-{tr['rank']} "
            f"subspace moves Δp {worst['delta_p']:.3g}"
            + ("" if same is None else f" (built on those: {same['delta_p']:.3g})")
            + f", random {worst['random_mean']:.3g}")  # fmt: skip


def model_head_dim(model: Any) -> int:
    from .models.loading import model_info

    return model_info(model).head_dim


def _query_bases(features: Mapping[str, FeatureResult]) -> dict[str, torch.Tensor]:
    """Query-side basis per feature for the attribution: the pooled subspace, or the group
    union when the pooled rank is 0 (features without either are left out)."""
    return {
        name: f.pooled.query_basis if f.pooled.rank > 0 else f.union_query
        for name, f in features.items()
        if f.pooled.rank > 0 or (f.union_query is not None and f.union_query.shape[1] > 0)
    }


def _attribution(
    full: Mapping[str, Any],
    features: Mapping[str, FeatureResult],
    tokens: list[str],
    cfg: RunConfig,
) -> AttributionResult:
    qb = _query_bases(features)
    if not qb:
        reason = next(
            (
                f.pooled.significance.get("reason")
                for f in features.values()
                if f.pooled.significance and f.pooled.significance.get("reason")
            ),
            "every feature has rank 0",
        )
        return AttributionResult([], 0, math.nan, math.nan, {}, {}, math.nan, skipped=reason)
    if not len(full["keys"]):
        return AttributionResult(
            [], 0, math.nan, math.nan, {}, {}, math.nan, skipped="no held-out records"
        )
    order = list(qb)
    ex = explain_logits(full["q"], full["keys"], qb, priority=order, scaling=full["scaling"])
    D = full["q"].shape[1]
    fr, fc = [], []
    for d in range(min(cfg.n_random, ATTRIBUTION_RANDOM)):
        rb = {
            n: random_orthonormal(D, b.shape[1], seed=sub_seed(cfg.seed, f"attr-random:{n}", d))
            for n, b in qb.items()
        }
        rex = explain_logits(full["q"], full["keys"], rb, priority=order, scaling=full["scaling"])
        fr.append(rex["explained_fraction"])
        fc.append(rex["explained_fraction_centred"])
    rf, rc = torch.tensor(fr, dtype=torch.float64), torch.tensor(fc, dtype=torch.float64)
    a0 = ex["attributions"][0]
    return AttributionResult(
        names=ex["names"], n=len(full["keys"]), explained_fraction=ex["explained_fraction"],
        explained_fraction_centred=ex["explained_fraction_centred"],
        random={"mean": float(rf.mean()), "std": float(rf.std()), "centred_mean": float(rc.mean()), "centred_std": float(rc.std())},
        share=ex["share"], max_abs_error=ex["max_abs_error"], example_parts=a0.parts.double(),
        example_total=a0.total.double(), example_tokens=tokens,
    )  # fmt: skip


def _explicit_heads(spec: str, info: Any) -> list[Head]:
    from .models.heads import parse_heads

    return list(parse_heads(spec, info.n_layers, info.n_heads))


def _subset(idx: list[int], k: int, seed: int, purpose: str) -> list[int]:
    """``k`` of ``idx`` drawn at random (seeded per purpose), in record order; all when k = 0."""
    if k == 0 or k >= len(idx):
        return idx
    gen = torch.Generator().manual_seed(sub_seed(seed, purpose))
    return [idx[i] for i in sorted(torch.randperm(len(idx), generator=gen)[:k].tolist())]


# --------------------------------------------------------------------------- resume
def record_subsets(plan: Plan, cfg: RunConfig) -> dict[str, list[int]]:
    """Record indices of each role of a run (the one definition the pipeline and the
    benchmarks use): ``build``/``heldout`` (the split), ``scan`` (build records for the head
    scan, auto heads), ``swaps`` (two-sided held-out records), ``centroid`` (build records
    the figures' centroids are fitted on, with projections), ``attribution``, ``projections``
    (held-out records projected)."""
    steps = cfg.step_list()
    held = plan.indices("heldout")
    proj = held if "projections" in steps else []
    return {
        "build": plan.indices("build"),
        "heldout": held,
        "scan": _subset(plan.indices("build", two_sided=True), cfg.n_scan, cfg.seed, "scan-subset"),
        "swaps": _subset(plan.indices("heldout", two_sided=True), cfg.n_swap, cfg.seed, "swap-subset")
        if "swaps" in steps
        else [],
        "projections": proj,
        "centroid": _subset(plan.indices("build"), cfg.n_centroid, cfg.seed, "centroid-subset")
        if proj
        else [],
        "attribution": _subset(held, cfg.n_attribution, cfg.seed, "attribution-subset")
        if "attribution" in steps
        else [],
    }  # fmt: skip


class RunState:
    """Checkpoints of one run in ``.<out>.checkpoint/`` beside ``out``: the contrast
    accumulators (every ``checkpoint_every`` batches, per rank), the head scan and each
    finished head. ``resume=True`` continues from them when the fingerprint (settings, a hash
    of the records, the model) matches, and refuses otherwise; a finished run deletes them."""

    def __init__(
        self,
        out: str | Path,
        cfg: RunConfig,
        records: Sequence[ContrastRecord],
        *,
        resume: bool,
        dist: Any = None,
    ) -> None:
        from .engine.checkpoint import data_hash

        out = Path(out).expanduser().absolute()
        self.dir = out.parent / f".{out.name}.checkpoint"
        self.cfg, self.resume, self.dist = cfg, resume, dist
        settings = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}
        self.fingerprint = {
            "settings": settings,
            "records": data_hash([r.to_dict() for r in records]),
        }
        self.enabled = cfg.checkpoint_every > 0 or resume
        if not self.enabled:
            return
        from .artifacts import read_json, write_json

        fp = self.dir / "fingerprint.json"
        if resume and not fp.is_file():
            raise ValueError(
                f"--resume: no checkpoint to resume in {self.dir} (a run makes one with "
                "--checkpoint-every N); run without --resume to start afresh"
            )
        if resume:
            saved = read_json(fp)
            for key in ("records", "settings"):
                if saved.get(key) != self.fingerprint[key]:
                    diff = (
                        key
                        if key == "records"
                        else next(
                            (k for k in settings if saved["settings"].get(k) != settings[k]), key
                        )
                    )
                    raise ValueError(
                        f"--resume: checkpoint in {self.dir} was made with different settings or "
                        f"data: {'the records differ' if diff == 'records' else f'--{diff.replace(chr(95), chr(45))} differs'}"
                    )
        elif self._main:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            write_json(fp, self.fingerprint)
        self._barrier()

    @property
    def _main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def _barrier(self) -> None:
        from .engine.distributed import barrier

        barrier(self.dist)

    def contrast(self, feature: str) -> Any:
        if not self.enabled:
            return None
        from .engine.checkpoint import Checkpoint
        from .naming import safe_component

        return Checkpoint(
            self.dir / f"contrast-{safe_component(feature)}.safetensors", self.fingerprint,
            every=max(self.cfg.checkpoint_every, 1), resume=self.resume,
        )  # fmt: skip

    def load_scan(self) -> list[dict[str, Any]] | None:
        from .engine.checkpoint import load_checked

        if not (self.resume and (self.dir / "scan.json").is_file()):
            return None
        data, _ = load_checked(self.dir / "scan.json", self.dir / "scan.safetensors")
        return data["scan"]

    def save_scan(self, scan: list[dict[str, Any]]) -> None:
        from .engine.checkpoint import save_checked

        if self.enabled and self._main:
            save_checked(self.dir / "scan.json", self.dir / "scan.safetensors", {"scan": scan}, {})

    def load_head(self, name: str) -> HeadResult | None:
        from .engine.checkpoint import load_checked
        from .results import _head_from_dict

        if not (self.resume and (self.dir / f"head-{name}.json").is_file()):
            return None
        return _head_from_dict(
            *load_checked(self.dir / f"head-{name}.json", self.dir / f"head-{name}.safetensors")
        )

    def save_head(self, head: HeadResult) -> None:
        from .engine.checkpoint import save_checked

        if self.enabled and self._main:
            save_checked(
                self.dir / f"head-{head.name}.json", self.dir / f"head-{head.name}.safetensors",
                head.to_dict(), head.tensors(),
            )  # fmt: skip

    def discard_if_empty(self) -> None:
        """Delete a checkpoint that holds nothing but its fingerprint (no work to resume)."""
        import shutil

        empty = self.dir.is_dir() and {p.name for p in self.dir.iterdir()} <= {"fingerprint.json"}
        if self.enabled and self._main and empty:
            shutil.rmtree(self.dir, ignore_errors=True)

    def finish(self) -> None:
        import shutil

        self._barrier()
        if self.enabled and self._main:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- entry points
def analyze(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[ContrastRecord | Mapping[str, Any]],
    *,
    config: RunConfig | None = None,
    progress: bool = True,
    **overrides: Any,
) -> AnalysisResult:
    """The whole method on a model you loaded (any device) and your records.

    >>> result = qkcov.analyze(model, tokenizer, records, heads="auto")   # doctest: +SKIP
    >>> print(result.summary()); result.report("out/")                    # doctest: +SKIP

    ``records``: :class:`ContrastRecord` objects or dicts in the JSONL schema. ``overrides``
    are :class:`RunConfig` fields (``heads``, ``n_random``, ``seed``, ...).
    """
    from .checks import check_notebook_inputs

    records = check_notebook_inputs(model, tokenizer, records, config, overrides)
    cfg = dataclasses.replace(config, **overrides) if config is not None else RunConfig(**overrides)
    plan = plan_records(records, cfg)
    result = _analyze(
        model, tokenizer, plan, cfg, Timer("run", quiet=not progress), model_name=None
    )
    result.provenance = provenance(model, plan, None, None)
    return result


def _scan_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], scan_idx: list[int], cfg: RunConfig,
    info: Any, timer: Timer, state: RunState | None, dist: Any,
) -> list[dict[str, Any]] | None:  # fmt: skip
    """The all-head scan over the scan subset (``--heads auto`` only; explicit heads get no
    scan forward at all: the swaps' own base pass finds each head's most-attended key)."""
    from .engine.scan import attention_rows, scan_heads

    saved = state.load_scan() if state is not None else None
    if saved is not None:
        timer.log("head scan: resumed from the checkpoint")
        return saved
    if not (cfg.heads.strip().lower().startswith("auto") and scan_idx):
        return None
    timer.log(f"head scan over {info.n_layers} layers x {info.n_heads} heads")
    records = [resolved[i] for i in scan_idx]
    rows = attention_rows(model, tokenizer, records, batch_size=cfg.batch_size,
                          progress=not timer.quiet, dist=dist)  # fmt: skip
    scan = scan_heads(rows, records, seed=sub_seed(cfg.seed, "scan"))
    if state is not None:
        state.save_scan(scan)
    return scan


def _contrast_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], plan: Plan, heads: list[Head],
    cent: list[int], cfg: RunConfig, timer: Timer, state: RunState | None, dist: Any,
) -> tuple[dict[str, Any], dict[str, Any], dict[Head, Any] | None]:  # fmt: skip
    """One forward per build record: every feature's ΔC (and record statistics), and the
    centroid records' vectors in ``cent`` order (``None`` when a pass resumed from a
    checkpoint: the collection pass then forwards them)."""
    from .engine.contrast import HeadVectors, run_contrast

    contrasts, stats, parts = {}, {}, []
    mine = set(cent)
    for f in plan.features:
        idx_f = plan.indices("build", f)
        contrasts[f] = run_contrast(
            model, tokenizer, [resolved[i] for i in idx_f], heads, batch_size=cfg.batch_size,
            progress=not timer.quiet, keep_records=cfg.n_permutations > 0 or cfg.n_bootstrap > 0,
            dist=dist, checkpoint=None if state is None else state.contrast(f),
            frame=cfg.frame, vectors_for=[j for j, i in enumerate(idx_f) if i in mine],
        )  # fmt: skip
        stats[f] = contrasts[f].record_stats
        parts.append(([i for i in idx_f if i in mine], contrasts[f].vectors))
    if not cent or any(v is None for ids, v in parts if ids):
        return contrasts, stats, None
    at = {i: j for j, i in enumerate(i for ids, _ in parts for i in ids)}
    cent_vecs = {
        h: HeadVectors.concat([v[h] for ids, v in parts if ids]).select(
            [at[i] for i in cent], renumber=False
        )
        for h in heads
    }
    return contrasts, stats, cent_vecs


def _collect_step(
    model: Any, tokenizer: Any, resolved: Sequence[Any], heads: list[Head], cent: list[int],
    held: list[int], attr_idx: list[int], cent_vecs: dict[Head, Any] | None, cfg: RunConfig,
    timer: Timer, dist: Any,
) -> tuple[dict[Head, Any], dict[Head, Any]]:  # fmt: skip
    """ONE forward over the held-out records (and the centroid records when the ΔC pass did
    not keep them): the projections' vectors (centroid records first, in ``cent`` order,
    then ``held``) and the attribution's full keys (attribution records are held-out)."""
    from .engine.contrast import HeadVectors, collect_qk

    pre = [] if cent_vecs is not None else cent
    coll = pre + held + [i for i in attr_idx if i not in set(held)]
    if not coll:
        return {}, {}
    at = {i: j for j, i in enumerate(coll) if j >= len(pre)}
    vecs, full = collect_qk(
        model, tokenizer, [resolved[i] for i in coll], heads, batch_size=cfg.batch_size,
        progress=not timer.quiet, dist=dist, frame=cfg.frame,
        full_keys=[at[i] for i in attr_idx],
    )  # fmt: skip
    if not held:
        vecs = {}
    elif cent_vecs is not None:
        vecs = {h: HeadVectors.concat([cent_vecs[h], vecs[h]]) for h in heads}
    return vecs, full if attr_idx else {}


def _analyze(
    model: Any,
    tokenizer: Any,
    plan: Plan,
    cfg: RunConfig,
    timer: Timer,
    model_name: str | None,
    state: RunState | None = None,
    dist: Any = None,
) -> AnalysisResult:
    from .engine.contrast import resolve_records
    from .engine.scan import select_heads
    from .models.loading import model_info

    progress = not timer.quiet
    info = model_info(model)
    specs, no_rotary = _rotary(model, info.n_layers, cfg.frame)
    if not cfg.heads.strip().lower().startswith("auto"):
        from .models.heads import parse_heads

        parse_heads(cfg.heads, info.n_layers, info.n_heads)
    with timer.phase("resolve"):
        resolved = resolve_records(tokenizer, plan.records, chat=cfg.chat)
        from .engine.contrast import check_lengths
        from .models.loading import max_positions

        limit = cfg.max_tokens or max_positions(model)
        if limit:
            check_lengths(resolved, limit)
    steps = cfg.step_list()
    subsets = record_subsets(plan, cfg)
    scan_idx, swap_idx = subsets["scan"], subsets["swaps"]
    with timer.phase("scan"):
        scan = _scan_step(model, tokenizer, resolved, scan_idx, cfg, info, timer, state, dist)
    heads = select_heads(cfg.heads, scan, info.n_layers, info.n_heads, k=cfg.n_heads)
    timer.log(f"heads: {', '.join(f'L{l}H{h}' for l, h in heads)}")

    from .engine.position import offset_diagnostics

    offsets, offset_warnings = offset_diagnostics(
        {f: [resolved[i] for i in plan.indices("build", f)] for f in plan.features}
    )
    for w in offset_warnings:
        timer.log(w)
    held, cent = subsets["projections"], subsets["centroid"]
    with timer.phase("contrast"):
        contrasts, stats, cent_vecs = _contrast_step(
            model, tokenizer, resolved, plan, heads, cent, cfg, timer, state, dist
        )
    attr_idx = subsets["attribution"]
    with timer.phase("collect"):
        vecs, full = _collect_step(
            model, tokenizer, resolved, heads, cent, held, attr_idx, cent_vecs, cfg, timer, dist
        )
    tokens = (
        [
            tokenizer.decode([t])
            for t in resolved[attr_idx[0]].input_ids[: resolved[attr_idx[0]].query + 1]
        ]
        if attr_idx
        else []
    )

    swap_records = [resolved[i] for i in swap_idx]
    shared: dict[str, Any] = {}
    from .core.transfer import position_patterns

    b0 = [r for r in (resolved[i] for i in plan.indices("build", plan.features[0])) if r.keys]
    build_patterns = position_patterns(
        [r.query for r in b0], [r.positives for r in b0], [r.negatives for r in b0]
    )

    def swap_base() -> Any:
        """The swaps' unedited forward, once for all heads still to do (on first use)."""
        if "base" not in shared:
            from .engine.swaps import capture_swap_base

            todo = [h for h in heads if h not in done_heads]
            shared["base"] = capture_swap_base(
                model, tokenizer, swap_records, todo, seed=sub_seed(cfg.seed, "pairs"),
                batch_size=cfg.batch_size, progress=progress,
                specs=specs if cfg.frame == "query" else None, dist=dist,
            )  # fmt: skip
        return shared["base"]

    head_results = []
    done_heads: dict[Head, HeadResult] = {}
    if state is not None:
        for head in heads:
            done = state.load_head(f"L{head[0]}H{head[1]}")
            if done is not None:
                done_heads[head] = done
    for head in heads:
        name = f"L{head[0]}H{head[1]}"
        done = done_heads.get(head)
        if done is not None:
            timer.log(f"{name}: resumed from the checkpoint")
            head_results.append(done)
            continue
        with timer.phase("subspaces"):
            features = {
                f: _subspace_results(contrasts[f], head, f, cfg, (stats[f] or {}).get(head))
                for f in plan.features
            }
        projections = {}
        with timer.phase("projections"):
            if held:
                v = vecs[head]
                n_cent = len(cent)
                groups_all = [plan.records[i].group or "" for i in cent + held]
                for f, feat in features.items():
                    tr = [j for j, i in enumerate(cent) if plan.feature_of(i) == f]
                    te = [n_cent + j for j, i in enumerate(held) if plan.feature_of(i) == f]
                    if not te:
                        continue
                    projections[f] = _projection(
                        feat, v.select(tr) if tr else None, v.select(te), [groups_all[j] for j in tr], [groups_all[j] for j in te], cfg,
                        sub_seed(cfg.seed, f"proj:{name}:{f}"),
                    )  # fmt: skip
                    _name_points(
                        projections[f], tokenizer, [resolved[held[j - n_cent]] for j in te]
                    )
        with timer.phase("swaps"):
            timer.log(f"{name}: swaps")
            swaps = _swaps(
                model, tokenizer, swap_records, swap_base, head, features, cfg, progress,
                None if "swaps" in steps else "step off (--steps)",
                {f: (stats[f] or {}).get(head) for f in plan.features},
                plan.kinds.get(plan.features[0]), build_patterns,
            )  # fmt: skip
        with timer.phase("token_view"):
            token_view = _token_view(
                model, tokenizer, swap_records, swap_base if swap_records else None, head,
                features, swaps, cfg,
            )  # fmt: skip
        with timer.phase("attribution"):
            attribution = (
                _attribution(full[head], features, tokens, cfg)
                if full
                else AttributionResult(
                    [], 0, math.nan, math.nan, {}, {}, math.nan, skipped="no held-out records"
                )
            )
        scan_row = next(
            (r for r in scan or [] if r["layer"] == head[0] and r["head"] == head[1]), None
        )
        with timer.phase("position"):
            position = _head_position(
                features, specs.get(head[0]), vecs.get(head), [resolved[i] for i in cent],
                [plan.feature_of(i) for i in cent], cfg, name, no_rotary,
            )  # fmt: skip
        head_results.append(
            HeadResult(
                head[0],
                head[1],
                features,
                projections,
                swaps,
                attribution,
                scan_row,
                token_view=token_view,
                position=position,
            )
        )
        head_results[-1].verdict = _verdict(head_results[-1], cfg)
        if state is not None:
            state.save_head(head_results[-1])
    shared.clear()  # the swap base's hidden states
    plan.notes.extend(_duplicate_notes(head_results))

    feature_info = [
        {
            "name": f,
            "groups": contrasts[f].groups,
            "n_build": len(plan.indices("build", f)),
            "n_heldout": len(plan.indices("heldout", f)),
            "n_two_sided": len(plan.indices(None, f, True)),
        }
        for f in plan.features
    ]
    return AnalysisResult(
        config=cfg.to_dict(),
        model=model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        model_info=dataclasses.asdict(info),
        features=feature_info,
        n_records=len(plan.records),
        heads=head_results,
        scan=scan,
        timings=dict(timer.seconds),
        seconds=timer.total(),
        notes=list(plan.notes) + offset_warnings,
        position={"frame": cfg.frame, "offsets": offsets},
    )


def run(
    cfg: RunConfig,
    records: str | Path | Sequence[ContrastRecord],
    out_dir: str | Path,
    *,
    quiet: bool = False,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    section: Mapping[str, Any] | None = None,
    extras: Callable[[Any, Any, list[ContrastRecord], RunConfig], list[dict[str, Any]]]
    | None = None,
    resume: bool = False,
    force: bool = False,
    command_line: str | None = None,
) -> AnalysisResult:
    """``qkcov run``: records (a JSONL path or records) → ``out_dir`` with ``run.json``,
    ``run.safetensors``, figures, ``section.json`` and ``report.html``.

    Every input is checked (records, split, flags, output folder) before the model loads.
    Under ``torchrun`` records are sharded by whole batches over the ranks and rank 0 writes.
    ``resume=True`` continues from the checkpoints of an interrupted run (``checkpoint_every``).
    An existing ``out_dir`` is replaced only when empty or a complete qkcov run; ``force=True``
    writes the run inside any other folder, keeping files qkcov did not write.
    ``section`` overrides the report section's title/key/text and ``extras(model, tokenizer,
    records, cfg)`` adds task-specific tables to it (the built-in tasks use both).
    """
    from .artifacts import RunFolder
    from .engine.distributed import Dist
    from .models.loading import resolve_device
    from .tasks.records import load_records

    timer = Timer("run", quiet=quiet)
    recs = load_records(records) if isinstance(records, (str, Path)) else list(records)
    plan = plan_records(recs, cfg)
    auto = cfg.device.strip().lower() == "auto"
    if auto:
        cfg = dataclasses.replace(cfg, device=auto_device(cfg.device))
    resolve_device(cfg.device)  # --device cuda without CUDA: refused before anything is written
    dist = Dist.from_env(cfg.device)
    # --out is checked and locked before the model loads; rank 0 alone writes artifacts
    protect = [records] if isinstance(records, (str, Path)) else []
    folder = (
        RunFolder(out_dir, command="run", force=force, protect=protect) if dist.is_main else None
    )
    state = None
    try:
        state = RunState(out_dir, cfg, recs, resume=resume, dist=dist)
        if loaded is None and cfg.frame == "query":
            from .models.rotary import check_frame_config

            check_frame_config(cfg.model, cfg.trust_remote_code)  # before the weights load
        if auto:  # said once every input (--out, --resume, --frame) has been checked
            timer.log(f"device: {cfg.device} (--device auto)")
        if loaded is None:
            from .models.loading import load_model

            with timer.phase("load"):
                timer.log(f"loading {cfg.model}")
                lm = load_model(cfg.model, **_load_kwargs(cfg, dist))
                loaded = (lm.model, lm.tokenizer)
        model, tokenizer = loaded
        result = _analyze(
            model, tokenizer, plan, cfg, timer, cfg.model, state, dist if dist.enabled else None
        )
        result.provenance = provenance(
            model, plan, records if isinstance(records, (str, Path)) else None, command_line
        )
        section = dict(section or {})
        if extras is not None:
            with timer.phase("extras"):
                section["extra_tables"] = extras(model, tokenizer, plan.records, cfg)
        if folder is not None:
            from .report import build_report
            from .report.run import write_run_section

            with folder as staging:
                result.timings = dict(timer.seconds)
                result.seconds = timer.total()
                result.write_artifacts(staging)
                write_run_section(staging, **section)
                build_report(staging)
        state.finish()
    except BaseException:
        if state is not None:
            state.discard_if_empty()  # refused before any work: leave nothing beside --out
        raise
    finally:
        if folder is not None:
            folder.close()
    return result


def _load_kwargs(cfg: RunConfig, dist: Any = None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if dist is not None and dist.enabled:
        kw["device"] = str(dist.device)
    elif auto_device(cfg.device) != "cpu" and not cfg.device_map:
        kw["device"] = auto_device(cfg.device)
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.device_map:
        kw["device_map"] = cfg.device_map
    if cfg.trust_remote_code:
        kw["trust_remote_code"] = True
    return kw
