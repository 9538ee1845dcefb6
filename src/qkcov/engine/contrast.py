"""Contrast records → token positions → ΔC per head and group (METHOD §2, §4).

The generic runner every LLM experiment shares: :func:`resolve_records` maps each record's
character spans to token positions of its (optionally chat-templated) prompt,
:func:`run_contrast` streams the records through the capture engine and accumulates one
:class:`~qkcov.core.covariance.ContrastiveCovariance` per head inside the forward pass, and
:func:`collect_qk` keeps the (few) query/key vectors needed for projections and figures.

Per record, the query vector is paired with the *mean* of its positive keys and the mean of
its negative keys (``q k̄ᵀ`` = mean of ``q k_iᵀ``, the outer product being linear in k), so
every record weighs the same whatever its number of items. A record with only one side
(e.g. the lexical binding design) adds only that side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import load_tensors, read_tensor_metadata, save_tensors
from ..core.covariance import ContrastiveCovariance
from ..core.subspace import FeatureSubspace, feature_subspace
from ..models.capture import CapturedQK, QKSites, capture_prompts
from ..models.heads import format_head
from ..models.loading import format_prompt, model_info
from ..models.positions import encode, token_at_char
from ..models.rotary import rotary_specs, to_query_frame
from ..tasks.records import ContrastRecord, Span
from .checkpoint import Checkpoint, data_hash
from .distributed import Dist, all_reduce_sum, gather_objects, shard_batches

__all__ = [
    "KeySite",
    "ResolvedRecord",
    "resolve_records",
    "check_lengths",
    "ContrastResult",
    "run_contrast",
    "HeadVectors",
    "KnownVectors",
    "collect_qk",
    "collect_full_keys",
    "POOLED",
]

POOLED = "pooled"
Head = tuple[int, int]


# --------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class KeySite:
    """One key of a record: ``pos`` is the token used as the key (span's last token by
    default); ``first`` the span's first token (its id is the item's answer token)."""

    pos: int
    first: int
    positive: bool
    label: str | None = None


@dataclass
class ResolvedRecord:
    """A record with token positions in its formatted prompt (unpadded coordinates)."""

    index: int
    record: ContrastRecord
    text: str
    input_ids: list[int]
    query: int
    keys: list[KeySite]
    answer_id: int | None = None  # first token of the record's ``answer`` after the prompt

    @property
    def positives(self) -> list[int]:
        return [k.pos for k in self.keys if k.positive]

    @property
    def negatives(self) -> list[int]:
        return [k.pos for k in self.keys if not k.positive]

    @property
    def key_positions(self) -> list[int]:
        return [k.pos for k in self.keys]

    def answer_token(self, pos: int) -> int:
        """Token id of the first token of the key span whose key position is ``pos``."""
        for k in self.keys:
            if k.pos == pos:
                return self.input_ids[k.first]
        raise ValueError(f"record {self.index}: no key at position {pos}")


def _token_range(offsets: list[tuple[int, int]], c0: int, c1: int, where: str) -> tuple[int, int]:
    """First token covering character ``c0``, last token covering ``c1 - 1`` (a character may
    span several byte tokens)."""
    try:
        return token_at_char(offsets, c0, "first"), token_at_char(offsets, c1 - 1, "last")
    except ValueError as err:
        raise ValueError(
            f"{where}: characters [{c0}, {c1}) are not covered by tokens ({err})"
        ) from None


def _site(
    offsets: list[tuple[int, int]], offset: int, span: Span, positive: bool, where: str
) -> KeySite:
    """Token positions of a character span shifted by ``offset`` into the formatted text."""
    first, last = _token_range(offsets, offset + span.start, offset + span.end, where)
    return KeySite(last if span.token == "last" else first, first, positive, span.label)


def _where(index: int, record: ContrastRecord) -> str:
    line = getattr(record, "line", None)
    return f"record {index}" + (f" (line {line})" if line is not None else "")


def check_lengths(
    resolved: Sequence[ResolvedRecord], limit: int, *, flag: str = "--max-tokens"
) -> None:
    """``ValueError`` naming the first record (and its JSONL line) whose formatted prompt has
    more than ``limit`` tokens (e.g. the model's :func:`~qkcov.models.loading.max_positions`)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"{flag} must be a positive integer, got {limit!r}")
    for r in resolved:
        if len(r.input_ids) > limit:
            raise ValueError(
                f"{_where(r.index, r.record)}: the prompt has {len(r.input_ids)} tokens, more "
                f"than {flag} {limit}; shorten it or raise {flag}"
            )


_USER_MARK = "qkcovUserMessage7f3a9c"


def _user_offset(tokenizer: Any, msgs: list[dict[str, str]], text: str, prompt: str) -> int:
    """Where the user message's text starts in the templated ``text`` (-1 if it is not
    there verbatim): the template rendered with a marker as the user message gives the text
    before it, so a system message (or the template's default one) repeating the prompt is
    never taken for it; templates whose framing depends on the content fall back to the last
    occurrence (the user message comes after the system message)."""
    marked = format_prompt(tokenizer, [*msgs[:-1], {"role": "user", "content": _USER_MARK}])
    at = marked.find(_USER_MARK)
    if at >= 0 and text.startswith(marked[:at]) and text[at : at + len(prompt)] == prompt:
        return at
    return text.rfind(prompt)


def resolve_records(
    tokenizer: Any, records: Sequence[ContrastRecord], *, chat: bool = False
) -> list[ResolvedRecord]:
    """Token positions of every record's query and key spans.

    With ``chat=True`` the prompt becomes the user message (``record.system`` the system
    message) of the tokenizer's chat template; spans are shifted to where the prompt text
    sits inside the templated string. ``query=None`` is the last token of the formatted text.
    """
    if not records:
        raise ValueError("resolve_records: no records given")
    out: list[ResolvedRecord] = []
    for i, rec in enumerate(records):
        where = _where(i, rec)
        if chat:
            msgs = ([{"role": "system", "content": rec.system}] if rec.system else []) + [
                {"role": "user", "content": rec.prompt}
            ]
            text = format_prompt(tokenizer, msgs, chat=True)
            offset = _user_offset(tokenizer, msgs, text, rec.prompt)
            if offset < 0:
                raise ValueError(
                    f"{where}: the chat template changed the prompt text; cannot map spans"
                )
        else:
            text, offset = rec.prompt, 0
        ids, offsets = encode(tokenizer, text)
        if not ids:
            raise ValueError(f"{where}: prompt encodes to zero tokens")

        named = [(f"positives[{j}]", s, True) for j, s in enumerate(rec.positives)]
        named += [(f"negatives[{j}]", s, False) for j, s in enumerate(rec.negatives)]
        keys = [_site(offsets, offset, s, pos, f"{where} {name}") for name, s, pos in named]
        query = (
            len(ids) - 1
            if rec.query is None
            else _site(offsets, offset, rec.query, True, f"{where} query").pos
        )
        positions = [k.pos for k in keys]
        seen: dict[int, int] = {}
        for j, p in enumerate(positions):
            if p in seen:
                (n0, s0, _), (n1, s1, _) = named[seen[p]], named[j]
                raise ValueError(
                    f"{where}: {n0} [{s0.start}, {s0.end}) {rec.span_text(s0)!r} and {n1} "
                    f"[{s1.start}, {s1.end}) {rec.span_text(s1)!r} resolve to the same token "
                    f"{p} ({ids[p]}); use spans that end in different tokens"
                )
            seen[p] = j
        if any(p > query for p in positions):
            raise ValueError(
                f"{where}: a key comes after the query token {query}; causal attention cannot see it"
            )
        answer_id = None if rec.answer is None else _answer_token(tokenizer, text, ids, rec.answer)
        out.append(ResolvedRecord(i, rec, text, ids, query, keys, answer_id))
    return out


def _answer_token(tokenizer: Any, text: str, ids: list[int], answer: str) -> int:
    """First token of ``answer`` as it continues ``text``: the token after the prompt's in
    ``encode(text + answer)`` when that keeps the prompt's tokens, else the first token of
    ``answer`` encoded alone (without special tokens)."""
    joined, _ = encode(tokenizer, text + answer)
    if len(joined) > len(ids) and joined[: len(ids)] == ids:
        return joined[len(ids)]
    alone, _ = encode(tokenizer, answer, add_special_tokens=False)
    return alone[0] if alone else joined[-1]


def _groups_of(resolved: Sequence[ResolvedRecord]) -> list[str]:
    names = sorted({r.record.group for r in resolved if r.record.group is not None})
    return names or ["all"]


def _layer_heads(heads: Sequence[Head]) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, [])
        if head not in by_layer[layer]:
            by_layer[layer].append(head)
    return by_layer


