"""Hypotheses about what an attention head reads, from tokens alone (``qkcov explain``).

A hypothesis is a relation between a query position and a key position of one token
sequence: :meth:`Hypothesis.mask` gives a boolean ``[S, S]`` matrix (query rows, key
columns) of the pairs that satisfy it. The engine keeps only causal pairs (key ≤ query), and
the first position only for ``first-token`` (``first_key=True``): the sink's key is an
outlier that every head reads, and as a negative of every other hypothesis it would make
their mean key differences point at it.
Positives of a hypothesis are the keys satisfying it; negatives the other causal keys —
matched in query–key offset to the positives unless the hypothesis is itself positional
(``positional=True``; see :mod:`qkcov.core.explain`).

Built-in names (fixed; they are the names in ``explain.json``):

============== ===========================================================================
previous-token key = query − 1 (positional)
offset:a-b     a ≤ query − key ≤ b (positional), e.g. ``offset:2-4``
same-token     the key's token equals the query's (earlier keys)
induction      the key follows an earlier occurrence of the query's token
first-token    the key is the sequence's first token (the sink; positional)
same-word      an earlier sub-word piece of the query's own word
delimiter      keys that are punctuation or hold a newline
capitalised    keys whose token starts with an upper-case letter
number         keys whose token holds a digit
============== ===========================================================================

Your own: :meth:`Hypothesis.from_predicate` (``fn(query: TokenRef, key: TokenRef) -> bool``)
in Python, or on the command line :func:`parse_hypothesis_spec`, e.g.
``'fruit-key:key@fruits'``, ``'caps-after-the:query~^[Tt]he$;key~^[A-Z]'`` or
``'same-cat:same-category'`` (conditions joined by ``;``; ``SIDE~REGEX`` searches the
token's whole word, ``SIDE@CATEGORY`` asks that the word is in a task vocabulary category —
:data:`qkcov.tasks.vocab.CATEGORIES` or ``names`` — and ``same-category`` that query and key
words share a category).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .corpus import NAMES
from .vocab import BINDING_OBJECTS, CATEGORIES

__all__ = [
    "TokenSeq",
    "TokenRef",
    "Hypothesis",
    "BUILTIN",
    "DEFAULT_HYPOTHESES",
    "token_seq",
    "resolve_hypotheses",
    "parse_hypothesis_spec",
    "check_hypothesis_names",
    "word_categories",
    "contrast_records",
]

DEFAULT_HYPOTHESES = (
    "previous-token",
    "offset:2-4",
    "offset:5-16",
    "same-token",
    "induction",
    "first-token",
    "same-word",
    "delimiter",
    "capitalised",
    "number",
)

_OFFSET = re.compile(r"^offset:(\d+)-(\d+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


def word_categories() -> dict[str, str]:
    """Lower-cased word → category name (the task vocabularies, ``names``, ``objects``)."""
    out: dict[str, str] = {}
    for cat in CATEGORIES.values():
        for w in cat.words:
            out.setdefault(w.lower(), cat.name)
    for w in NAMES:
        out.setdefault(w.lower(), "names")
    for w in BINDING_OBJECTS:
        out.setdefault(w.lower(), "objects")
    return out


_CATS = word_categories()
_CAT_NAMES = sorted({*CATEGORIES, "names", "objects"})


@dataclass(frozen=True)
class TokenSeq:
    """One token sequence of the corpus.

    ``ids [S]`` token ids; ``pieces`` each token's text (with its leading space);
    ``words`` the word index of each token (a word = pieces joined without whitespace,
    punctuation on its own); ``word_text`` the stripped text of each token's word;
    ``categories`` each token's word category (or ``None``); ``doc`` / ``start`` the
    document it comes from and its first token's index there; ``offsets`` char spans in
    that document.
    """

    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    words: tuple[int, ...]
    word_text: tuple[str, ...]
    categories: tuple[str | None, ...]
    doc: int = 0
    start: int = 0
    offsets: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def _alnum_start(s: str) -> bool:
    return bool(s) and s[0].isalnum()


def token_seq(
    text: str,
    ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    *,
    doc: int = 0,
    start: int = 0,
) -> TokenSeq:
    """A :class:`TokenSeq` from a document's ids and char offsets (tokens only)."""
    if len(ids) != len(offsets):
        raise ValueError(f"{len(ids)} ids but {len(offsets)} offsets")
    pieces = [text[a:b] for a, b in offsets]
    words: list[int] = []
    w = -1
    prev = ""
    for i, (piece, (a, _b)) in enumerate(zip(pieces, offsets, strict=True)):
        lead_space = (a > 0 and text[a - 1].isspace()) or (piece[:1].isspace())
        core = piece.strip()
        new = (
            i == 0
            or lead_space
            or not core
            or not _alnum_start(core)
            or not (prev and prev[-1].isalnum())
        )
        if new:
            w += 1
        words.append(w)
        prev = core if core else " "
    spans: dict[int, list[int]] = {}
    for i, wi in enumerate(words):
        spans.setdefault(wi, []).append(i)
    texts = {wi: "".join(pieces[i] for i in idx).strip() for wi, idx in spans.items()}
    word_text = tuple(texts[wi] for wi in words)
    cats = tuple(_CATS.get(t.lower()) for t in word_text)
    return TokenSeq(
        tuple(int(x) for x in ids), tuple(pieces), tuple(words), word_text, cats,
        doc, start, tuple((int(a), int(b)) for a, b in offsets),
    )  # fmt: skip


