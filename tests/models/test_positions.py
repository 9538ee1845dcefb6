import pytest

from qkcov.models.loading import format_prompt
from qkcov.models.positions import encode, find_span, find_spans


def test_find_span_char_level(tok):
    text = "the cat and the dog"
    span = find_span(tok, text, "the", occurrence="last")
    assert (span.first, span.last, span.char_start, span.char_end) == (12, 14, 12, 15)
    assert find_span(tok, text, "the").first == 0
    assert find_span(tok, text, "dog").last == len(text) - 1
    assert find_span(tok, text, "the", start_char=1).first == 12
    spans = find_spans(tok, text, ["the", "the"])
    assert [s.first for s in spans] == [0, 12]


def test_find_span_errors(tok):
    with pytest.raises(ValueError, match="'zebra' not found"):
        find_span(tok, "the cat", "zebra")
    with pytest.raises(ValueError, match="occurrence 2"):
        find_span(tok, "the cat", "t", occurrence=2)
    with pytest.raises(ValueError, match="empty"):
        find_span(tok, "the cat", "")


def test_chat_template_positions(tok):
    text = format_prompt(tok, "pick the fruit")
    assert text.startswith("<|user|>") and text.endswith("<|assistant|>")
    ids, offsets = encode(tok, text)
    span = find_span(tok, text, "fruit")
    assert text[offsets[span.first][0] : offsets[span.last][1]] == "fruit"
    assert tok.convert_ids_to_tokens(ids[0]) == "<|user|>"


def test_format_prompt_without_template(tok):
    assert format_prompt(tok, "plain", chat=False) == "plain"
    saved = tok.chat_template
    try:
        tok.chat_template = None
        with pytest.raises(ValueError, match="no chat template"):
            format_prompt(tok, "x", chat=True)
    finally:
        tok.chat_template = saved
