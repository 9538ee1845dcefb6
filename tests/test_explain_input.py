"""Bad input for ``qkcov explain``, through the CLI and the API: one clear line each (exit 2,
nothing written), before the model loads wherever it can be checked then."""

from __future__ import annotations

import pytest

BAD_CLI = [
    ("empty.txt", "\n\n   \n\n", [], "is empty"),
    ("empty.jsonl", '{"text": "  "}\n\n', [], "is empty"),
    ("same.txt", "the the the\n\nthe the", [], "one word repeated ('the')"),
    (
        "ok.txt",
        None,
        ["--hypotheses", "previous-token,inductoin"],
        "unknown hypothesis 'inductoin'",
    ),
    ("ok.txt", None, ["--hypothesis", "x:key~(["], "bad regex"),
    ("ok.txt", None, ["--hypothesis", "x:key@planets"], "unknown category 'planets'"),
    ("ok.txt", None, ["--heads", "L99H0"], "out of range"),
    ("ok.txt", None, ["--heads", "L0H99"], "out of range"),
    ("ok.txt", None, ["--heads", "L0X1"], "--heads"),
    ("ok.txt", None, ["--heads", "auto:0"], "auto:K"),
]


@pytest.mark.parametrize(("name", "content", "argv", "needle"), BAD_CLI)
def test_cli_bad_input_is_one_line_before_the_model_loads(
    tiny_dir, tmp_path, capsys, monkeypatch, name, content, argv, needle
):
    import qkcov.models.loading as loading
    from qkcov.cli import main

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", no_model)
    txt = tmp_path / name
    txt.write_text("The cat sat on the mat. The cat sat.\n\nabc abc 42 abc!\n" if content is None
                   else content)  # fmt: skip
    out = tmp_path / "out"
    rc = main(["explain", "--model", str(tiny_dir), "--text", str(txt), "--out", str(out),
               "--quiet", *argv])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def _tiny():
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


def _no_forward(monkeypatch):
    import qkcov.engine.explain as engine

    def forbidden(*a, **k):
        raise AssertionError("the forward ran before the input was checked")

    monkeypatch.setattr(engine, "explain_heads", forbidden)


@pytest.mark.parametrize(
    ("texts", "hyps", "needle"),
    [
        ([], None, "is empty"),
        (["", "  "], None, "is empty"),
        (["aaaa", "aaaa aaaa"], None, "one word repeated"),
        (["ab ab", "ab"], None, "one word repeated"),
        (
            ["The cat sat.", "A zebra ran."],
            "raises-on-zebra",
            "hypothesis 'zebra' raised RuntimeError: no zebras (document 1)",
        ),  # fmt: skip
        (
            ["The cat sat.", "A dog ran."],
            "raises-always",
            "hypothesis 'bad' raised ZeroDivisionError",
        ),
        (["The cat sat.", "A dog ran."], ["inductoin"], "unknown hypothesis 'inductoin'"),
    ],
)
def test_api_bad_input_is_one_line_before_the_forward(monkeypatch, texts, hyps, needle):
    """The notebook path: a predicate that raises on the synthetic check sequence or only on a
    corpus token, an empty or one-word corpus, an unknown name: one line, no forward."""
    import qkcov
    from qkcov.tasks.hypotheses import Hypothesis

    def zebra(q, k):
        if "zebra" in k.word.lower():
            raise RuntimeError("no zebras")
        return False

    if hyps == "raises-on-zebra":
        hyps = [Hypothesis.from_predicate("zebra", zebra)]
    elif hyps == "raises-always":
        hyps = [Hypothesis.from_predicate("bad", lambda q, k: 1 / 0)]
    _no_forward(monkeypatch)
    model, tok = _tiny()
    with pytest.raises(ValueError) as err:
        qkcov.explain(model, tok, texts, hypotheses=hyps, progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_one_repeated_token_is_refused_after_tokenizing_before_the_forward(monkeypatch):
    """Words that differ but are one token repeated (here '.' and '..' of a char tokenizer)
    can only be seen once tokenized: one line, still before any forward."""
    import qkcov

    _no_forward(monkeypatch)
    model, tok = _tiny()
    with pytest.raises(ValueError, match="one repeated token") as err:
        qkcov.explain(model, tok, ["..", "...", "...."], progress=False)
    assert "\n" not in str(err.value)


def test_heads_out_of_range_in_the_api(monkeypatch):
    import qkcov

    _no_forward(monkeypatch)
    model, tok = _tiny()
    for spec in ("L9H0", "L0H99"):
        with pytest.raises(ValueError, match="out of range") as err:
            qkcov.explain(model, tok, ["The cat sat.", "A dog ran."], heads=spec, progress=False)
        assert "\n" not in str(err.value)