class TokenRef(NamedTuple):
    """What a user predicate sees of one position: index, token id, token text (stripped),
    the word it belongs to (stripped), that word's category (or ``None``)."""

    pos: int
    id: int
    text: str
    word: str
    category: str | None


def _pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(n)
    return r[:, None].expand(n, n), r[None, :].expand(n, n)


@dataclass(frozen=True)
class Hypothesis:
    """A named query–key relation. ``fn(seq) -> bool [S, S]`` (query rows, key columns)."""

    name: str
    fn: Callable[[TokenSeq], torch.Tensor] = field(repr=False)
    positional: bool = False
    description: str = ""
    first_key: bool = False  # may the first position be a key (positive or negative)?
    relational: bool = False  # a match between query and key (ΔC of centred queries)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"hypothesis name {self.name!r}: expected 1-64 characters from letters, "
                "digits and _ . : + - (starting with a letter or digit)"
            )

    def mask(self, seq: TokenSeq) -> torch.Tensor:
        """``[S, S]`` bool; any error becomes one line naming the hypothesis."""
        n = len(seq)
        try:
            m = self.fn(seq)
        except Exception as err:  # a user predicate: say which one failed, and where
            raise ValueError(
                f"hypothesis {self.name!r} raised {type(err).__name__}: {err} (document {seq.doc})"
            ) from None
        if not isinstance(m, torch.Tensor) or m.shape != (n, n):
            got = list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"hypothesis {self.name!r}: mask must be [{n}, {n}], got {got}")
        return m.bool()

    @classmethod
    def from_predicate(
        cls,
        name: str,
        fn: Callable[[TokenRef, TokenRef], bool],
        description: str = "",
        relational: bool = False,
    ) -> Hypothesis:
        """A hypothesis from ``fn(query, key) -> bool`` over :class:`TokenRef` pairs
        (called for every causal pair, key ≤ query); ``relational=True`` when it matches the
        key to the query (its ΔC then uses centred queries)."""
        if not callable(fn):
            raise ValueError(f"hypothesis {name!r}: the predicate must be callable")

        def mask(seq: TokenSeq) -> torch.Tensor:
            refs = [
                TokenRef(i, seq.ids[i], seq.pieces[i].strip(), seq.word_text[i], seq.categories[i])
                for i in range(len(seq))
            ]
            n = len(seq)
            out = torch.zeros(n, n, dtype=torch.bool)
            for qi in range(n):
                for ki in range(qi + 1):
                    if fn(refs[qi], refs[ki]):
                        out[qi, ki] = True
            return out

        return cls(name, mask, False, description or "user predicate", relational=relational)

    def check(self) -> None:
        """Run the hypothesis on a tiny synthetic sequence (before any model loads), so a
        predicate that raises is one line naming it."""
        seq = token_seq("The cat, the Cat 42.", [1, 2, 3, 4, 5, 6, 7], [
            (0, 3), (3, 7), (7, 8), (8, 12), (12, 16), (16, 19), (19, 20)])  # fmt: skip
        self.mask(seq)


# --------------------------------------------------------------------------- built-ins
def _ids(seq: TokenSeq) -> torch.Tensor:
    return torch.tensor(seq.ids, dtype=torch.long)


def _key_flag(flag: Callable[[str], bool]) -> Callable[[TokenSeq], torch.Tensor]:
    def fn(seq: TokenSeq) -> torch.Tensor:
        col = torch.tensor([flag(p) for p in seq.pieces], dtype=torch.bool)
        return col[None, :].expand(len(seq), len(seq)).clone()

    return fn


def _offset(a: int, b: int) -> Callable[[TokenSeq], torch.Tensor]:
    def fn(seq: TokenSeq) -> torch.Tensor:
        q, k = _pairs(len(seq))
        d = q - k
        return (d >= a) & (d <= b)

    return fn


