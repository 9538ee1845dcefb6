"""``qkcov explain``: what does each head read? Hypotheses from tokens, every head in one pass.

>>> result = qkcov.explain(model, tokenizer)            # default corpus, every head  # doctest: +SKIP
>>> print(result.summary()); result.save("runs/atlas")   # explain.json + atlas.html   # doctest: +SKIP

Steps: the corpus (the generated default, :mod:`qkcov.tasks.corpus`, or your ``.txt`` /
``.jsonl``) is tokenized and every hypothesis (:mod:`qkcov.tasks.hypotheses`) evaluated on
it from tokens alone, with every input check, *before* any forward; one forward per batch then
adds every selected head's post-RoPE q/k to running sums (:mod:`qkcov.engine.explain`,
:mod:`qkcov.core.explain`); offline, each head gets, per hypothesis, ΔC = E[q k⁺ᵀ] − E[q k⁻ᵀ]
(negatives offset-matched unless the hypothesis is positional) and its subspaces, and every
hypothesis its share of what the head *selects* — the head's logit variance among the keys
after the first, explained by the hypotheses' indicators in greedy order (exact; the rest
unexplained) — while the first key's part (the gate) is reported apart
(:mod:`qkcov.core.explain`, ``docs/explain.md``). Memory of the sums:
``heads × ((hypotheses + 1) × D² + hypotheses²) × 8`` bytes.

Verdicts: with ``verify_top=K`` the top hypothesis of the first K heads (by share) becomes
contrast records (:func:`qkcov.tasks.hypotheses.contrast_records`: a document prefix ending at
a query token, its keys satisfying the hypothesis as positives, offset-nearest keys that
don't as negatives) and runs through :func:`qkcov.pipeline.analyze` on that head — ΔC
significance, swaps against random and label-permuted subspaces, the label test, the verdict.
Every other hypothesis keeps ``verdict = "untested"`` with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigMixin, check_positive_int, check_range
from .report.atlas import ATLAS_FILE
from .runtime import Timer

__all__ = ["ExplainConfig", "ExplainResult", "explain", "run_explain", "load_texts"]

EXPLAIN_FILE = "explain.json"
TENSOR_FILE = "explain.safetensors"
#: what a run writes besides manifest.json (checked against --force before the model loads)
RUN_FILES = (EXPLAIN_FILE, TENSOR_FILE, ATLAS_FILE, "section.json")
_AUTO = re.compile(r"(?i)^auto(?::(\d+))?$")
AUTO_DEFAULT = 10


def _common(name: str) -> Any:
    """A field meaning exactly what ``qkcov run``'s field of that name means."""
    from .pipeline import RunConfig

    f = {f.name: f for f in dataclasses.fields(RunConfig)}[name]
    return field(default=f.default, metadata=dict(f.metadata))


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def check_explain_heads(spec: object) -> None:
    """Syntax of ``--heads`` before any model loads: ``all``, or what every other command
    takes (``auto``, ``auto:K``, a list such as ``L5H3,L17H4``; ranges are checked against the
    model): :func:`qkcov.engine.scan.check_heads_spec`."""
    from .engine.scan import check_heads_spec

    if isinstance(spec, str) and spec.strip().lower() == "all":
        return
    check_heads_spec(spec)


