"""Binding features and attention attribution (METHOD §4, paper Figs. 8–10).

Prompt: "The <object> is in Box <letter>, ... Which box is the <object> in? Box". The query
is the last token; keys are the box-letter tokens. Two features per studied head:

* **order-ID** (order design): positive key = the answer's letter, negatives = the other
  letters; the queried object and all bindings are fixed within a family, only the answer's
  position varies.
* **lexical** (lexical design): factual / counterfactual prompts with identical contexts;
  the same letter is a positive when the queried object is bound to it, a negative when
  the queried object is absent from the context.

Pipeline of :func:`run_binding`: records → behavioural accuracy (next-token score over the
candidate letters) → head scan on the order design → per head: order and lexical ΔC, ranks
and principal angles → projections (Fig. 8) → in-forward key swaps vs equal-rank random
subspaces and the full-key ceiling (Fig. 9) → exact logit attribution over the order query
subspace, the lexical query subspace orthogonalised against it, and the residual (Fig. 10).
Artifacts: ``binding.json``, ``binding.safetensors``, figures drawn from them, and
``section.json`` for the report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..artifacts import save_tensors, write_json
from ..config import ConfigMixin, check_positive_int, check_range
from ..core.attribution import attribute
from ..core.projection import nearest_centroid_accuracy, project
from ..core.subspace import principal_angles, random_orthonormal, union_basis
from ..engine.contrast import ResolvedRecord, resolve_records, run_contrast
from ..engine.scan import attention_rows, check_heads_spec, scan_heads, select_heads
from ..engine.swaps import metric_summary, random_summary, run_swaps, swap_pairs
from ..models.capture import QKSites, capture_qk
from ..models.heads import format_head
from ..models.loading import DEFAULT_MODEL, load_model, model_info
from ..tasks.binding import MAX_PAIRS, MIN_PAIRS, BindingTaskConfig, build_binding_records
from ..tasks.records import ContrastRecord

__all__ = [
    "BindingConfig",
    "BindingRecords",
    "PRIORITIES",
    "build_records",
    "task_accuracy",
    "accuracy_sweep",
    "explain_logits",
    "run_binding",
    "run_binding_demo",
    "DEMO_CONFIG",
]

Head = tuple[int, int]
PRIORITIES = ("order", "lexical")
_N_PROJ = 3  # coordinates kept per projection for figures


@dataclass
class BindingConfig(ConfigMixin):
    """Settings of the binding experiment.

    Args:
        model: preset, local path or cached hub id (see :func:`qkcov.models.loading.load_model`).
        n_pairs: (object, box) pairs per prompt, 2..9.
        chat: wrap prompts in the model's chat template (the query is then the template's
            last token and no "Box" answer prefix is appended).
        heads: ``"auto"`` / ``"auto:K"`` (top heads of the scan) or a list ``"L3H4,L5H1"``.
        n_heads: K for ``heads="auto"``.
        n_build: records per design for ΔC (lexical rounds up to even).
        n_heldout: held-out records per design (projections, swaps, attribution).
        n_swap: held-out order records used for the swaps (each costs 3 + 3·n_random + 2
            forward passes per head); 0 = all.
        energy: cumulative singular-value energy that fixes each rank.
        n_random: random equal-rank subspaces per swap condition (>= 10).
        batch_size: prompts per forward pass.
        seed: seed of the records, swap targets and random bases.
        priority: which query subspace keeps the overlap in the attribution
            (``"order"``: lexical is orthogonalised against order; ``"lexical"``: reverse).
        n_boot: bootstrap resamples of the head scan.
        objects / letters: replace the built-in object nouns / box letters.
    """

    model: str = DEFAULT_MODEL
    n_pairs: int = 3
    chat: bool = False
    heads: str = "auto"
    n_heads: int = 2
    n_build: int = 160
    n_heldout: int = 48
    n_swap: int = 32
    energy: float = 0.99
    n_random: int = 10
    batch_size: int = 8
    seed: int = 0
    priority: str = "order"
    n_boot: int = 500
    objects: tuple[str, ...] | None = None
    letters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if (
            not isinstance(self.n_pairs, int)
            or isinstance(self.n_pairs, bool)
            or not MIN_PAIRS <= self.n_pairs <= MAX_PAIRS
        ):
            raise ValueError(
                f"n_pairs must be an integer in [{MIN_PAIRS}, {MAX_PAIRS}], got {self.n_pairs!r}"
            )
        if not isinstance(self.chat, bool):
            raise ValueError(f"chat must be a bool, got {self.chat!r}")
        check_heads_spec(self.heads)
        check_positive_int("n_heads", self.n_heads, 1)
        check_positive_int("n_build", self.n_build, 2)
        check_positive_int("n_heldout", self.n_heldout, 2)
        check_positive_int("n_swap", self.n_swap, 0)
        check_range("energy", self.energy, 0.0, 1.0, low_open=True)
        check_positive_int("n_random", self.n_random, 10)
        check_positive_int("batch_size", self.batch_size, 1)
        check_positive_int("n_boot", self.n_boot, 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {list(PRIORITIES)}, got {self.priority!r}")
        self.task_config("order")  # pairs vs objects/letters, set sizes: fail early
        self.task_config("lexical")

    def task_config(self, design: str) -> BindingTaskConfig:
        """The :class:`BindingTaskConfig` of one design (lexical sizes rounded up to even)."""
        even = lambda n: n + n % 2  # noqa: E731
        lexical = design == "lexical"
        return BindingTaskConfig(
            n_pairs=self.n_pairs,
            design=design,
            chat=self.chat,
            seed=self.seed + (1 if lexical else 0),
            n_build=even(self.n_build) if lexical else max(self.n_build, self.n_pairs),
            n_heldout=even(self.n_heldout) if lexical else max(self.n_heldout, self.n_pairs),
            objects=self.objects,
            letters=self.letters,
        )

    def priority_order(self) -> list[str]:
        return ["order", "lexical"] if self.priority == "order" else ["lexical", "order"]


# Demo defaults. Measured accuracy (40-60 plain prompts): smollm2-135m 0.52/0.38-0.47/0.48/0.37
# and gemma3-270m 0.53/0.47/0.35/0.40 for 2/3/4/5 pairs (chance 0.50/0.33/0.25/0.20); chat is
# no better (smollm2) or unavailable (the gemma3 GGUF has no chat template). No setting solves
# the task; 3 plain pairs is above chance for both models and the cheapest informative one.
DEMO_CONFIG: dict[str, Any] = {"n_pairs": 3, "chat": False}


# ------------------------------------------------------------------ records
@dataclass
class BindingRecords:
    """Build / held-out records of both designs."""

    order_build: list[ContrastRecord]
    order_heldout: list[ContrastRecord]
    lexical_build: list[ContrastRecord]
    lexical_heldout: list[ContrastRecord]


def build_records(cfg: BindingConfig) -> BindingRecords:
    """Seeded records of both designs (raises ``ValueError`` for unusable objects/letters)."""
    ob, oh = build_binding_records(cfg.task_config("order"))
    lb, lh = build_binding_records(cfg.task_config("lexical"))
    return BindingRecords(ob, oh, lb, lh)


# ------------------------------------------------------------------ behaviour
def _letter_token_sets(tokenizer: Any, r: ResolvedRecord) -> dict[str, set[int]]:
    """Token ids that answer each candidate letter: its in-context token plus the letter's
    first token with and without a leading space (chat answers start a fresh line)."""
    out: dict[str, set[int]] = {}
    by_char = {c["letter"]: c for c in r.record.meta.get("candidates", [])}
    for letter in by_char:
        ids = set()
        for variant in (letter, " " + letter):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if enc:
                ids.add(int(enc[0]))
        out[letter] = ids
    for site in r.keys:  # in-context letter token
        if site.label in out:
            out[site.label].add(int(r.input_ids[site.first]))
    return out


def _pad_left(batch: Sequence[ResolvedRecord], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
        mask[b, width - len(r.input_ids) :] = 1
    return ids, mask


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[ResolvedRecord],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token score over the candidate letters of order-design records.

    A letter's score is the max logit over its answer tokens (see ``_letter_token_sets``);
    a record is correct when the answer letter has the highest score. Returns ``accuracy``,
    ``chance`` (1 / n_pairs), ``per_position`` accuracy, ``predicted_position`` counts,
    ``p_answer`` (mean softmax probability of the answer among the candidates), ``n``.
    """
    from ..models.capture import padded_forward

    recs = [r for r in resolved if r.record.meta.get("answer_letter") is not None]
    if not recs:
        raise ValueError("task_accuracy: no record has an answer letter")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    correct, p_ans = [], []
    per_pos: dict[int, list[int]] = {}
    pred_pos: dict[int, int] = {}
    starts = range(0, len(recs), batch_size)
    for start in tqdm(starts, desc="accuracy", unit="batch", disable=not progress):
        batch = recs[start : start + batch_size]
        ids, mask = _pad_left(batch, pad)
        with torch.no_grad():
            logits = (
                padded_forward(model, ids.to(device), mask.to(device), logits_to_keep=1)
                .logits[:, -1]
                .double()
                .cpu()
            )  # [B, V]
        for b, r in enumerate(batch):
            letters = r.record.meta["letters"]
            sets = _letter_token_sets(tokenizer, r)
            scores = torch.tensor([max(float(logits[b, t]) for t in sets[l]) for l in letters])
            ans = letters.index(r.record.meta["answer_letter"])
            pred = int(scores.argmax())
            correct.append(int(pred == ans))
            p_ans.append(float(torch.softmax(scores, 0)[ans]))
            per_pos.setdefault(ans, []).append(int(pred == ans))
            pred_pos[pred] = pred_pos.get(pred, 0) + 1
    n_pairs = len(recs[0].record.meta["letters"])
    return {
        "accuracy": sum(correct) / len(correct),
        "chance": 1.0 / n_pairs,
        "p_answer": sum(p_ans) / len(p_ans),
        "per_position": {str(p): sum(v) / len(v) for p, v in sorted(per_pos.items())},
        "predicted_position": {str(p): c for p, c in sorted(pred_pos.items())},
        "n": len(correct),
    }