def _same_token(seq: TokenSeq) -> torch.Tensor:
    ids = _ids(seq)
    q, k = _pairs(len(seq))
    return (ids[:, None] == ids[None, :]) & (k < q)


def _induction(seq: TokenSeq) -> torch.Tensor:
    ids = _ids(seq)
    prev = torch.cat([torch.tensor([-1]), ids[:-1]])  # token before each key
    q, k = _pairs(len(seq))
    return (ids[:, None] == prev[None, :]) & (k >= 1) & (k < q)


def _first(seq: TokenSeq) -> torch.Tensor:
    """The first key, for every query after it: the first query can attend only to itself,
    so its attention (always 1) says nothing about the head, and the gate leaves it out too."""
    q, k = _pairs(len(seq))
    return (k == 0) & (q > 0)


def _same_word(seq: TokenSeq) -> torch.Tensor:
    w = torch.tensor(seq.words, dtype=torch.long)
    q, k = _pairs(len(seq))
    return (w[:, None] == w[None, :]) & (k < q)


def _is_delim(p: str) -> bool:
    return "\n" in p or (bool(p.strip()) and not any(c.isalnum() for c in p))


BUILTIN: dict[str, Hypothesis] = {
    h.name: h
    for h in (
        Hypothesis("previous-token", _offset(1, 1), True, "key = query − 1"),
        Hypothesis(
            "same-token",
            _same_token,
            False,
            "the key's token equals the query's",
            relational=True,
        ),  # fmt: skip
        Hypothesis(
            "induction",
            _induction,
            False,
            "the key follows an earlier occurrence of the query's token",
            relational=True,
        ),  # fmt: skip
        Hypothesis("first-token", _first, True, "the first position (the sink)", True),
        Hypothesis(
            "same-word",
            _same_word,
            False,
            "earlier pieces of the query's own word",
            relational=True,
        ),  # fmt: skip
        Hypothesis("delimiter", _key_flag(_is_delim), False, "punctuation and newline keys"),
        Hypothesis(
            "capitalised",
            _key_flag(lambda p: p.strip()[:1].isupper()),
            False,
            "keys starting with an upper-case letter",
        ),  # fmt: skip
        Hypothesis(
            "number",
            _key_flag(lambda p: any(c.isdigit() for c in p)),
            False,
            "keys holding a digit",
        ),  # fmt: skip
    )
}


def _offset_hypothesis(name: str) -> Hypothesis | None:
    m = _OFFSET.match(name)
    if m is None:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if not 1 <= a <= b:
        raise ValueError(f"hypothesis {name!r}: expected offset:a-b with 1 <= a <= b")
    return Hypothesis(name, _offset(a, b), True, f"{a} ≤ query − key ≤ {b}")


def _known() -> str:
    return ", ".join([*BUILTIN, "offset:a-b"])


def check_hypothesis_names(names: Sequence[str]) -> None:
    """One line for an unknown or duplicated built-in name (no model needed)."""
    resolve_hypotheses(names)


# --------------------------------------------------------------------------- user specs
_COND = re.compile(r"^(query|key)(~|@)(.+)$", re.DOTALL)