# --------------------------------------------------------------------------- ΔC runner
@dataclass
class ContrastResult:
    """One accumulator per studied head, groups = the records' group labels."""

    heads: list[Head]
    groups: list[str]
    accumulators: dict[Head, ContrastiveCovariance]
    meta: dict[str, Any] = field(default_factory=dict)
    # per head: each record's query and mean positive / negative key (``keep_records=True``),
    # what the permutation null and the bootstrap resample without recapturing
    record_stats: dict[Head, Any] | None = None
    # per head: the :class:`HeadVectors` of the records asked for (``vectors_for``), from the
    # same forward; ``None`` when not asked or when the pass resumed from a checkpoint
    vectors: dict[Head, HeadVectors] | None = None

    def delta(self, head: Head, group: str | None = None) -> torch.Tensor:
        """ΔC ``[D, D]`` of one head for ``group`` (``None`` or ``"pooled"`` pools all groups)."""
        acc = self._acc(head)
        return acc.delta(None if group in (None, POOLED) else group)

    def _acc(self, head: Head) -> ContrastiveCovariance:
        head = (int(head[0]), int(head[1]))
        if head not in self.accumulators:
            have = ", ".join(format_head(*h) for h in self.heads)
            raise ValueError(f"head {format_head(*head)} was not accumulated; have {have}")
        return self.accumulators[head]

    def subspaces(self, head: Head, energy: float = 0.99) -> dict[str, FeatureSubspace]:
        """Feature subspace of every group with both sides counted, plus ``"pooled"``."""
        acc = self._acc(head)
        out = {}
        for g in self.groups:
            n_pos, n_neg = acc.counts(g)
            if n_pos and n_neg:
                out[g] = feature_subspace(acc.delta(g), energy)
        out[POOLED] = feature_subspace(acc.delta(None), energy)
        return out

    def save(self, path: str | Path) -> Path:
        tensors: dict[str, torch.Tensor] = {}
        for h, acc in self.accumulators.items():
            state = acc.state_dict()
            state.pop("config")
            tensors.update({f"{format_head(*h)}.{k}": v for k, v in state.items()})
        meta = {"heads": self.heads, "groups": self.groups, "meta": self.meta}
        meta["dims"] = {format_head(*h): [a.d_q, a.d_k] for h, a in self.accumulators.items()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> ContrastResult:
        tensors, meta = load_tensors(path), read_tensor_metadata(path)
        heads = [tuple(h) for h in meta["heads"]]
        accs = {}
        for h in heads:
            name = format_head(*h)
            d_q, d_k = meta["dims"][name]
            prefix = f"{name}."
            state: dict[str, Any] = {
                k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)
            }
            state["config"] = {"d_q": d_q, "d_k": d_k, "groups": meta["groups"], "center": False}
            accs[h] = ContrastiveCovariance.from_state_dict(state)
        return cls(heads, list(meta["groups"]), accs, meta.get("meta", {}))