@dataclass
class ExplainConfig(ConfigMixin):
    """Settings of one ``qkcov explain``; every flag is one of these fields (the common model
    flags mean what they mean on ``qkcov run``)."""

    model: str = _common("model")
    device: str = _common("device")
    dtype: str = _common("dtype")
    device_map: str | None = _common("device_map")
    heads: str = _help(
        "'all' (every head), 'auto:K' (the K heads whose top hypothesis explains most; every "
        "head is computed in the same pass) or L5H3,L17H4",
        default="all",
    )
    batch_size: int = _common("batch_size")
    seed: int = _common("seed")
    text: str | None = _help(
        ".txt (documents separated by blank lines) or .jsonl ({'text': ...} per line); "
        "default: the generated corpus shipped with qkcov",
        default=None,
    )
    hypotheses: str = _help(
        "comma-separated built-in hypotheses: previous-token, offset:a-b, same-token, "
        "induction, first-token, same-word, delimiter, capitalised, number",
        default="previous-token,offset:2-4,offset:5-16,same-token,induction,first-token,"
        "same-word,delimiter,capitalised,number",
    )
    hypothesis: tuple[str, ...] = _help(
        "your own: NAME:COND[;COND...], COND = key~REGEX, query~REGEX (searched in the "
        "token's word), key@CATEGORY, query@CATEGORY (a task vocabulary category or names) "
        "or same-category",
        default=(),
    )
    max_len: int = _help("tokens per sequence (longer documents are cut)", default=128)
    n_documents: int = _help("documents of the default corpus", default=360)
    energy: float = _help("energy of each hypothesis' subspace rank (SVD of ΔC)", default=0.9)
    max_rank: int = _help("largest subspace rank per hypothesis", default=8)
    verify_top: int = _help(
        "heads (the first K by share) whose top hypothesis gets a verdict: contrast records "
        "built from it run through qkcov run's whole method on that head (0 = none; each "
        "costs a qkcov run of --verify-records records)",
        default=0,
    )
    verify_records: int = _help("records per verified hypothesis", default=96)

    def __post_init__(self) -> None:
        from .tasks.hypotheses import resolve_hypotheses

        check_explain_heads(self.heads)
        check_positive_int("--verify-top", self.verify_top, 0)
        check_positive_int("--verify-records", self.verify_records, 8)
        for name in ("batch_size", "max_len", "n_documents", "max_rank"):
            check_positive_int(
                f"--{name.replace('_', '-')}", getattr(self, name), 2 if name == "max_len" else 1
            )
        check_range("--energy", self.energy, 0.0, 1.0, low_open=True)
        if isinstance(self.hypothesis, str):
            self.hypothesis = (self.hypothesis,)
        self.hypothesis = tuple(self.hypothesis)
        for h in resolve_hypotheses(self.hypothesis_names(), self.hypothesis):
            h.check()

    def hypothesis_names(self) -> list[str]:
        return [s.strip() for s in self.hypotheses.split(",") if s.strip()]


# --------------------------------------------------------------------------- corpus
def load_texts(path: str | Path) -> list[str]:
    """Documents of a ``.txt`` (blank-line separated) or ``.jsonl`` (``{"text": ...}`` or a
    JSON string per line) file; one line for anything else."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"--text {path}: expected a .txt or .jsonl file")
    from .artifacts import read_regular_bytes  # a FIFO or device: one line, never a blocked read

    data = read_regular_bytes(p, cap=1 << 30, what="text file")
    try:
        raw = data.decode("utf-8-sig")  # a leading BOM is tolerated
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"--text {path}: line {line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); "
            "expected UTF-8 text"
        ) from None
    if suffix == ".txt":
        docs = [d.strip() for d in re.split(r"\n\s*\n", raw)]
        return [d for d in docs if d]
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--text {path} line {i}: invalid JSON ({err.msg})") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise ValueError(f'--text {path} line {i}: expected {{"text": "..."}} or a JSON string')
        if text.strip():
            docs.append(text)
    return docs


def check_texts(texts: Sequence[str], where: str = "the corpus") -> list[str]:
    """One line for an empty corpus or one word repeated (before the model loads)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{where}: expected a list of strings")
    docs = [t for t in texts if t.strip()]
    if not docs:
        raise ValueError(f"{where} is empty: expected at least one non-blank document")
    words = {w for t in docs for w in t.split()}
    if len(words) == 1:
        raise ValueError(
            f"{where} is one word repeated ({next(iter(words))!r}): every hypothesis would hold "
            "everywhere or nowhere; give varied text"
        )
    return docs


