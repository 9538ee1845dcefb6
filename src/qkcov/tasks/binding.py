"""Binding task (order-ID and lexical features), METHOD §4.

Prompt (plain mode)::

    The apple is in Box C, the key is in Box F, the coin is in Box A. Which box is the key in? Box

With ``chat=True`` the trailing answer prefix (" Box") is left out and the query is the
last token of the chat template. The query is always the last token (``query=None``);
keys are the box-letter tokens (``include_object_keys`` adds the object tokens on the
same side as their letter). ``meta["candidates"]`` lists every letter span for a "score
over candidate letters" accuracy.

Two contrast designs:

* **order** (order-ID feature). A *family* is one fixed set of (object, letter) pairs
  and one queried pair; the family has one prompt per order position, the queried pair
  moved to that position and the other pairs kept in their relative order. Positive =
  the answer's letter, negatives = the other letters. Within a family the queried object,
  its letter and all bindings are fixed, so only the answer's order index varies.
  ``group = str(answer index)`` gives per-order ΔC.

* **lexical** (object-identity feature). A *pair* of records shares the exact same
  context (same objects, same letters, same order); only the object named in the
  question differs. In the factual record it is the object bound at key position ``p``,
  so that letter is a positive (its bound object matches the query); in the
  counterfactual record it is an object absent from the context, so the same letter at
  the same position is a negative. Order, letters and context are identical, hence the
  only thing that changes whether the key matches is the queried object's identity.
  A record has one prompt, so the factual record carries only positives and the
  counterfactual only negatives, linked by ``meta["pair_id"]``; the accumulator adds
  the side each record provides. ``group`` = the object bound at the key.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, check_positive_int
from .records import ContrastRecord, Span, find_spans
from .vocab import BINDING_LETTERS, BINDING_OBJECTS

__all__ = [
    "BindingTaskConfig",
    "build_binding_records",
    "binding_prompt",
    "DESIGNS",
    "MIN_PAIRS",
    "MAX_PAIRS",
]

DESIGNS = ("order", "lexical")
MIN_PAIRS, MAX_PAIRS = 2, 9
_MAX_TRIES = 500


@dataclass
class BindingTaskConfig(ConfigMixin):
    """Settings of the binding task.

    Args:
        n_pairs: (object, box) pairs per prompt, 2..9.
        design: ``"order"`` or ``"lexical"`` (see module docstring).
        chat: prompts are meant for chat templating (no trailing answer prefix).
        answer_prefix: text appended after the question in plain mode (``"Box"``).
        seed: RNG seed; the same config gives the same records.
        n_build: records for ΔC. order: at least ``n_pairs`` (families of ``n_pairs``
            records, the last one possibly cut; order positions stay balanced within
            one). lexical: even (factual + counterfactual pairs).
        n_heldout: held-out records, 0 or following the same rule.
        include_object_keys: also use the object tokens as keys.
        objects / letters: replace the built-in object nouns / box letters.
    """

    n_pairs: int = 4
    design: str = "order"
    chat: bool = False
    answer_prefix: str = "Box"
    seed: int = 0
    n_build: int = 240
    n_heldout: int = 60
    include_object_keys: bool = False
    objects: tuple[str, ...] | None = None
    letters: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {list(DESIGNS)}, got {self.design!r}")
        for name in ("chat", "include_object_keys"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.answer_prefix, str):
            raise ValueError(f"answer_prefix must be a string, got {self.answer_prefix!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        check_positive_int("n_pairs", self.n_pairs, MIN_PAIRS)
        if self.n_pairs > MAX_PAIRS:
            raise ValueError(f"n_pairs must be in [{MIN_PAIRS}, {MAX_PAIRS}], got {self.n_pairs}")
        for name in ("objects", "letters"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                raise ValueError(f"{name} must be a list of strings, not one string")
            value = tuple(value)
            setattr(self, name, value)
            for v in value:
                if not isinstance(v, str) or not v.strip() or v != v.strip():
                    raise ValueError(f"{name}: empty or padded entry {v!r}")
            low = [v.lower() for v in value]
            dups = sorted({v for v in low if low.count(v) > 1})
            if dups:
                raise ValueError(f"{name}: duplicate entries {dups}")
        objects, letters = self.resolved_objects(), self.resolved_letters()
        need_objects = self.n_pairs + (1 if self.design == "lexical" else 0)
        if need_objects > len(objects):
            raise ValueError(
                f"n_pairs ({self.n_pairs}) needs {need_objects} objects for the "
                f"{self.design} design, only {len(objects)} available"
            )
        if self.n_pairs > len(letters):
            raise ValueError(
                f"n_pairs ({self.n_pairs}) exceeds the number of letters ({len(letters)})"
            )
        for name in ("n_build", "n_heldout"):
            n = getattr(self, name)
            check_positive_int(name, n, 1 if name == "n_build" else 0)
            if n == 0:
                continue
            if self.design == "order" and n < self.n_pairs:
                raise ValueError(
                    f"{name} ({n}) is smaller than n_pairs ({self.n_pairs}); the order design "
                    "needs at least one record per order position"
                )
            if self.design == "lexical" and n % 2:
                raise ValueError(
                    f"{name} ({n}) must be even: the lexical design emits factual/"
                    "counterfactual record pairs"
                )

    def resolved_objects(self) -> tuple[str, ...]:
        return BINDING_OBJECTS if self.objects is None else tuple(self.objects)

    def resolved_letters(self) -> tuple[str, ...]:
        return BINDING_LETTERS if self.letters is None else tuple(self.letters)


def binding_prompt(
    objects: Sequence[str],
    letters: Sequence[str],
    queried_object: str,
    *,
    chat: bool = False,
    answer_prefix: str = "Box",
) -> tuple[str, list[Span], list[Span]]:
    """Build the prompt text and the object / letter spans of each pair, in order.

    Raises ``ValueError`` if an object is not exactly one whole-word span of the context
    (e.g. it appears twice), if a queried object outside the pairs appears in the
    context, or if the lists are mismatched.
    """
    if len(objects) != len(letters) or not objects:
        raise ValueError(f"need equally many objects and letters, got {objects} / {letters}")
    if len(set(letters)) != len(letters):
        raise ValueError(f"letters must be distinct, got {list(letters)}")
    text = ""
    obj_spans: list[Span] = []
    let_spans: list[Span] = []
    for i, (o, l) in enumerate(zip(objects, letters, strict=True)):
        if not o or not l:
            raise ValueError(f"empty object or letter at pair {i}: {o!r} / {l!r}")
        text += "The " if i == 0 else ", the "
        obj_spans.append(Span(len(text), len(text) + len(o), "last", o))
        text += f"{o} is in Box "
        let_spans.append(Span(len(text), len(text) + len(l), "last", l))
        text += l
    context = text
    for o, s in zip(objects, obj_spans, strict=True):
        found = find_spans(context, o, ignore_case=True)
        if found != [(s.start, s.end)]:
            raise ValueError(
                f"object {o!r} is not a single span of the prompt ({len(found)} occurrences "
                "in the context)"
            )
    for l in letters:
        found = find_spans(context, f"Box {l}")
        if len(found) != 1:
            raise ValueError(f"letter {l!r} is not a single span of the prompt")
    if queried_object not in objects and find_spans(context, queried_object, ignore_case=True):
        raise ValueError(f"unused queried object {queried_object!r} appears in the context")
    text += f". Which box is the {queried_object} in?"
    if not chat and answer_prefix:
        text += " " + answer_prefix
    return text, obj_spans, let_spans


def _base_meta(
    cfg: BindingTaskConfig,
    objects: Sequence[str],
    letters: Sequence[str],
    obj_spans: Sequence[Span],
    let_spans: Sequence[Span],
    queried: str,
) -> dict[str, Any]:
    return {
        "task": "binding",
        "design": cfg.design,
        "chat": cfg.chat,
        "answer_prefix": "" if cfg.chat else cfg.answer_prefix,
        "n_pairs": len(objects),
        "objects": list(objects),
        "letters": list(letters),
        "queried_object": queried,
        "candidates": [{"letter": s.label, "start": s.start, "end": s.end} for s in let_spans],
        "object_spans": [{"object": s.label, "start": s.start, "end": s.end} for s in obj_spans],
        "seed": cfg.seed,
    }


def _keys(
    cfg: BindingTaskConfig, obj_spans: Sequence[Span], let_spans: Sequence[Span], idx: list[int]
) -> tuple[Span, ...]:
    spans = [let_spans[i] for i in idx]
    if cfg.include_object_keys:
        spans += [obj_spans[i] for i in idx]
    return tuple(spans)


def _schedule(n_positions: int, n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        cycle = list(range(n_positions))
        rng.shuffle(cycle)
        out.extend(cycle)
    return out[:n]


def _order_set(
    cfg: BindingTaskConfig, n: int, rng: random.Random, seen: set[Any], split: str
) -> list[ContrastRecord]:
    k = cfg.n_pairs
    counts = [0] * k
    out: list[ContrastRecord] = []
    family = 0
    while len(out) < n:
        for _ in range(_MAX_TRIES):
            objs = rng.sample(cfg.resolved_objects(), k)
            lets = rng.sample(cfg.resolved_letters(), k)
            key = ("order", tuple(zip(objs, lets, strict=True)))
            if key not in seen:
                seen.add(key)
                break
        else:
            raise ValueError(f"could not build {n} distinct {split} prompts; lower n or n_pairs")
        q_pair, others = (objs[0], lets[0]), list(zip(objs[1:], lets[1:], strict=True))
        remaining = n - len(out)
        positions = list(range(k))
        if remaining < k:  # last, cut family: least-used positions first
            positions = sorted(positions, key=lambda p: (counts[p], rng.random()))[:remaining]
            positions.sort()
        for p in positions:
            pairs = others[:p] + [q_pair] + others[p:]
            o_seq, l_seq = [o for o, _ in pairs], [l for _, l in pairs]
            text, o_spans, l_spans = binding_prompt(
                o_seq, l_seq, q_pair[0], chat=cfg.chat, answer_prefix=cfg.answer_prefix
            )
            rest = [i for i in range(k) if i != p]
            meta = _base_meta(cfg, o_seq, l_seq, o_spans, l_spans, q_pair[0])
            meta.update(
                answer_letter=q_pair[1],
                answer_index=p,
                family_id=f"{split}-{family}",
                split=split,
                index=len(out),
            )
            rec = ContrastRecord(
                text,
                _keys(cfg, o_spans, l_spans, [p]),
                _keys(cfg, o_spans, l_spans, rest),
                None,
                str(p),
                None,
                meta,
            )
            if rec.prompt in seen:  # pragma: no cover - families are already distinct
                raise ValueError(f"duplicate prompt in {split} set: {rec.prompt!r}")
            seen.add(rec.prompt)
            counts[p] += 1
            out.append(rec)
        family += 1
    return out


def _lexical_set(
    cfg: BindingTaskConfig, n: int, rng: random.Random, seen: set[Any], split: str
) -> list[ContrastRecord]:
    k = cfg.n_pairs
    out: list[ContrastRecord] = []
    for pair, p in enumerate(_schedule(k, n // 2, rng)):
        for _ in range(_MAX_TRIES):
            objs = rng.sample(cfg.resolved_objects(), k + 1)
            lets = rng.sample(cfg.resolved_letters(), k)
            ctx_objs, unused = objs[:k], objs[k]
            key = ("lexical", tuple(zip(ctx_objs, lets, strict=True)))
            if key not in seen:
                seen.add(key)
                break
        else:
            raise ValueError(f"could not build {n} distinct {split} prompts; lower n or n_pairs")
        bound = ctx_objs[p]
        pair_id = f"{split}-{pair}"
        for counterfactual, queried in ((False, bound), (True, unused)):
            text, o_spans, l_spans = binding_prompt(
                ctx_objs, lets, queried, chat=cfg.chat, answer_prefix=cfg.answer_prefix
            )
            keys = _keys(cfg, o_spans, l_spans, [p])
            meta = _base_meta(cfg, ctx_objs, lets, o_spans, l_spans, queried)
            meta.update(
                answer_letter=None if counterfactual else lets[p],
                answer_index=None if counterfactual else p,
                key_index=p,
                key_letter=lets[p],
                key_object=bound,
                unused_object=unused,
                counterfactual=counterfactual,
                pair_id=pair_id,
                split=split,
                index=len(out),
            )
            pos, neg = ((), keys) if counterfactual else (keys, ())
            rec = ContrastRecord(text, pos, neg, None, bound, None, meta)
            if rec.prompt in seen:  # pragma: no cover - contexts are already distinct
                raise ValueError(f"duplicate prompt in {split} set: {rec.prompt!r}")
            seen.add(rec.prompt)
            out.append(rec)
    return out


def build_binding_records(
    cfg: BindingTaskConfig,
) -> tuple[list[ContrastRecord], list[ContrastRecord]]:
    """Seeded ``(build, heldout)`` binding records for ``cfg.design``.

    No prompt (and no order family / lexical context) is shared within or across the
    two sets; answer order positions are balanced (counts differ by at most one).
    """
    rng = random.Random(cfg.seed)
    seen: set[Any] = set()
    make = _order_set if cfg.design == "order" else _lexical_set
    build = make(cfg, cfg.n_build, rng, seen, "build")
    heldout = make(cfg, cfg.n_heldout, rng, seen, "heldout") if cfg.n_heldout else []
    return build, heldout