def run_contrast(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[ResolvedRecord],
    heads: Sequence[Head],
    *,
    batch_size: int = 8,
    pre_rope: bool = False,
    center: bool = False,
    padding_side: str = "left",
    progress: bool = True,
    keep_records: bool = False,
    dist: Dist | None = None,
    checkpoint: Checkpoint | None = None,
    frame: str = "post",
    vectors_for: Sequence[int] = (),
    captured: Sequence[Mapping[int, CapturedQK]] | None = None,
) -> ContrastResult:
    """Accumulate ΔC for every head in ``heads`` over ``resolved`` records.

    Only each record's query row and key rows are gathered inside the attention hook and
    folded into the float64 accumulators there; nothing of size ``[B, H, S, D]`` is kept.
    ``keep_records=True`` also keeps, per head, each record's query and mean positive /
    negative key (:class:`~qkcov.core.statistics.RecordStats`, ``n·(3D+3)`` float64 values),
    checkpointed with the accumulators and gathered over ranks in record order.

    ``dist``: run this rank's whole batches (:func:`shard_batches`) and sum the float64
    accumulators over ranks; every rank returns the one-process result. ``checkpoint``: save
    this rank's accumulators every ``checkpoint.every`` batches and, with ``resume``, continue
    from the saved batch (the fingerprint gets the heads, batch size, padding, world size and
    a hash of the resolved records added). ``frame="query"``: every key in its query's rotary
    frame (:func:`qkcov.models.rotary.to_query_frame`; logits unchanged).
    ``vectors_for``: positions in ``resolved`` whose query and key vectors are also kept, as
    :func:`collect_qk` returns them for ``[resolved[i] for i in vectors_for]`` (the figures'
    centroid records: no second forward); ``result.vectors`` is ``None`` after a resume.
    ``captured``: this rank's batches already captured with every head of the needed layers
    (:class:`qkcov.engine.scan.ScanCapture`, the ``--heads auto`` pass): no forward; each
    batch's rows of ``heads`` are folded in as the forward would hand them over.
    """
    if not resolved:
        raise ValueError("run_contrast: no records")
    if not heads:
        raise ValueError("run_contrast: no heads to study")
    info = model_info(model)
    heads = [(int(layer), int(head)) for layer, head in heads]
    groups = _groups_of(resolved)
    group_index = {g: i for i, g in enumerate(groups)}
    by_layer = _layer_heads(heads)
    if pre_rope and frame == "query":
        raise ValueError("pre_rope=True and frame='query' both rotate q/k; pick one")
    specs = _frame_specs(model, frame, by_layer)
    accs = {
        h: ContrastiveCovariance(info.head_dim, info.head_dim, groups, center=center) for h in heads
    }

    texts = [r.text for r in resolved]
    sites = QKSites([[r.query] for r in resolved], [r.key_positions for r in resolved])
    # Static per-record layout of key rows: rows of record i are contiguous, in key order.
    n_keys = torch.tensor([len(r.keys) for r in resolved])
    pos_flag = torch.tensor([k.positive for r in resolved for k in r.keys], dtype=torch.bool)
    rec_of_row = torch.repeat_interleave(torch.arange(len(resolved)), n_keys)
    row_start = torch.cumsum(n_keys, 0) - n_keys
    rec_group = torch.tensor([group_index[r.record.group or "all"] for r in resolved])
    kept: dict[Head, list[tuple[torch.Tensor, ...]]] = {h: [] for h in heads}
    wanted = {int(i) for i in vectors_for}
    vec: dict[Head, list[tuple[torch.Tensor, ...]]] = {h: [] for h in heads}

    def on_capture(layer: int, cap: CapturedQK) -> None:
        if specs is not None:
            cap = to_query_frame(cap, specs[layer])
        # cap.q: [n_batch_records, H_layer, D]; cap.k: [n_batch_key_rows, H_layer, D]
        recs = cap.q_index[:, 0].cpu()  # global record indices of this batch
        first, last = int(row_start[recs[0]]), int(row_start[recs[-1]] + n_keys[recs[-1]])
        local_rec = rec_of_row[first:last] - recs[0]
        flags = pos_flag[first:last]
        nb = recs.numel()
        want = [b for b, r in enumerate(recs.tolist()) if r in wanted]
        for j, h in enumerate(cap.heads):
            if (layer, h) not in accs:
                continue
            if want:  # key rows of the wanted records, in record order
                rows = torch.cat([torch.arange(int(row_start[recs[b]]), int(row_start[recs[b]] + n_keys[recs[b]])) - first for b in want])  # fmt: skip
                vec[(layer, h)].append((recs[want], cap.q[want, j].float().cpu(),
                                        cap.k[rows, j].float().cpu()))  # fmt: skip
            q = cap.q[:, j].double().cpu()
            k = cap.k[:, j].double().cpu()
            means = {}
            for side, sel in (("pos", flags), ("neg", ~flags)):
                summed = torch.zeros(nb, k.shape[-1], dtype=torch.float64).index_add_(
                    0, local_rec[sel], k[sel]
                )
                count = torch.zeros(nb, dtype=torch.float64).index_add_(
                    0, local_rec[sel], torch.ones(int(sel.sum()), dtype=torch.float64)
                )
                means[side] = (summed / count.clamp_min(1)[:, None], count > 0)
            g = rec_group[recs]
            if keep_records:
                kept[(layer, h)].append((recs, q, *means["pos"], *means["neg"], g))
            for side in ("pos", "neg"):
                kbar, has = means[side]
                if has.any():
                    kw = (
                        {"k_pos": kbar[has], "k_neg": None}
                        if side == "pos"
                        else {"k_pos": None, "k_neg": kbar[has]}
                    )
                    accs[(layer, h)].update(q[has], group=g[has], **kw)

    batches = shard_batches(len(resolved), batch_size, dist)
    start = 0
    if checkpoint is not None:
        checkpoint = checkpoint.with_fields(
            engine="run_contrast",
            heads=heads,
            groups=groups,
            batch_size=batch_size,
            padding_side=padding_side,
            pre_rope=pre_rope,
            **({"frame": frame} if frame != "post" else {}),
            world_size=1 if dist is None else dist.world_size,
            records=_records_hash(resolved),
            model=asdict(info)
            | {
                "name": getattr(model.config, "_name_or_path", ""),
                "dtype": str(next(model.parameters()).dtype),
            },
        )
        saved = checkpoint.load(dist)
        if saved is not None:
            if saved.n_batches != len(batches) or not 0 <= saved.next_batch <= len(batches):
                raise ValueError(
                    f"--resume: checkpoint in {checkpoint.file(dist)} covers {saved.n_batches} "
                    f"batches (next {saved.next_batch}) but this rank has {len(batches)}"
                )
            _load_accumulators(accs, saved.tensors, checkpoint.file(dist))
            for h in heads:
                prefix = f"records.{format_head(*h)}."
                if keep_records and prefix + "0" in saved.tensors:
                    kept[h] = [tuple(saved.tensors[f"{prefix}{i}"] for i in range(7))]
                    kept[h] = [
                        (t[0].long(), t[1], t[2], t[3].bool(), t[4], t[5].bool(), t[6].long())
                        for t in kept[h]
                    ]
            start = saved.next_batch
    todo = batches[start:]

    def on_batch(i: int) -> None:
        done = start + i + 1
        if checkpoint is not None and checkpoint.due(done, len(batches)):
            tensors = _accumulator_tensors(accs)
            for h, parts in kept.items():
                if parts:
                    for i in range(7):
                        tensors[f"records.{format_head(*h)}.{i}"] = torch.cat(
                            [p[i] for p in parts]
                        ).double()
            checkpoint.save(tensors, done, len(batches), dist)

    if todo and captured is not None:
        if len(captured) != len(batches):
            raise ValueError(
                f"captured holds {len(captured)} batches, this rank has {len(batches)}"
            )
        head_list = sorted({h for _, h in heads})
        for i, caps in enumerate(captured[start:]):
            for layer in sorted(by_layer):
                on_capture(layer, caps[layer].select(head_list))
            on_batch(i)
    elif todo:
        capture_prompts(
            model,
            tokenizer,
            texts,
            sites,
            sorted(by_layer),
            sorted({h for _, h in heads}),
            batch_size=batch_size,
            padding_side=padding_side,
            pre_rope=pre_rope,
            on_capture=on_capture,
            progress=progress,
            batches=todo,
            on_batch=on_batch,
        )
    elif checkpoint is not None and not batches:
        on_batch(-1)  # this rank has no batch at all: still leave a (complete) checkpoint
    all_reduce_sum([t for acc in accs.values() for t in acc.sum_tensors().values()], dist)
    meta = {"n_records": len(resolved), "pre_rope": pre_rope, "center": center, "frame": frame}
    if start:
        meta["resumed_at_batch"] = start
    stats = _record_stats(kept, groups, dist) if keep_records else None
    vectors = None
    if vectors_for and not start:
        vectors = _kept_vectors(vec, resolved, [int(i) for i in vectors_for], dist)
    return ContrastResult(heads, groups, accs, meta, stats, vectors)


