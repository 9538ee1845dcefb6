"""Token positions of strings inside a prompt, via fast-tokenizer character offsets.

Positions are unpadded token indices of the prompt encoded on its own with
:func:`encode` (the same ids :func:`qkcov.models.capture.tokenize_batch` produces).
With GPT-2-style byte-level BPE (SmolLM2, Llama-3, Qwen) a leading space belongs to the
next word's token, e.g. ``" apple"``: the span of ``"apple"`` is that one token.

One character may span several tokens (an emoji or CJK character split into byte tokens,
a sentencepiece byte fallback): every such token reports the character's offsets. A span's
``first`` token is therefore the *first* token covering its first character and its
``last`` token the *last* token covering its last character. A bare word-boundary marker
(sentencepiece's prepended ``"▁"``) that the offset mapping attributes to the next
non-space character is given empty offsets by :func:`encode`: it covers no text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TokenSpan", "encode", "find_span", "find_spans", "token_at_char"]


@dataclass(frozen=True)
class TokenSpan:
    """Tokens ``first..last`` (inclusive) cover characters ``[char_start, char_end)``."""

    first: int
    last: int
    char_start: int
    char_end: int


def _wants_special(tokenizer: Any, text: str, add_special_tokens: bool | None) -> bool:
    if add_special_tokens is not None:
        return add_special_tokens
    # Auto: a chat-templated prompt already starts with BOS; do not add a second one.
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(
    tokenizer: Any, text: str, *, add_special_tokens: bool | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and ``(char_start, char_end)`` offsets of ``text``.

    ``add_special_tokens=None`` adds the tokenizer's specials unless ``text`` already begins
    with its BOS string. Special tokens the tokenizer inserts get offset ``(0, 0)``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets need one"
        )
    enc = tokenizer(
        text,
        add_special_tokens=_wants_special(tokenizer, text, add_special_tokens),
        return_offsets_mapping=True,
    )
    ids = list(enc["input_ids"])
    offsets = [(int(o[0]), int(o[1])) for o in enc["offset_mapping"]]
    return ids, _drop_marker_offsets(tokenizer, text, ids, offsets)


_MARKERS = ("\u2581", "\u0120")  # sentencepiece "▁", byte-level BPE "Ġ"


def _drop_marker_offsets(
    tokenizer: Any, text: str, ids: list[int], offsets: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Empty the offsets of pure space-marker tokens that claim non-space text."""
    if not any(text[a:b].strip() for a, b in offsets):
        return offsets
    tokens = tokenizer.convert_ids_to_tokens(ids)
    out = []
    for tok, (a, b) in zip(tokens, offsets, strict=True):
        bare = isinstance(tok, str) and not "".join(c for c in tok if c not in _MARKERS).strip()
        out.append((a, a) if bare and b > a and text[a:b].strip() else (a, b))
    return out


def token_at_char(offsets: list[tuple[int, int]], char: int, which: str = "first") -> int:
    """The first (``which="first"``) or last (``"last"``) token whose offsets cover
    character ``char``; ``ValueError`` if none does."""
    if which not in ("first", "last"):
        raise ValueError(f"which must be 'first' or 'last', got {which!r}")
    hits = [i for i, (a, b) in enumerate(offsets) if a <= char < b]
    if not hits:
        raise ValueError(f"no token covers character {char}")
    return hits[0] if which == "first" else hits[-1]


def _occurrences(text: str, sub: str, start_char: int) -> list[int]:
    out, i = [], text.find(sub, start_char)
    while i >= 0:
        out.append(i)
        i = text.find(sub, i + 1)
    return out


def find_span(
    tokenizer: Any,
    text: str,
    substring: str,
    occurrence: int | str = 0,
    start_char: int | None = None,
    *,
    add_special_tokens: bool | None = None,
    offsets: list[tuple[int, int]] | None = None,
) -> TokenSpan:
    """Tokens covering ``substring`` in ``text`` (``first`` covers its first character,
    ``last`` its last).

    ``occurrence``: 0-based index among matches at or after ``start_char``, negative from
    the end, or ``"last"``. Pass precomputed ``offsets`` (from :func:`encode`) to avoid
    re-tokenising. Raises ``ValueError`` naming the substring when it is not in the text.
    """
    if not substring:
        raise ValueError("substring to find is empty")
    hits = _occurrences(text, substring, start_char or 0)
    if not hits:
        where = f" after character {start_char}" if start_char else ""
        raise ValueError(f"{substring!r} not found in the prompt{where}: {text[:200]!r}")
    if occurrence == "last":
        occurrence = -1
    if not isinstance(occurrence, int) or not -len(hits) <= occurrence < len(hits):
        raise ValueError(
            f"occurrence {occurrence!r} of {substring!r}: the prompt has {len(hits)} occurrence(s)"
        )
    c0 = hits[occurrence]
    c1 = c0 + len(substring)
    if offsets is None:
        offsets = encode(tokenizer, text, add_special_tokens=add_special_tokens)[1]
    return TokenSpan(
        token_at_char(offsets, c0, "first"), token_at_char(offsets, c1 - 1, "last"), c0, c1
    )


def find_spans(
    tokenizer: Any,
    text: str,
    substrings: list[str],
    *,
    add_special_tokens: bool | None = None,
    in_order: bool = True,
) -> list[TokenSpan]:
    """Spans of several substrings (tokenising once). ``in_order``: each is searched after
    the end of the previous one, so repeated words resolve left to right."""
    offsets = encode(tokenizer, text, add_special_tokens=add_special_tokens)[1]
    spans, cursor = [], 0
    for sub in substrings:
        span = find_span(tokenizer, text, sub, 0, cursor if in_order else None, offsets=offsets)
        spans.append(span)
        cursor = span.char_end if in_order else 0
    return spans