def parse_hypothesis_spec(spec: str) -> Hypothesis:
    """``NAME:COND[;COND...]`` → :class:`Hypothesis` (see the module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"--hypothesis {spec!r}: expected NAME:COND[;COND...], COND one of key~REGEX, "
            "query~REGEX, key@CATEGORY, query@CATEGORY, same-category"
        )
    name, _, body = spec.partition(":")
    name = name.strip()
    if name in BUILTIN or _OFFSET.match(name):
        raise ValueError(f"--hypothesis {spec!r}: {name!r} is a built-in name; pick another")
    conds: list[tuple[str, str, Any]] = []
    for raw in body.split(";"):
        c = raw.strip()
        if not c:
            continue
        if c == "same-category":
            conds.append(("both", "same", None))
            continue
        m = _COND.match(c)
        if m is None:
            raise ValueError(
                f"--hypothesis {spec!r}: condition {c!r} is not key~REGEX, query~REGEX, "
                "key@CATEGORY, query@CATEGORY or same-category"
            )
        side, op, arg = m.group(1), m.group(2), m.group(3)
        if op == "~":
            try:
                conds.append((side, "re", re.compile(arg)))
            except re.error as err:
                raise ValueError(f"--hypothesis {spec!r}: bad regex {arg!r} ({err})") from None
        else:
            if arg not in _CAT_NAMES:
                raise ValueError(
                    f"--hypothesis {spec!r}: unknown category {arg!r}; expected one of "
                    f"{', '.join(_CAT_NAMES)}"
                )
            conds.append((side, "cat", arg))
    if not conds:
        raise ValueError(f"--hypothesis {spec!r}: no condition after {name + ':'!r}")

    def fn(seq: TokenSeq) -> torch.Tensor:
        n = len(seq)
        out = torch.ones(n, n, dtype=torch.bool)
        for side, op, arg in conds:
            if op == "same":
                cats = seq.categories
                names = {c for c in cats if c is not None}
                code = {c: i for i, c in enumerate(sorted(names))}
                v = torch.tensor([code.get(c, -1) if c else -1 for c in cats], dtype=torch.long)
                w = torch.tensor(seq.words, dtype=torch.long)
                out &= (v[:, None] == v[None, :]) & (v[:, None] >= 0)
                out &= w[:, None] != w[None, :]
                continue
            if op == "re":
                flag = torch.tensor([bool(arg.search(t)) for t in seq.word_text], dtype=torch.bool)
            else:
                flag = torch.tensor([c == arg for c in seq.categories], dtype=torch.bool)
            out &= flag[:, None] if side == "query" else flag[None, :]
        return out

    relational = any(op == "same" for _, op, _ in conds)
    return Hypothesis(name, fn, False, f"user: {body.strip()}", relational=relational)


def resolve_hypotheses(
    names: Sequence[str | Hypothesis] | None = None, specs: Sequence[str] = ()
) -> list[Hypothesis]:
    """Built-in names (default :data:`DEFAULT_HYPOTHESES`), :class:`Hypothesis` objects and
    CLI specs → hypotheses; unknown or duplicate names are one line each."""
    items: list[str | Hypothesis] = list(DEFAULT_HYPOTHESES if names is None else names)
    out: list[Hypothesis] = []
    for item in items:
        if isinstance(item, Hypothesis):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise ValueError(
                f"hypothesis {item!r}: expected a name or a qkcov.Hypothesis, got "
                f"{type(item).__name__}"
            )
        name = item.strip()
        h = BUILTIN.get(name) or _offset_hypothesis(name)
        if h is None:
            raise ValueError(f"unknown hypothesis {name!r}; known: {_known()}")
        out.append(h)
    out.extend(parse_hypothesis_spec(s) for s in specs)
    seen: set[str] = set()
    for h in out:
        if h.name in seen:
            raise ValueError(f"hypothesis {h.name!r} is given twice")
        seen.add(h.name)
    if not out:
        raise ValueError("no hypotheses to test; give at least one name")
    return out


# --------------------------------------------------------------------------- records
def contrast_records(
    texts: Sequence[str],
    seqs: Sequence[TokenSeq],
    masks: Sequence[torch.Tensor],
    index: int,
    *,
    positional: bool,
    n: int = 120,
    n_negatives: int = 3,
    seed: int = 0,
    kind: str | None = None,
) -> list[Any]:
    """Contrast records for hypothesis ``index`` of ``masks`` (``[N, S, S]`` per sequence):
    the prompt is the document up to a query token that has a positive key; positives are its
    keys satisfying the hypothesis, negatives up to ``n_negatives`` keys that don't — the ones
    nearest in offset to a positive unless the hypothesis is positional (then drawn at random).
    Only sequences that start their document are used (the spans index the document text).
    ``kind``: the records' feature kind (``"relation"`` for a match between query and key,
    ``"class"`` otherwise), which picks the verdict's label-sensitive test."""
    import random

    from .records import ContrastRecord, Span

    rng = random.Random(seed)
    cands = []
    for s, m in zip(seqs, masks, strict=True):
        if s.start != 0 or not s.offsets:
            continue
        pos = m[index]
        real = [b > a for a, b in s.offsets]  # special tokens have no characters
        for q in range(2, len(s)):
            keys = [k for k in pos[q, :q].nonzero().flatten().tolist() if k >= 1 and real[k]]
            others = [k for k in range(1, q) if k not in keys and real[k]]
            if keys and others:
                cands.append((s, q, keys, others))
    rng.shuffle(cands)
    out: list[Any] = []
    for s, q, keys, others in cands[:n]:
        if positional:
            neg = rng.sample(others, min(n_negatives, len(others)))
        else:
            near = sorted(others, key=lambda k: min(abs(k - p) for p in keys))
            neg = near[:n_negatives]
        text = texts[s.doc]
        span = lambda i, s=s: Span(s.offsets[i][0], s.offsets[i][1])  # noqa: E731
        out.append(
            ContrastRecord(
                prompt=text[: s.offsets[q][1]],
                positives=tuple(span(k) for k in sorted(keys)),
                negatives=tuple(span(k) for k in sorted(neg)),
                meta={"document": s.doc, "query": q},
                kind=kind,
            )
        )
    return out