def _kept_vectors(
    vec: dict[Head, list[tuple[torch.Tensor, ...]]],
    resolved: Sequence[ResolvedRecord],
    positions: Sequence[int],
    dist,
) -> dict[Head, HeadVectors]:
    """Every rank's kept vectors (keyed by position in ``resolved``) as :class:`HeadVectors`
    of ``[resolved[i] for i in positions]``, in that order."""
    parts = gather_objects(vec, dist)
    records = [resolved[i] for i in positions]
    out = {}
    for h in vec:
        by_pos: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for part in parts:
            for recs, q, k in part[h]:
                start = 0
                for b, pos in enumerate(recs.tolist()):
                    n = len(resolved[pos].keys)
                    by_pos[pos] = (q[b], k[start : start + n])
                    start += n
        qs = [by_pos[i][0] for i in positions]
        ks = [by_pos[i][1] for i in positions]
        out[h] = HeadVectors(
            torch.stack(qs),
            torch.cat(ks),
            torch.tensor([r.index for r in records for _ in r.keys]),
            torch.tensor([k.positive for r in records for k in r.keys], dtype=torch.bool),
            [k.label for r in records for k in r.keys],
            [r.record.group for r in records],
        )
    return out


def _frame_specs(model: torch.nn.Module, frame: str, layers: Any) -> dict[int, Any] | None:
    """Rotary specs of ``layers`` for ``frame="query"`` (``None`` for ``"post"``)."""
    if frame not in ("post", "query"):
        raise ValueError(f"frame must be 'post' or 'query', got {frame!r}")
    return rotary_specs(model, sorted(layers)) if frame == "query" else None