# --------------------------------------------------------------------------- result
@dataclass
class ExplainResult:
    """Every explained head (sorted by its top hypothesis' share) and what produced it.

    ``heads``: :class:`qkcov.core.explain.HeadExplanation` objects; ``shape``: ``{"n_layers",
    "n_heads", "head_dim"}``; ``corpus``: documents, sequences, tokens, source;
    ``hypotheses``: name, description, positional, positive pairs; ``memory``: the formula
    and its bytes; ``examples``: the atlas' token views, one per top hypothesis (a corpus row
    where it holds, its positive keys, the attention of every head with that top; each head's
    ``example`` indexes it); ``example``: the first of them."""

    model: str | None
    heads: list[Any]
    shape: dict[str, int]
    corpus: dict[str, Any]
    hypotheses: list[dict[str, Any]]
    memory: dict[str, Any]
    seconds: dict[str, float]
    config: dict[str, Any]
    example: dict[str, Any] | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)

    def head(self, name: str) -> Any:
        for h in self.heads:
            if h.name == name:
                return h
        raise ValueError(
            f"head {name!r} was not explained; have {[h.name for h in self.heads][:8]}…"
        )

    def sentences(self) -> list[str]:
        return [h.sentence() for h in self.heads]

    def unmatched(self) -> list[str]:
        """Hypotheses that hold for no query–key pair of the corpus: their 0 % share says
        nothing about the heads (a regex or category that never matched, for instance)."""
        return [h["name"] for h in self.hypotheses if not h.get("n_pairs")]

    def summary(self, n: int = 20) -> str:
        """The first ``n`` heads' sentences, then how many more and any note, each wrapped at
        120 characters."""
        lines = self.sentences()
        texts = lines[:n]
        if len(lines) > n:
            texts.append(f"… and {len(lines) - n} more heads (explain.json)")
        none = self.unmatched()
        if none:
            texts.append(
                f"note: {', '.join(repr(x) for x in none)} held for no query–key pair of this "
                f"corpus, so {'its' if len(none) == 1 else 'their'} 0 % share was not tested; "
                "check the pattern or give text it matches"
            )
        return "\n".join(w for t in texts for w in textwrap.wrap(t, 120, subsequent_indent="  "))

    def to_json(self) -> dict[str, Any]:
        heads = []
        for h in self.heads:
            heads.append(
                {
                    "name": h.name,
                    "layer": h.layer,
                    "head": h.head,
                    "top": h.top.name if h.top else None,
                    "sentence": h.sentence(),
                    "unexplained": h.unexplained,
                    "sink_share": h.sink_share,
                    "sink_attention": h.sink_attention,
                    "example": h.example,
                    "logit_std": h.logit_std,
                    "hypotheses": [
                        {
                            "name": x.name,
                            "part": x.part,
                            "direction": x.direction,
                            "share": x.share,
                            "solo_share": x.solo_share,
                            "logit_contrast": x.logit_contrast,
                            "subspace_share": x.subspace_share,
                            "subspace_variance": x.subspace_variance,
                            "random_share": x.random_share,
                            "rank": x.rank,
                            "rank_energy": x.rank_energy,
                            "order": x.order,
                            "singular_values": x.singular_values,
                            "attention": x.attention,
                            "attention_baseline": x.attention_baseline,
                            "n_pairs": x.n_pairs,
                            "verdict": x.verdict,
                            "verdict_reason": x.verdict_reason,
                        }  # fmt: skip
                        for x in h.hypotheses
                    ],
                }
            )
        return {
            "format": "qkcov-explain/1",
            "model": self.model,
            "shape": self.shape,
            "corpus": self.corpus,
            "hypotheses": self.hypotheses,
            "memory": self.memory,
            "seconds": self.seconds,
            "config": self.config,
            "example": self.example,
            "examples": self.examples,
            "heads": heads,
        }

    def tensors(self) -> dict[str, Any]:
        """Every hypothesis' key and query basis per head (float32), safe names."""
        from .naming import tensor_prefix

        out = {}
        for h in self.heads:
            for x in h.hypotheses:
                pre = tensor_prefix(h.name, x.name)
                out[pre + "key_basis"] = x.key_basis.contiguous()
                out[pre + "query_basis"] = x.query_basis.contiguous()
        return out

    def save(
        self, out: str | Path, *, force: bool = False, command: str = "explain",
        protect: Sequence[str | Path] = (),
    ) -> Path:  # fmt: skip
        """``OUT/explain.json``, ``OUT/explain.safetensors`` and ``OUT/atlas.html`` in one
        :class:`qkcov.artifacts.RunFolder` (one complete folder or none)."""
        from .artifacts import RunFolder

        folder = RunFolder(out, command=command, force=force, protect=protect, files=RUN_FILES)
        with folder as staging:
            self._write(staging)
        return Path(folder.out)

    def _write(self, folder: str | Path) -> None:
        """The folder's files, written without any overwrite check: only into a staging
        folder qkcov made (``save``'s run folder, ``qkcov demo``'s): ``explain.json``, ``explain.safetensors``, ``atlas.html`` and
        ``section.json`` (the report's section: the best heads and a link to the atlas)."""
        from .artifacts import save_tensors, write_json
        from .report.atlas import write_atlas

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / EXPLAIN_FILE, self.to_json())
        save_tensors(folder / TENSOR_FILE, self.tensors())
        write_atlas(folder)
        write_json(folder / "section.json", self.section())

    def section(self, n: int = 20) -> dict[str, Any]:
        """The report's section of this explanation: the first ``n`` heads as a table."""
        rows = []
        for h in self.heads[:n]:
            top = h.top
            rows.append([h.name, top.name if top else "–", round(top.share, 3) if top else 0.0,
                         round(h.unexplained, 3), round(h.sink_attention, 3),
                         top.verdict if top else "–"])  # fmt: skip
        c = self.corpus
        return {
            "key": "explain",
            "title": "What each head selects (qkcov explain, no labels)",
            "order": 90,
            "text": [
                f"Every head ({len(self.heads)} here) explained in one forward over "
                f"{c.get('tokens')} tokens ({c.get('source')}). A head's attention logits split "
                "exactly into the gate (the first key against the others: how much the head "
                "attends at all) and the selection (which of the other keys it picks); token "
                "hypotheses explain the selection in greedy order, with the rest unexplained. "
                "Each hypothesis also gets its ΔC and key subspace; --verify-top runs the whole "
                "method on a head's top hypothesis for a verdict.",
            ],
            "tables": [
                {
                    "caption": f"the {min(n, len(self.heads))} heads whose top hypothesis explains "
                    "most of what they select",
                    "columns": [
                        "head",
                        "top hypothesis",
                        "share",
                        "unexplained",
                        "attention on the first key",
                        "verdict",
                    ],
                    "rows": rows,
                }
            ],  # fmt: skip
            "pages": [
                {
                    "file": "atlas.html",
                    "caption": "Open the atlas: every head on a layer × head grid, each "
                    "with its shares, table and token view",
                }
            ],  # fmt: skip
        }