def accuracy_sweep(
    model_name: str = DEFAULT_MODEL,
    *,
    pairs: Sequence[int] = (2, 3, 4, 5),
    chats: Sequence[bool] = (False, True),
    n: int = 40,
    seed: int = 0,
    batch_size: int = 8,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Task accuracy for each (n_pairs, chat) on ``n`` order-design prompts (one row each)."""
    model, tokenizer = loaded if loaded is not None else _load(model_name)
    rows = []
    for chat in chats:
        if chat and not getattr(tokenizer, "chat_template", None):
            continue
        for k in pairs:
            tc = BindingTaskConfig(
                n_pairs=k, design="order", chat=chat, seed=seed, n_build=max(n, k), n_heldout=0
            )
            recs, _ = build_binding_records(tc)
            res = resolve_records(tokenizer, recs, chat=chat)
            acc = task_accuracy(model, tokenizer, res, batch_size=batch_size, progress=progress)
            rows.append({"n_pairs": k, "chat": chat, **acc})
    return rows


def _load(name: str) -> tuple[torch.nn.Module, Any]:
    lm = load_model(name)
    return lm.model, lm.tokenizer


# ------------------------------------------------------------------ attribution
def explain_logits(
    queries: torch.Tensor,
    keys: Sequence[torch.Tensor],
    bases: Mapping[str, torch.Tensor],
    *,
    priority: Sequence[str] | None = None,
    scaling: float = 1.0,
) -> dict[str, Any]:
    """Exact attribution of each prompt's logits over all its key positions.

    Args:
        queries: ``[n, D]`` one query per prompt.
        keys: n tensors ``[S_i, D]`` (every key position of prompt i).
        bases: name → query-side basis ``[D, r]``; later names (by ``priority``) are
            orthogonalised against earlier ones; the residual is added as the last part.

    Returns ``explained_fraction`` (mean over prompts of ``1 − ‖resid‖²/‖total‖²``),
    ``explained_fraction_centred`` (the same after subtracting each part's mean over keys,
    which softmax ignores; the uncentred number is dominated by the shared offset),
    ``per_prompt`` fractions, ``share`` per part (mean ``⟨part, total⟩/‖total‖²``; the
    shares sum to 1), ``norm_fraction`` per part (mean ``‖part‖²/‖total‖²``),
    ``max_abs_error`` (max |Σ parts − total|), ``names`` and the per-prompt
    :class:`~qkcov.core.attribution.Attribution` objects under ``"attributions"``.
    """
    if queries.ndim != 2:
        raise ValueError(f"queries must be [n, D], got {list(queries.shape)}")
    n, d = queries.shape
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} key sets for {n} queries")
    for name, b in bases.items():
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[0] != d:
            shape = list(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"basis {name!r} must be [D={d}, r] (query head dim), got {shape}")
    for i, k in enumerate(keys):
        if k.ndim != 2 or k.shape[1] != d:
            raise ValueError(f"keys of prompt {i} must be [S, D={d}], got {list(k.shape)}")
    atts, fracs, centred, err = [], [], [], 0.0
    shares: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    for i in range(n):
        a = attribute(queries[i], keys[i], dict(bases), priority=priority, scaling=scaling)
        atts.append(a)
        fracs.append(a.explained_fraction())
        err = max(err, float((a.parts.sum(0) - a.total).abs().max()))
        tot2 = float((a.total**2).sum())
        # softmax ignores a shift shared by all keys: also score the centred logits
        pc, tc = a.parts - a.parts.mean(-1, keepdim=True), a.total - a.total.mean()
        centred.append(1.0 - float((pc[-1] ** 2).sum() / (tc**2).sum()))
        shares.append((a.parts * a.total).sum(-1) / tot2)
        norms.append((a.parts**2).sum(-1) / tot2)
    names = atts[0].names
    mean = lambda xs: torch.stack(xs).mean(0).tolist()  # noqa: E731
    return {
        "names": names,
        "explained_fraction": sum(fracs) / n,
        "per_prompt": fracs,
        "explained_fraction_centred": sum(centred) / n,
        "share": dict(zip(names, mean(shares), strict=True)),
        "norm_fraction": dict(zip(names, mean(norms), strict=True)),
        "max_abs_error": err,
        "attributions": atts,
    }


def _full_keys(
    model: torch.nn.Module,
    resolved: Sequence[ResolvedRecord],
    heads: Sequence[Head],
    pad_id: int,
    batch_size: int,
    progress: bool,
) -> dict[Head, dict[str, Any]]:
    """Each prompt's query and *all* its keys for ``heads``.

    Returns per head ``q [n, D]``, ``keys`` (list of ``[S_i, D]``) and ``scaling``.
    """
    layers = sorted({h[0] for h in heads})
    head_ids = sorted({h[1] for h in heads})
    out: dict[Head, dict[str, Any]] = {h: {"q": [], "keys": [], "scaling": None} for h in heads}
    starts = range(0, len(resolved), batch_size)
    for start in tqdm(starts, desc="attribution keys", unit="batch", disable=not progress):
        batch = list(resolved[start : start + batch_size])
        ids, mask = _pad_left(batch, pad_id)
        sites = QKSites([[r.query] for r in batch], [list(range(r.query + 1)) for r in batch])
        caps = capture_qk(model, ids, mask, sites, layers, head_ids)
        for layer, head in heads:
            cap = caps[layer]
            j = cap.heads.index(head)
            kex = cap.k_index[:, 0].cpu()
            for b in range(len(batch)):
                out[(layer, head)]["q"].append(cap.q[b, j].double().cpu())
                out[(layer, head)]["keys"].append(cap.k[kex == b, j].double().cpu())
            out[(layer, head)]["scaling"] = cap.scaling
    for h in heads:
        out[h]["q"] = torch.stack(out[h]["q"])
    return out


# ------------------------------------------------------------------ helpers
def _angles(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    if a.shape[1] == 0 or b.shape[1] == 0:
        return []
    return [float(x) for x in principal_angles(a, b)]


def _degrees(rad: Sequence[float]) -> list[float]:
    return [float(x) * 180.0 / torch.pi for x in rad]


def _proj_coords(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """First ``_N_PROJ`` coordinates of ``x`` in ``basis`` (zero-padded), float32."""
    c = project(x, basis[:, :_N_PROJ]) if basis.shape[1] else torch.zeros(x.shape[0], 0)
    out = torch.zeros(x.shape[0], _N_PROJ, dtype=torch.float32)
    out[:, : c.shape[1]] = c.float()
    return out


def _split_half(n: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    return idx[0::2], idx[1::2]


def _ncc(x: torch.Tensor, labels: Sequence[Any]) -> float | None:
    """Nearest-centroid accuracy on alternate rows (train even, test odd)."""
    tr, te = _split_half(len(labels))
    if not te or len({labels[i] for i in tr}) < 2:
        return None
    return nearest_centroid_accuracy(x[tr], [labels[i] for i in tr], x[te], [labels[i] for i in te])


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[binding] {msg}", flush=True)


# ------------------------------------------------------------------ main
def run_binding(
    cfg: BindingConfig,
    out_dir: str | Path,
    *,
    loaded: tuple[torch.nn.Module, Any] | None = None,
    progress: bool = True,
    figures: bool = True,
    sweep: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run the binding experiment and write its artifacts into ``out_dir``.

    Args:
        cfg: the experiment settings.
        loaded: ``(model, tokenizer)`` to use instead of loading ``cfg.model``.
        figures: draw the figures and write ``section.json``.
        sweep: also measure task accuracy for these n_pairs (plain and chat) on 40 prompts.

    Returns the content of ``binding.json``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recs = build_records(cfg)  # before loading the model: bad objects fail fast
    model, tokenizer = loaded if loaded is not None else _load(cfg.model)
    if cfg.chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat: the tokenizer of {cfg.model!r} has no chat template")
    info = model_info(model)
    D = info.head_dim
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kw = {"batch_size": cfg.batch_size, "progress": progress}
    res_ob = resolve_records(tokenizer, recs.order_build, chat=cfg.chat)
    res_oh = resolve_records(tokenizer, recs.order_heldout, chat=cfg.chat)
    res_lb = resolve_records(tokenizer, recs.lexical_build, chat=cfg.chat)
    timings: dict[str, float] = {}

    def lap(name: str, t: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        return now

    t = time.perf_counter()
    _log(progress, f"task accuracy on {len(res_oh)} held-out prompts")
    accuracy = task_accuracy(model, tokenizer, res_oh, **kw)
    t = lap("accuracy", t)
    sweep_rows = None
    if sweep:
        sweep_rows = accuracy_sweep(
            cfg.model, pairs=sweep, n=40, seed=cfg.seed, loaded=(model, tokenizer), **kw
        )
        t = lap("sweep", t)

    _log(progress, "head scan (order design, held-out prompts)")
    rows = attention_rows(model, tokenizer, res_oh, **kw)  # [n, L, H, S]
    scan = scan_heads(rows, res_oh, n_boot=cfg.n_boot, seed=cfg.seed)
    spec = f"auto:{cfg.n_heads}" if cfg.heads.strip().lower() == "auto" else cfg.heads
    heads = select_heads(spec, scan, info.n_layers, info.n_heads, k=cfg.n_heads)
    t = lap("scan", t)

    _log(progress, f"ΔC for heads {[format_head(*h) for h in heads]}")
    order_c = run_contrast(model, tokenizer, res_ob, heads, **kw)
    lex_c = run_contrast(model, tokenizer, res_lb, heads, **kw)
    t = lap("contrast", t)
    full = _full_keys(model, res_oh, heads, pad, cfg.batch_size, progress)
    t = lap("collect", t)

    tensors: dict[str, torch.Tensor] = {}
    scan_by_name = {r["name"]: r for r in scan}
    key_pos = [r.record.meta["letters"].index(k.label) for r in res_oh for k in r.keys]
    key_obj = [
        r.record.meta["objects"][r.record.meta["letters"].index(k.label)]
        for r in res_oh
        for k in r.keys
    ]
    q_pos = [int(r.record.meta["answer_index"]) for r in res_oh]
    q_obj = [r.record.meta["queried_object"] for r in res_oh]
    head_results = []
    for layer, head in heads:
        name = format_head(layer, head)
        sub_o = order_c.subspaces((layer, head), cfg.energy)["pooled"]
        sub_l = lex_c.subspaces((layer, head), cfg.energy)["pooled"]
        Vo, Vl = sub_o.key_basis, sub_l.key_basis
        Uo, Ul = sub_o.query_basis, sub_l.query_basis
        both = union_basis([Vo, Vl])
        p = f"{name}."
        tensors.update(
            {
                p + "order.delta": order_c.delta((layer, head)).float(),
                p + "lexical.delta": lex_c.delta((layer, head)).float(),
                p + "order.singular_values": sub_o.singular_values.float(),
                p + "lexical.singular_values": sub_l.singular_values.float(),
                p + "order.query_basis": Uo.float(),
                p + "order.key_basis": Vo.float(),
                p + "lexical.query_basis": Ul.float(),
                p + "lexical.key_basis": Vl.float(),
                p + "both.key_basis": both.float(),
            }
        )
        # Fig. 8: held-out order-design keys / queries in each subspace.
        fk = full[(layer, head)]
        site_keys = torch.cat(
            [k[r.key_positions] for k, r in zip(fk["keys"], res_oh, strict=True)]
        )  # [m, D], key sites in record order (as collect_qk)
        proj = {
            "order": (_proj_coords(site_keys, Vo), _proj_coords(fk["q"], Uo)),
            "lexical": (_proj_coords(site_keys, Vl), _proj_coords(fk["q"], Ul)),
        }
        for sname, (pk, pq) in proj.items():
            tensors[p + f"proj.{sname}.keys"] = pk
            tensors[p + f"proj.{sname}.queries"] = pq
        decode = {
            "position_in_order_subspace": _ncc(project(site_keys, Vo), key_pos),
            "position_in_random_subspace": _ncc(
                project(site_keys, random_orthonormal(D, max(Vo.shape[1], 1), seed=cfg.seed)),
                key_pos,
            ),
            "object_in_lexical_subspace": _ncc(project(site_keys, Vl), key_obj),
            "object_in_random_subspace": _ncc(
                project(site_keys, random_orthonormal(D, max(Vl.shape[1], 1), seed=cfg.seed + 1)),
                key_obj,
            ),
        }

        # Fig. 9: in-forward swaps of the answer key with another letter's key.
        _log(progress, f"{name}: swaps (order rank {Vo.shape[1]}, lexical rank {Vl.shape[1]})")
        pairs = swap_pairs(res_oh, rows[:, layer, head], seed=cfg.seed)
        if cfg.n_swap:
            pairs = [pr if i < cfg.n_swap else None for i, pr in enumerate(pairs)]
        bases = {"order": Vo, "lexical": Vl, "both": both}
        bases = {k: v for k, v in bases.items() if v.shape[1] > 0}
        sw = run_swaps(
            model, tokenizer, res_oh, layer, head, pairs, bases,
            n_random=cfg.n_random, seed=cfg.seed, batch_size=cfg.batch_size, progress=progress,
        )  # fmt: skip
        t = lap(f"swaps {name}", t)

        # Fig. 10: exact attribution of the logits over all key positions.
        qb = {"order": Uo, "lexical": Ul}
        ex = explain_logits(
            fk["q"], fk["keys"], qb, priority=cfg.priority_order(), scaling=fk["scaling"]
        )
        ex_letters = _letter_fraction(ex["attributions"], res_oh)
        rand_fracs, rand_centred = [], []
        for d in range(cfg.n_random):
            rb = {
                "order": random_orthonormal(D, max(Uo.shape[1], 1), seed=cfg.seed * 1000 + 2 * d),
                "lexical": random_orthonormal(
                    D, max(Ul.shape[1], 1), seed=cfg.seed * 1000 + 2 * d + 1
                ),
            }
            rex = explain_logits(
                fk["q"], fk["keys"], rb, priority=cfg.priority_order(), scaling=fk["scaling"]
            )
            rand_fracs.append(rex["explained_fraction"])
            rand_centred.append(rex["explained_fraction_centred"])
        rf = torch.tensor(rand_fracs, dtype=torch.float64)
        rc = torch.tensor(rand_centred, dtype=torch.float64)
        parity = _attention_parity(ex["attributions"], rows[:, layer, head])
        a0 = ex["attributions"][0]
        tensors[p + "attribution.parts"] = a0.parts.float()  # [3, S]
        tensors[p + "attribution.total"] = a0.total.float()  # [S]
        t = lap(f"attribution {name}", t)

        head_results.append(
            {
                "layer": layer,
                "head": head,
                "name": name,
                "scan": scan_by_name.get(name),
                "rank_order": sub_o.rank,
                "rank_lexical": sub_l.rank,
                "rank_both": int(both.shape[1]),
                "principal_angles": _degrees(_angles(Vo, Vl)),
                "principal_angles_query": _degrees(_angles(Uo, Ul)),
                "decoding": decode,
                "swap": {k: metric_summary(v) for k, v in sw["conditions"].items()},
                "random": {k: random_summary(v) for k, v in sw["random"].items()},
                "ceiling": metric_summary(sw["ceiling"]),
                "null": metric_summary(sw["null"]),
                "swap_n": sw["n"],
                "swap_attention": {
                    k: {m: float(v[m]) for m in v if m.startswith("attn_")}
                    for k, v in [*sw["conditions"].items(), ("ceiling", sw["ceiling"])]
                },
                "explained_fraction": ex["explained_fraction"],
                "explained_fraction_letters": ex_letters,
                "explained_fraction_centred": ex["explained_fraction_centred"],
                "explained_fraction_centred_random": {
                    "mean": float(rc.mean()),
                    "std": float(rc.std()),
                },
                "explained_fraction_random": {
                    "mean": float(rf.mean()),
                    "std": float(rf.std()),
                },
                "part_share": ex["share"],
                "part_norm_fraction": ex["norm_fraction"],
                "attribution_max_abs_error": ex["max_abs_error"],
                "attribution_attention_parity": parity,
            }
        )

    example = res_oh[0]
    result = {
        "config": cfg.to_dict(),
        "model": {
            "name": cfg.model,
            "architecture": info.architecture,
            "n_layers": info.n_layers,
            "n_heads": info.n_heads,
            "n_kv_heads": info.n_kv_heads,
            "head_dim": D,
        },
        "n_records": {
            "order_build": len(res_ob),
            "order_heldout": len(res_oh),
            "lexical_build": len(res_lb),
        },
        "accuracy": accuracy,
        "accuracy_sweep": sweep_rows,
        "scan": scan,
        "heads": head_results,
        "attribution_priority": cfg.priority_order(),
        "example": {
            "prompt": example.record.prompt,
            "text": example.text,
            "tokens": [tokenizer.decode([i]) for i in example.input_ids[: example.query + 1]],
            "letter_positions": example.key_positions,
            "answer_position": example.positives[0],
            "query": example.query,
        },
        "projection_labels": {
            "key_position": key_pos,
            "key_object": key_obj,
            "query_position": q_pos,
            "query_object": q_obj,
        },
        "timings": timings,
    }
    timings["total"] = round(time.perf_counter() - t0, 2)
    save_tensors(out / "binding.safetensors", tensors, {"heads": [h["name"] for h in head_results]})
    write_json(out / "binding.json", result)
    if figures:
        from ..report.figures.binding import plot_all

        figs, inter = plot_all(out)
        _write_section(out, result, figs, inter)
    _log(progress, f"done in {timings['total']:.0f}s -> {out}")
    return result


def _letter_fraction(atts: Sequence[Any], resolved: Sequence[ResolvedRecord]) -> float:
    """Explained fraction restricted to the candidate-letter logits (mean over prompts)."""
    fr = []
    for a, r in zip(atts, resolved, strict=True):
        pos = torch.tensor(r.key_positions)
        tot = a.total[pos].double()
        res = a.residual[pos].double()
        fr.append(1.0 - float((res**2).sum() / (tot**2).sum()))
    return sum(fr) / len(fr)


def _attention_parity(atts: Sequence[Any], rows: torch.Tensor) -> float:
    """Max |softmax(Σ parts) − the model's attention row| over prompts (no softcap/window)."""
    err = 0.0
    for i, a in enumerate(atts):
        s = a.total.shape[-1]
        err = max(
            err, float((torch.softmax(a.parts.sum(0), -1) - rows[i, :s].double()).abs().max())
        )
    return err


def _fmt_head_row(h: Mapping[str, Any]) -> list[Any]:
    o, r = h["swap"].get("order", {}), h["random"].get("order", {})
    return [
        h["name"],
        h["rank_order"],
        h["rank_lexical"],
        round(min(h["principal_angles"]), 1) if h["principal_angles"] else None,
        round(o.get("delta_p", float("nan")), 3),
        round(r.get("delta_p", {}).get("mean", float("nan")), 3),
        round(h["swap"].get("lexical", {}).get("delta_p", float("nan")), 3),
        round(h["swap"].get("both", {}).get("delta_p", float("nan")), 3),
        round(h["ceiling"]["delta_p"], 3),
        round(h["explained_fraction"], 3),
        round(h["explained_fraction_random"]["mean"], 3),
        round(h["explained_fraction_centred"], 3),
        round(h["explained_fraction_centred_random"]["mean"], 3),
    ]


def _write_section(
    out: Path,
    result: Mapping[str, Any],
    figs: Sequence[Mapping[str, str]],
    inter: Sequence[Mapping[str, str]],
) -> None:
    from ..report import write_section

    acc = result["accuracy"]
    cfg = result["config"]
    near = acc["accuracy"] < acc["chance"] + 0.1
    text = [
        f"Model {result['model']['name']}, {cfg['n_pairs']} pairs, "
        f"{'chat template' if cfg['chat'] else 'plain prompt'}. Task accuracy (argmax of the "
        f"next-token score over the candidate letters) on {acc['n']} held-out prompts: "
        f"{acc['accuracy']:.2f} (chance {acc['chance']:.2f})"
        + (
            " — near chance: the model does not solve the task, so the heads below are "
            "studied as the model's attention mechanism, not as a solved binding circuit."
            if near
            else "."
        ),
        "Heads were picked by the head scan (attention from the question's last token to the "
        "answer letter minus the other letters, order design). Order ΔC: positive = answer "
        "letter, negatives = the other letters; lexical ΔC: the same letter when the queried "
        "object is bound to it vs absent (counterfactual prompt).",
        "Swaps exchange the answer letter's key with another letter's key inside the subspace "
        "in the forward pass; delta_p is the change of a_tgt / (a_orig + a_tgt). Random = "
        f"{cfg['n_random']} random subspaces of equal rank; ceiling = full-key swap.",
        "Attribution splits the query into its order part, its lexical part (orthogonalised "
        f"against {result['attribution_priority'][0]}) and the residual; the parts sum exactly to "
        "the logits. The explained fraction is 1 − ‖resid‖²/‖total‖² over all key positions, "
        "next to random subspaces of the same ranks; 'centred' first removes each part's mean "
        "over the keys (softmax ignores it), since the shared offset — which the uncentred ΔC's "
        "top query direction (the mean query) captures — otherwise dominates the number.",
    ]
    columns = [
        "head", "rank order", "rank lexical", "min angle (deg)", "order Δp", "random Δp",
        "lexical Δp", "both Δp", "ceiling Δp", "explained", "explained (random)", "explained centred", "centred (random)",
    ]  # fmt: skip
    tables = [
        {
            "caption": "Per head: ranks, smallest principal angle between the order and lexical "
            "key subspaces, swap Δp, and explained fraction of the logits.",
            "columns": columns,
            "rows": [_fmt_head_row(h) for h in result["heads"]],
        }
    ]
    if result.get("accuracy_sweep"):
        tables.append(
            {
                "caption": "Task accuracy by number of pairs and prompt format.",
                "columns": ["n_pairs", "chat", "accuracy", "chance", "p(answer)"],
                "rows": [
                    [
                        r["n_pairs"],
                        r["chat"],
                        round(r["accuracy"], 3),
                        round(r["chance"], 3),
                        round(r["p_answer"], 3),
                    ]
                    for r in result["accuracy_sweep"]
                ],
            }
        )
    best = result["heads"][0]
    summary = {
        "model": result["model"]["name"],
        "accuracy": round(acc["accuracy"], 3),
        "chance": round(acc["chance"], 3),
        "best_head": best["name"],
        "order_delta_p": round(best["swap"].get("order", {}).get("delta_p", float("nan")), 3),
        "random_delta_p": round(
            best["random"].get("order", {}).get("delta_p", {}).get("mean", float("nan")), 3
        ),
        "explained_fraction": round(best["explained_fraction"], 3),
    }
    write_section(
        out,
        key="binding",
        title="Binding features: order-ID and lexical subspaces",
        order=30,
        summary=summary,
        text=text,
        tables=tables,
        figures=figs,
        interactive=inter,
    )


def run_binding_demo(
    out_dir: str | Path, model: str = DEFAULT_MODEL, *, progress: bool = True
) -> dict[str, Any]:
    """The demo's binding section with :data:`DEMO_CONFIG`; returns a short summary."""
    cfg = BindingConfig(model=model, **DEMO_CONFIG)
    result = run_binding(cfg, out_dir, progress=progress)
    best = result["heads"][0]
    return {
        "accuracy": round(result["accuracy"]["accuracy"], 3),
        "chance": round(result["accuracy"]["chance"], 3),
        "heads": [h["name"] for h in result["heads"]],
        "order_delta_p": round(best["swap"].get("order", {}).get("delta_p", float("nan")), 3),
        "random_delta_p": round(
            best["random"].get("order", {}).get("delta_p", {}).get("mean", float("nan")), 3
        ),
        "explained_fraction": round(best["explained_fraction"], 3),
        "seconds": result["timings"]["total"],
    }