def _record_stats(
    kept: dict[Head, list[tuple[torch.Tensor, ...]]], groups: list[str], dist: Dist | None
) -> dict[Head, Any]:
    """Per head :class:`RecordStats` of every record (all ranks), in record order."""
    from ..core.statistics import RecordStats

    local = {
        h: [torch.cat([p[i] for p in parts]) for i in range(7)] if parts else None
        for h, parts in kept.items()
    }
    out = {}
    for h in kept:
        pieces = [r[h] for r in gather_objects(local, dist) if r[h] is not None]
        idx, q, kp, hp, kn, hn, g = (torch.cat([p[i] for p in pieces]) for i in range(7))
        order = torch.argsort(idx.long())
        keep = (hp.bool() | hn.bool())[order]
        order = order[keep]
        out[h] = RecordStats(
            q[order],
            kp[order],
            kn[order],
            hp.bool()[order],
            hn.bool()[order],
            g.long()[order],
            list(groups),
        )
    return out


def _accumulator_tensors(accs: dict[Head, ContrastiveCovariance]) -> dict[str, torch.Tensor]:
    return {
        f"{format_head(*h)}.{key}": t
        for h, acc in accs.items()
        for key, t in acc.sum_tensors().items()
    }


def _load_accumulators(
    accs: dict[Head, ContrastiveCovariance], tensors: dict[str, torch.Tensor], where: Path
) -> None:
    for h, acc in accs.items():
        prefix = f"{format_head(*h)}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            acc.load_state_dict(state)
        except ValueError as err:
            raise ValueError(
                f"--resume: checkpoint in {where} does not fit this run: {err}"
            ) from None