# --------------------------------------------------------------------------- orchestration
def _select(heads_spec: str, n_layers: int, n_heads: int) -> list[tuple[int, int]] | None:
    """Heads to compute: a list (checked against the model) or ``None`` for all."""
    from .models.heads import parse_heads

    s = heads_spec.strip()
    if s.lower() == "all" or _AUTO.match(s):
        return None
    return parse_heads(s, n_layers, n_heads)


def explain(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    heads: str | None = None,
    hypotheses: Sequence[Any] | None = None,
    config: ExplainConfig | None = None,
    progress: bool = True,
    model_name: str | None = None,
    dist: Any = None,
    **overrides: Any,
) -> ExplainResult:
    """Explain every head (or ``heads``) of a model you loaded, on ``texts`` (default: the
    generated corpus). ``hypotheses``: built-in names and :class:`qkcov.Hypothesis` objects
    (e.g. ``Hypothesis.from_predicate("caps", lambda q, k: k.text[:1].isupper())``);
    default: the built-ins of ``config.hypotheses``. ``overrides`` are
    :class:`ExplainConfig` fields. ``dist`` (a :class:`qkcov.engine.distributed.Dist`, under
    ``torchrun``): each rank forwards its whole batches and the sums are added over ranks;
    every rank then does the same offline math, verification and token views and returns
    the one-process result (rank 0 alone should save it)."""
    from .core.explain import memory_bytes
    from .engine.explain import attention_example, explain_heads, plan_corpus, tokenize_corpus
    from .models.loading import model_info
    from .tasks.corpus import default_corpus
    from .tasks.hypotheses import resolve_hypotheses

    if heads is not None:
        overrides["heads"] = heads
    cfg = (
        dataclasses.replace(config, **overrides)
        if config is not None
        else ExplainConfig(**overrides)
    )
    hyps = resolve_hypotheses(
        cfg.hypothesis_names() if hypotheses is None else hypotheses,
        cfg.hypothesis if hypotheses is None else (),
    )
    for h in hyps:
        h.check()
    progress = progress and (dist is None or dist.is_main)  # under torchrun rank 0 logs
    source = "default corpus (qkcov.tasks.corpus)" if texts is None else "user text"
    if texts is None:
        texts = default_corpus(cfg.n_documents, cfg.seed)
    texts = check_texts(texts)
    timer = Timer("explain", quiet=not progress)
    info = model_info(model)
    chosen = _select(cfg.heads, info.n_layers, info.n_heads)
    head_list = chosen or [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    with timer.phase("plan"):
        seqs = tokenize_corpus(tokenizer, texts, cfg.max_len)
        plan = plan_corpus(seqs, hyps)
    timer.log(
        f"{len(texts)} documents, {len(seqs)} sequences, {plan.n_tokens} tokens; "
        f"{len(hyps)} hypotheses x {len(head_list)} heads"
    )
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    with timer.phase("forward"):
        explained, _ = explain_heads(
            model, plan, head_list, batch_size=cfg.batch_size, energy=cfg.energy,
            max_rank=cfg.max_rank, progress=progress, pad_id=pad, dist=dist,
        )  # fmt: skip
    explained.sort(key=lambda h: h.top.share if h.top else -1.0, reverse=True)
    m = _AUTO.match(cfg.heads.strip())
    if m is not None:
        explained = explained[: int(m.group(1) or AUTO_DEFAULT)]
    if cfg.verify_top:
        with timer.phase("verify"):
            _verify(model, tokenizer, texts, plan, explained[: cfg.verify_top], cfg, timer)
    for h in explained[cfg.verify_top :]:
        for x in h.hypotheses:
            x.verdict_reason = (
                f"not verified: --verify-top {cfg.verify_top} verifies the top hypothesis of the "
                "first heads by share only"
            )
    with timer.phase("example"):
        examples = _examples(model, plan, explained, attention_example)
    example = examples[0] if examples else None
    n_pairs = plan.pos_counts.sum(1)
    mem = memory_bytes(len(head_list), len(hyps), info.head_dim)
    return ExplainResult(
        model=model_name or getattr(getattr(model, "config", None), "_name_or_path", None),
        heads=explained,
        shape={"n_layers": info.n_layers, "n_heads": info.n_heads, "head_dim": info.head_dim},
        corpus={
            "source": source,
            "documents": len(texts),
            "sequences": len(seqs),
            "tokens": plan.n_tokens,
            "max_len": cfg.max_len,
        },  # fmt: skip
        hypotheses=[
            {
                "name": h.name,
                "description": h.description,
                "positional": h.positional,
                "n_pairs": int(n_pairs[i]),
            }  # fmt: skip
            for i, h in enumerate(hyps)
        ],
        memory={
            "formula": "heads x ((hypotheses + 1) x head_dim^2 + hypotheses^2) x 8 bytes "
            "(float64 sums)",
            "heads": len(head_list),
            "hypotheses": len(hyps),
            "head_dim": info.head_dim,
            "bytes": mem,
        },  # fmt: skip
        seconds=dict(timer.seconds),
        config=cfg.to_dict(),
        example=example,
        examples=examples,
    )


def _pick_row(plan: Any, n: int, min_len: int = 16) -> tuple[int, int] | None:
    """A (sequence, query) whose query has a positive key of hypothesis ``n`` after the first
    key: the last such query of the first sequence where it lies at ``min_len − 1`` or later,
    else the first such row anywhere; ``None`` when the hypothesis holds nowhere."""
    first = None
    for i in range(len(plan.seqs)):
        rows = plan.masks[i][n][:, 1:].any(-1).nonzero().flatten()
        if rows.numel():
            q = int(rows[-1])
            if q >= min_len - 1:
                return i, q
            first = first or (i, q)
    return first


def _examples(model: Any, plan: Any, heads: Sequence[Any], attention_example: Any) -> list:
    """The atlas' token views: per top hypothesis among ``heads``, one corpus row where it
    holds (its positive keys marked) and the attention of every head with that top over it;
    each head's ``example`` is the index of its view. Heads without a top, or whose top holds
    nowhere, share a view of the first sequence's last token."""
    groups: dict[str, list[Any]] = {}
    for h in heads:
        groups.setdefault(h.top.name if h.top else "", []).append(h)
    out: list[dict[str, Any]] = []
    fallback: list[Any] = []
    for name, hs in groups.items():
        n = plan.names.index(name) if name in plan.names else None
        picked = _pick_row(plan, n) if n is not None else None
        if picked is None:
            fallback += hs
            continue
        i, q = picked
        seq = plan.seqs[i]
        rows = attention_example(model, seq, [(h.layer, h.head) for h in hs], query=q)
        positives = plan.masks[i][n][q, : q + 1].nonzero().flatten().tolist()
        for h in hs:
            h.example = len(out)
        out.append({"hypothesis": name, "tokens": list(seq.pieces[: q + 1]), "document": seq.doc,
                    "query": q, "positives": positives, "attention": rows})  # fmt: skip
    if fallback:
        seq = next((s for s in plan.seqs if len(s) >= 16), plan.seqs[0])
        rows = attention_example(model, seq, [(h.layer, h.head) for h in fallback])
        for h in fallback:
            h.example = len(out)
        out.append({"hypothesis": None, "tokens": list(seq.pieces), "document": seq.doc,
                    "query": len(seq) - 1, "positives": [], "attention": rows})  # fmt: skip
    return out


def _verify(
    model: Any, tokenizer: Any, texts: Sequence[str], plan: Any, heads: Sequence[Any],
    cfg: ExplainConfig, timer: Timer,
) -> None:  # fmt: skip
    """The top hypothesis of each of ``heads``: contrast records from it, ``analyze`` (the
    whole method of ``qkcov run``) on that head; its verdict status and sentence."""
    from .pipeline import analyze
    from .tasks.hypotheses import contrast_records

    for h in heads:
        top = h.top
        if top is None:
            continue
        i = plan.names.index(top.name)
        hyp = plan.hypotheses[i]
        recs = contrast_records(
            texts, plan.seqs, plan.masks, i, positional=hyp.positional,
            n=cfg.verify_records, seed=cfg.seed, kind="relation" if hyp.relational else "class",
        )  # fmt: skip
        for x in h.hypotheses:
            if x is not top:
                x.verdict_reason = "not verified: only each verified head's top hypothesis is"
        if len(recs) < 16:
            top.verdict_reason = f"untested: only {len(recs)} contrast records could be built"
            continue
        # a positional hypothesis is a claim about the offset itself: its labels cannot be
        # permuted within offsets, so its label nulls are unconditioned (and say so)
        control = "none" if hyp.positional else "offset"
        timer.log(f"verifying {h.name}: {top.name} on {len(recs)} records (control {control})")
        try:
            res = analyze(model, tokenizer, recs, heads=h.name, seed=cfg.seed,
                          batch_size=cfg.batch_size, progress=False, control=control)  # fmt: skip
        except ValueError as err:
            top.verdict_reason = f"untested: {str(err).splitlines()[0]}"
            continue
        v = res.heads[0].verdict
        if v is None:
            top.verdict_reason = "untested: the run gave no verdict"
            continue
        note = (
            " (a positional hypothesis: label nulls not conditioned on the offset, which is "
            "the hypothesis itself)"
            if hyp.positional
            else ""
        )
        top.verdict, top.verdict_reason = v.status, v.sentence + note


def _load_kwargs(cfg: ExplainConfig, dist: Any = None) -> dict[str, Any]:
    """``load_model`` arguments as ``qkcov run`` passes them (``auto`` = cuda when there;
    under torchrun this rank's device)."""
    import torch

    device = cfg.device
    if device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kw: dict[str, Any] = {}
    if dist is not None and dist.enabled:
        kw["device"] = str(dist.device)
    elif device != "cpu" and not cfg.device_map:
        kw["device"] = device
    if cfg.dtype != "auto":
        kw["dtype"] = cfg.dtype
    if cfg.device_map:
        kw["device_map"] = cfg.device_map
    return kw


def run_explain(
    cfg: ExplainConfig,
    out: str | Path,
    *,
    quiet: bool = False,
    force: bool = False,
    command_line: str | None = None,
) -> ExplainResult:
    """The CLI path: every input check, then the model, then :func:`explain` and the folder.

    Under ``torchrun`` (``Dist.from_env``) each rank loads the model on its device and
    forwards its whole batches; the sums are added over ranks and rank 0 alone checks and
    writes ``out`` and logs."""
    from .artifacts import RunFolder
    from .engine.distributed import Dist
    from .models.loading import check_heads_config, load_model

    texts = None
    protect: list[Path] = []
    if cfg.text is not None:
        texts = check_texts(load_texts(cfg.text), f"--text {cfg.text}")
        protect.append(Path(cfg.text))
    if cfg.heads.strip().lower() != "all":  # --heads L99H0: from the config, before weights
        check_heads_config(cfg.heads, cfg.model)
    dist = Dist.from_env(None if cfg.device.strip().lower() == "auto" else cfg.device)
    quiet = quiet or not dist.is_main
    if dist.is_main:  # --out check before the model (with --force: none of the files it
        # writes is taken by a user's file); rank 0 alone writes
        RunFolder(out, command="explain", force=force, protect=protect, files=RUN_FILES).close()
    timer = Timer("explain", quiet=quiet)
    timer.log(f"loading {cfg.model}")
    lm = load_model(cfg.model, **_load_kwargs(cfg, dist))
    result = explain(lm.model, lm.tokenizer, texts, config=cfg, progress=not quiet,
                     model_name=cfg.model, dist=dist if dist.enabled else None)  # fmt: skip
    result.config["command_line"] = command_line
    if dist.is_main:
        result.save(out, force=force, command=command_line or "qkcov explain", protect=protect)
    return result
