"""Categorical ("filter head") task, METHOD §4.

Prompt (plain mode)::

    Here is a list of items:
    - apple
    - horse
    - banana
    - car

    What are the fruits in the list?
    Answer:

The question is "What are the <plural> in the list?" (``template="all"``) or "What is
the first/last <singular> in the list?". In plain mode the prompt ends with
``answer_prefix`` ("Answer:") so the last token — the query position — is the one whose
next token is the answer's first item; with ``chat=True`` the prompt ends at the question
and the query is the last token of the chat template (the assistant header), added later.
``meta["answer_items"]`` holds the items of a correct answer in order (for ``"all"`` every
asked item in list order; for ``"first"``/``"last"`` the one item), ``meta["answer"]``
its first word, for the downstream log-prob metric.

Keys are the last token of each item. Positives: items of the asked category; negatives:
the other items; ``group`` = the asked category (one ΔC per category).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import ConfigMixin, check_positive_int
from .records import ContrastRecord, Span, find_spans
from .vocab import CATEGORIES, Category

__all__ = [
    "FilterTaskConfig",
    "build_filter_records",
    "make_filter_record",
    "filter_question",
    "check_words_tokenize",
    "TEMPLATES",
]

TEMPLATES = ("all", "first", "last")
_HEADER = "Here is a list of items:\n"
_MAX_TRIES = 500


@dataclass
class FilterTaskConfig(ConfigMixin):
    """Settings of the categorical task.

    Args:
        categories: category names to use (``None`` = all of the vocabulary).
        n_categories_per_prompt: categories listed in one prompt (the asked one included).
        items_per_category: items of each listed category.
        template: ``"all"`` | ``"first"`` | ``"last"`` (see module docstring).
        chat: prompts are meant for chat templating (no ``answer_prefix`` line).
        answer_prefix: last line of plain prompts (ignored when ``chat``).
        seed: RNG seed; the same config gives the same records.
        n_build: records used to estimate ΔC (at least one per category).
        n_heldout: held-out records (0, or at least one per category).
        vocabulary: replaces the built-in vocabulary:
            ``{name: {"singular": str, "plural": str, "words": [str, ...]}}``.
    """

    categories: tuple[str, ...] | None = None
    n_categories_per_prompt: int = 3
    items_per_category: int = 2
    template: str = "all"
    chat: bool = False
    answer_prefix: str = "Answer:"
    seed: int = 0
    n_build: int = 240
    n_heldout: int = 60
    vocabulary: dict[str, dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {list(TEMPLATES)}, got {self.template!r}")
        if not isinstance(self.chat, bool):
            raise ValueError(f"chat must be a bool, got {self.chat!r}")
        if not isinstance(self.answer_prefix, str):
            raise ValueError(f"answer_prefix must be a string, got {self.answer_prefix!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.categories is not None:
            if isinstance(self.categories, str):
                raise ValueError("categories must be a list of names, not one string")
            self.categories = tuple(self.categories)
        pool = self.resolved_categories()
        if len(pool) < 2:
            raise ValueError(
                f"need at least 2 categories to contrast, got {len(pool)}: {[c.name for c in pool]}"
            )
        check_positive_int("n_categories_per_prompt", self.n_categories_per_prompt, 2)
        if self.n_categories_per_prompt > len(pool):
            raise ValueError(
                f"n_categories_per_prompt ({self.n_categories_per_prompt}) exceeds the number "
                f"of categories ({len(pool)})"
            )
        check_positive_int("items_per_category", self.items_per_category, 1)
        smallest = min(pool, key=lambda c: len(c.words))
        if self.items_per_category > len(smallest.words):
            raise ValueError(
                f"items_per_category ({self.items_per_category}) is too large: category "
                f"{smallest.name!r} has only {len(smallest.words)} words"
            )
        check_positive_int("n_build", self.n_build, 1)
        if self.n_build < len(pool):
            raise ValueError(
                f"n_build ({self.n_build}) is smaller than the number of categories "
                f"({len(pool)}); every category needs at least one record"
            )
        check_positive_int("n_heldout", self.n_heldout, 0)
        if 0 < self.n_heldout < len(pool):
            raise ValueError(
                f"n_heldout ({self.n_heldout}) is smaller than the number of categories "
                f"({len(pool)}); use 0 or at least {len(pool)}"
            )

    def vocabulary_categories(self) -> dict[str, Category]:
        """The vocabulary in use (built-in unless ``vocabulary`` is given), validated."""
        if self.vocabulary is None:
            return dict(CATEGORIES)
        return _parse_vocabulary(self.vocabulary)

    def resolved_categories(self) -> list[Category]:
        """The categories prompts draw from, validated against the vocabulary."""
        vocab = self.vocabulary_categories()
        if self.categories is None:
            return list(vocab.values())
        names = list(self.categories)
        bad = [n for n in names if not isinstance(n, str) or n not in vocab]
        if bad:
            raise ValueError(f"unknown category {bad}; valid categories: {list(vocab)}")
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"categories listed more than once: {dups}")
        return [vocab[n] for n in names]


def _parse_vocabulary(raw: Mapping[str, Any]) -> dict[str, Category]:
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError("vocabulary must be a non-empty mapping of category name -> spec")
    out: dict[str, Category] = {}
    owner: dict[str, str] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"vocabulary: empty or non-string category name {name!r}")
        if not isinstance(spec, Mapping) or not {"singular", "plural", "words"} <= set(spec):
            raise ValueError(
                f"vocabulary[{name!r}] must have 'singular', 'plural' and 'words', got {spec!r}"
            )
        for key in ("singular", "plural"):
            if not isinstance(spec[key], str) or not spec[key].strip():
                raise ValueError(f"vocabulary[{name!r}].{key} must be a non-empty string")
        words = spec["words"]
        if isinstance(words, str) or not isinstance(words, Iterable):
            raise ValueError(f"vocabulary[{name!r}].words must be a list of words")
        words = list(words)
        for w in words:
            if not isinstance(w, str) or not w.strip():
                raise ValueError(f"vocabulary[{name!r}]: empty word {w!r}")
            if w != w.strip() or "\n" in w:
                raise ValueError(
                    f"vocabulary[{name!r}]: word {w!r} has surrounding whitespace or a newline"
                )
            key = w.lower()
            if key in owner:
                where = "twice in" if owner[key] == name else f"in both {owner[key]!r} and"
                raise ValueError(f"vocabulary: word {w!r} appears {where} {name!r}")
            owner[key] = name
        out[name] = Category(name, spec["singular"], spec["plural"], tuple(words))
    return out


def filter_question(category: Category, template: str) -> str:
    """The question line for ``category`` under ``template``."""
    if template == "all":
        return f"What are the {category.plural} in the list?"
    if template in ("first", "last"):
        return f"What is the {template} {category.singular} in the list?"
    raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}")


def _substring_conflict(words: Sequence[str]) -> tuple[str, str] | None:
    low = [w.lower() for w in words]
    for i, a in enumerate(low):
        for j, b in enumerate(low):
            if i != j and a in b:
                return words[i], words[j]
    return None


def make_filter_record(
    items: Sequence[tuple[str, str]],
    asked: str,
    categories: Mapping[str, Category],
    *,
    template: str = "all",
    chat: bool = False,
    answer_prefix: str = "Answer:",
) -> ContrastRecord:
    """One filter record from ``items`` = ``[(word, category_name), ...]`` in list order.

    Raises ``ValueError`` if the asked category has no item or only items, if an item is a
    substring of another, or if an item is not exactly one whole-word span of the prompt.
    """
    if asked not in categories:
        raise ValueError(f"unknown category {asked!r}; valid categories: {list(categories)}")
    words = [w for w, _ in items]
    for w, c in items:
        if not isinstance(w, str) or not w.strip():
            raise ValueError(f"empty word {w!r} in items")
        if c not in categories:
            raise ValueError(f"unknown category {c!r}; valid categories: {list(categories)}")
    conflict = _substring_conflict(words)
    if conflict:
        raise ValueError(f"item {conflict[0]!r} is a substring of item {conflict[1]!r}")
    cat = categories[asked]
    text = _HEADER
    spans: list[tuple[str, str, int, int]] = []
    for w, c in items:
        text += "- "
        spans.append((w, c, len(text), len(text) + len(w)))
        text += w + "\n"
    text += "\n" + filter_question(cat, template)
    prefix = "" if chat else answer_prefix
    if prefix:
        text += "\n" + prefix
    for w, _, s, e in spans:
        found = find_spans(text, w, ignore_case=True)
        if found != [(s, e)]:
            raise ValueError(
                f"item {w!r} is not a single span of the prompt ({len(found)} occurrences)"
            )
    pos = [Span(s, e, "last", w) for w, c, s, e in spans if c == asked]
    neg = [Span(s, e, "last", w) for w, c, s, e in spans if c != asked]
    if not pos or not neg:
        raise ValueError(f"need items both in and outside the asked category {asked!r}")
    asked_words = [w for w, c, _, _ in spans if c == asked]
    answer = {"all": asked_words, "first": asked_words[:1], "last": asked_words[-1:]}[template]
    meta = {
        "task": "filter",
        "category": asked,
        "category_singular": cat.singular,
        "category_plural": cat.plural,
        "template": template,
        "chat": chat,
        "answer_prefix": prefix,
        "answer_items": answer,
        "answer": answer[0],
        "categories": sorted({c for _, c in items}),
        "items": [{"word": w, "category": c, "start": s, "end": e} for w, c, s, e in spans],
    }
    return ContrastRecord(text, tuple(pos), tuple(neg), None, asked, None, meta)


def _build_set(
    cfg: FilterTaskConfig,
    vocab: Mapping[str, Category],
    pool: Sequence[Category],
    n: int,
    rng: random.Random,
    seen: set[str],
    split: str,
) -> list[ContrastRecord]:
    names = [c.name for c in pool]
    schedule: list[str] = []
    while len(schedule) < n:
        cycle = list(names)
        rng.shuffle(cycle)
        schedule.extend(cycle)
    out: list[ContrastRecord] = []
    for idx, asked in enumerate(schedule[:n]):
        for _ in range(_MAX_TRIES):
            others = rng.sample([m for m in names if m != asked], cfg.n_categories_per_prompt - 1)
            items = [
                (w, c)
                for c in [asked, *others]
                for w in rng.sample(vocab[c].words, cfg.items_per_category)
            ]
            if _substring_conflict([w for w, _ in items]):
                continue
            rng.shuffle(items)
            rec = make_filter_record(
                items,
                asked,
                vocab,
                template=cfg.template,
                chat=cfg.chat,
                answer_prefix=cfg.answer_prefix,
            )
            if rec.prompt in seen:
                continue
            seen.add(rec.prompt)
            rec.meta.update({"split": split, "index": idx, "seed": cfg.seed})
            out.append(rec)
            break
        else:
            raise ValueError(
                f"could not build {n} distinct {split} prompts asking about {asked!r}; "
                "lower n_build/n_heldout or use more categories/words"
            )
    return out


def build_filter_records(
    cfg: FilterTaskConfig,
) -> tuple[list[ContrastRecord], list[ContrastRecord]]:
    """Seeded ``(build, heldout)`` filter records.

    Asked categories are balanced (counts differ by at most one within each set) and no
    prompt repeats within or across the two sets.
    """
    vocab = cfg.vocabulary_categories()
    pool = cfg.resolved_categories()
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    build = _build_set(cfg, vocab, pool, cfg.n_build, rng, seen, "build")
    heldout = _build_set(cfg, vocab, pool, cfg.n_heldout, rng, seen, "heldout")
    return build, heldout


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            ids = tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tokenizer.encode(text)
    else:
        try:
            out = tokenizer(text, add_special_tokens=False)
        except TypeError:
            out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, Mapping) else out.input_ids
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return list(ids)


def check_words_tokenize(
    tokenizer: Any, words: Iterable[str], *, max_tokens: int | None = None
) -> dict[str, int]:
    """Token count of each word (encoded alone, without special tokens).

    Raises one ``ValueError`` naming every word that tokenises to nothing (or to more
    than ``max_tokens`` tokens). ``tokenizer`` needs ``encode`` or ``__call__``.
    """
    counts: dict[str, int] = {}
    empty: list[str] = []
    long: list[str] = []
    for w in words:
        n = len(_encode(tokenizer, w)) if isinstance(w, str) and w.strip() else 0
        counts[w] = n
        if n == 0:
            empty.append(w)
        elif max_tokens is not None and n > max_tokens:
            long.append(f"{w!r} ({n} tokens)")
    problems = []
    if empty:
        problems.append(f"word(s) tokenising to nothing: {empty}")
    if long:
        problems.append(f"word(s) longer than {max_tokens} tokens: {long}")
    if problems:
        raise ValueError("; ".join(problems))
    return counts