def _records_hash(resolved: Sequence[ResolvedRecord]) -> str:
    """Hash of what the accumulators depend on: texts, token ids, query/key sites, groups."""
    return data_hash(
        [
            [r.text, r.input_ids, r.query, [[k.pos, k.positive] for k in r.keys], r.record.group]
            for r in resolved
        ]
    )


def _gather_captures(caps: dict[int, CapturedQK], dist: Dist) -> dict[int, CapturedQK]:
    """Every rank's captures (CPU) merged per layer, rows sorted back into record order."""
    moved = {
        layer: CapturedQK(
            c.layer,
            c.heads,
            c.q.cpu(),
            c.k.cpu(),
            c.q_index.cpu(),
            c.k_index.cpu(),
            c.scaling,
            c.softcap,
            c.sliding_window,
            c.pre_rope,
        )  # fmt: skip
        for layer, c in caps.items()
    }
    parts: dict[int, list[CapturedQK]] = {}
    for rank_caps in gather_objects(moved, dist):
        for layer, c in rank_caps.items():
            parts.setdefault(layer, []).append(c)
    out = {}
    for layer, p in parts.items():
        c = CapturedQK.concat(p)
        # stable sort on the record index keeps each record's key rows in site order
        qo = torch.sort(c.q_index[:, 0], stable=True).indices
        ko = torch.sort(c.k_index[:, 0], stable=True).indices
        out[layer] = CapturedQK(
            c.layer, c.heads, c.q[qo], c.k[ko], c.q_index[qo], c.k_index[ko],
            c.scaling, c.softcap, c.sliding_window, c.pre_rope,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- vectors
@dataclass
class HeadVectors:
    """Vectors of one head for figures: ``q [n, D]`` (one per record), ``keys [m, D]``,
    ``key_record [m]`` (record index), ``key_positive [m]`` (bool), ``key_labels`` (m)."""

    q: torch.Tensor
    keys: torch.Tensor
    key_record: torch.Tensor
    key_positive: torch.Tensor
    key_labels: list[str | None]
    record_groups: list[str | None]

    def select(self, records: Sequence[int], renumber: bool = True) -> HeadVectors:
        """The vectors of the given records (positions in this object's record order), with
        ``key_record`` renumbered 0..len(records)-1 (``renumber=False``: kept as it is)."""
        uniq = list(dict.fromkeys(self.key_record.tolist()))  # record order (every record has keys)
        rank = {r: i for i, r in enumerate(uniq)}
        local = torch.tensor([rank[int(r)] for r in self.key_record])
        pick = {int(r): j for j, r in enumerate(records)}
        rows = [i for i, r in enumerate(local.tolist()) if r in pick]
        rows = sorted(rows, key=lambda i: pick[int(local[i])])  # the records' order given
        return HeadVectors(
            self.q[list(records)],
            self.keys[rows],
            torch.tensor([pick[int(local[i])] for i in rows], dtype=torch.long)
            if renumber
            else self.key_record[rows],
            self.key_positive[rows],
            [self.key_labels[i] for i in rows],
            [self.record_groups[r] for r in records],
        )

    @staticmethod
    def concat(parts: Sequence[HeadVectors]) -> HeadVectors:
        """The records of ``parts`` one after another (distinct records)."""
        return HeadVectors(
            torch.cat([p.q for p in parts]),
            torch.cat([p.keys for p in parts]),
            torch.cat([p.key_record for p in parts]),
            torch.cat([p.key_positive for p in parts]),
            [x for p in parts for x in p.key_labels],
            [x for p in parts for x in p.record_groups],
        )

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            f"{prefix}q": self.q,
            f"{prefix}keys": self.keys,
            f"{prefix}key_record": self.key_record,
            f"{prefix}key_positive": self.key_positive,
        }


@dataclass
class KnownVectors:
    """One head's vectors that another forward already captured (see :func:`collect_qk`):
    ``vectors`` maps a position in the records passed to ``(q [D], keys [S, D])`` — the query
    and the keys of the record's unpadded positions (at least up to its query) in the frame
    asked, post-RoPE; ``scaling``: the head's logit scale."""

    vectors: dict[int, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


def collect_qk(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[ResolvedRecord],
    heads: Sequence[Head],
    *,
    batch_size: int = 8,
    pre_rope: bool = False,
    progress: bool = True,
    dist: Dist | None = None,
    frame: str = "post",
    full_keys: Sequence[int] | None = None,
    known: Mapping[Head, KnownVectors] | None = None,
) -> dict[Head, HeadVectors] | tuple[dict[Head, HeadVectors], dict[Head, dict[str, Any]]]:
    """Each record's query vector and every key-site vector for ``heads`` (float32).

    ``dist``: each rank captures its whole batches; the rows are gathered back in record
    order, so every rank returns the one-process result.
    ``full_keys``: positions in ``resolved`` whose every key up to the query is captured in
    the same forward for exact attribution; then returns ``(vectors, full)`` with ``full``
    as :func:`collect_full_keys` returns it for ``[resolved[i] for i in full_keys]``.
    ``known``: head → :class:`KnownVectors`, what another forward of some of these records
    already captured in ``frame`` (e.g. the swaps' unedited base): those records are not
    forwarded again. Every head must know the same records.
    """
    if not resolved:
        raise ValueError("collect_qk: no records")
    heads = [(int(layer), int(head)) for layer, head in heads]
    by_layer = _layer_heads(heads)
    specs = _frame_specs(model, frame, by_layer)
    wide = {int(i): j for j, i in enumerate(full_keys or [])}
    if len(wide) != len(full_keys or []) or any(not 0 <= i < len(resolved) for i in wide):
        raise ValueError(f"full_keys must be distinct positions in 0..{len(resolved) - 1}")
    known = {h: known[h] for h in heads} if known else {}
    seen = set(next(iter(known.values())).vectors) if known else set()
    if known and (
        pre_rope
        or any(set(v.vectors) != seen for v in known.values())
        or any(not 0 <= i < len(resolved) for i in seen)
    ):
        raise ValueError(
            "collect_qk: known vectors are post-RoPE (pre_rope=False), for the same records "
            f"of every head, at positions in 0..{len(resolved) - 1}"
        )
    todo = [i for i in range(len(resolved)) if i not in seen]
    recs = [resolved[i] for i in todo]
    # key sites of a record: its key positions, then (full_keys) every position up to the query
    sites = QKSites(
        [[r.query] for r in recs],
        [r.key_positions + (list(range(r.query + 1)) if i in wide else []) for i, r in zip(todo, recs, strict=True)],
    )  # fmt: skip
    batches = shard_batches(len(recs), batch_size, dist)
    caps = (
        capture_prompts(
            model,
            tokenizer,
            [r.text for r in recs],
            sites,
            sorted(by_layer),
            sorted({h for _, h in heads}),
            batch_size=batch_size,
            pre_rope=pre_rope,
            progress=progress,
            batches=batches,
        )
        if batches
        else {}
    )
    if dist is not None and dist.enabled and recs:
        caps = _gather_captures(caps, dist)
    if specs is not None:
        caps = {layer: to_query_frame(c, specs[layer]) for layer, c in caps.items()}
    key_record = torch.tensor([r.index for r in resolved for _ in r.keys])
    key_positive = torch.tensor([k.positive for r in resolved for k in r.keys], dtype=torch.bool)
    labels = [k.label for r in resolved for k in r.keys]
    groups = [r.record.group for r in resolved]
    rows = [len(r.key_positions) + (r.query + 1 if i in wide else 0) for i, r in zip(todo, recs, strict=True)]  # fmt: skip
    out, full = {}, {}
    for layer, head in heads:
        qs: list[torch.Tensor] = [torch.empty(0)] * len(resolved)
        ks: list[torch.Tensor] = [torch.empty(0)] * len(resolved)  # every site row of a record
        if recs:
            cap = caps[layer]
            j = cap.heads.index(head)
            for i, q, k in zip(todo, cap.q[:, j].cpu(), cap.k[:, j].cpu().split(rows), strict=True):
                qs[i], ks[i] = q, k
        kv = known.get((layer, head))
        for i, (q, k) in (kv.vectors if kv is not None else {}).items():
            r = resolved[i]
            extra = list(range(r.query + 1)) if i in wide else []
            qs[i], ks[i] = q.cpu(), k.cpu()[r.key_positions + extra]
        sites_of = [k[: len(r.key_positions)] for r, k in zip(resolved, ks, strict=True)]
        out[(layer, head)] = HeadVectors(
            torch.stack(qs).float(),
            torch.cat(sites_of).float(),
            key_record,
            key_positive,
            labels,
            groups,
        )
        if full_keys is not None:
            fq = [qs[i] for i in wide]
            full[(layer, head)] = {
                "q": (torch.stack(fq) if fq else qs[0].new_zeros(0, qs[0].shape[-1])).double(),
                "keys": [ks[i][len(resolved[i].key_positions) :].double() for i in wide],
                "scaling": caps[layer].scaling if recs else known[(layer, head)].scaling,
            }
    return out if full_keys is None else (out, full)


def collect_full_keys(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[ResolvedRecord],
    heads: Sequence[Head],
    *,
    batch_size: int = 8,
    progress: bool = True,
    frame: str = "post",
) -> dict[Head, dict[str, Any]]:
    """Each record's query and *every* key up to it, for exact logit attribution.

    Returns per head ``{"q": [n, D] float64, "keys": n tensors [query_i + 1, D] float64,
    "scaling": float}``.
    """
    if not resolved:
        raise ValueError("collect_full_keys: no records")
    _, full = collect_qk(
        model, tokenizer, resolved, heads, batch_size=batch_size, progress=progress,
        frame=frame, full_keys=range(len(resolved)),
    )  # fmt: skip
    return full
