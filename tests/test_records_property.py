"""Property test over random record files (seeded generator, a fixed number of cases):
random spans, names, unicode, sides, duplicates, splits and broken lines. Every case ends
either in one clear error before any heavy work, or in a complete run folder; never a
traceback, never a file outside --out.

N_CASES cases on the tiny model with cheap settings (no permutations/bootstrap, 10 random
subspaces), a quarter with --chat and a quarter with --checkpoint-every 1, about two seconds
each."""

from __future__ import annotations

import json
import random

import pytest

import qkcov.engine.contrast as contrast_mod
from qkcov.artifacts import verify_run_folder
from qkcov.cli import main
from qkcov.results import AnalysisResult
from qkcov.tasks.records import find_spans

N_CASES = 30
FLAGS = ["--heads", "L0H1", "--n-random", "20", "--n-random-downstream", "1",
         "--n-permutations", "0", "--n-bootstrap", "0", "--batch-size", "16", "--quiet",
         "--n-scan", "8", "--n-swap", "8", "--n-attribution", "4"]  # fmt: skip
WORDS = ["cat", "dog", "hen", "Ünï", "中文", "🙂", "a.b", "x", "é", "ﬁne", "naïve", "\u202eabc",
         "tab\there", "l\u2028s", "$x$", "<b>", "\\n", "0"]  # fmt: skip
NAMES = ["order", "../x", "/abs", "a/b", "a\x00b", "N" * 120, "Case", "case", "a.b", "b.c",
         "$\\frac{a}$", "É", " ", "fruit", "🙂", "con", "a:b"]  # fmt: skip
FEATURES = [None, *NAMES, "all", "null", "ceiling", "x@energy"]  # the last four are refused
GROUPS = [*NAMES, "pooled"]  # "pooled" is refused


def _prompt(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """A prompt and the [start, end) of each word in it."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
    text, spans = "", []
    for w in words:
        if text:
            text += rng.choice([" ", "  ", ", "])
        spans.append((len(text), len(text) + len(w)))
        text += w
    return text, spans


def _span(rng: random.Random, text: str, spans: list[tuple[int, int]], taken: set[int]) -> dict:
    """A span on a word not yet used in the record (``start``/``end`` or ``text`` form)."""
    i = rng.choice([i for i in range(len(spans)) if i not in taken])
    taken.add(i)
    s, e = spans[i]
    found = find_spans(text, text[s:e])
    if rng.random() < 0.4 and (s, e) in found:
        return {"text": text[s:e], "occurrence": found.index((s, e))}
    return {"start": s, "end": e, "token": rng.choice(["last", "first"])}


def _record(rng: random.Random, feature, group, split, query: str | None) -> dict:
    text, spans = _prompt(rng)
    taken = {len(spans) - 1} if query == "last" else set()
    sides = rng.choice(["both"] * 8 + ["pos", "neg"])
    rec: dict = {"prompt": text}
    n_pos = rng.randint(1, 2) if sides != "neg" else 0
    n_neg = rng.randint(1, min(2, len(spans) - n_pos - len(taken))) if sides != "pos" else 0
    rec["positives"] = [_span(rng, text, spans, taken) for _ in range(n_pos)]
    rec["negatives"] = [_span(rng, text, spans, taken) for _ in range(n_neg)]
    if query == "last":  # the query on the last word, after every key
        rec["query"] = {"start": spans[-1][0], "end": spans[-1][1]}
    elif query == "any":
        rec["query"] = _span(rng, text, spans, set())  # may sit before a key: refused
    if feature is not None:
        rec["feature"] = feature
    if group is not None:
        rec["group"] = group
    if split is not None:
        rec["meta"] = {"split": split}
    if rng.random() < 0.05:
        rec["system"] = rng.choice(WORDS)
    return rec


BROKEN = [
    lambda rec, rng: {**rec, "positives": [], "negatives": []},  # no span at all
    lambda rec, rng: {**rec, "negatives": rec["positives"]},  # overlapping sides
    lambda rec, rng: {**rec, "positives": [{"start": 3, "end": 2}]},
    lambda rec, rng: {**rec, "positives": [{"start": 0, "end": 999}]},
    lambda rec, rng: {**rec, "positives": [{"text": "absent-word"}]},
    lambda rec, rng: {**rec, "feature": ""},
    lambda rec, rng: {**rec, "group": 3},
    lambda rec, rng: {**rec, "extra": 1},
]


def _record_file(rng: random.Random) -> list[str]:
    features = rng.sample(FEATURES, rng.randint(1, 2)) if rng.random() < 0.6 else [None]
    groups = rng.sample(GROUPS, rng.randint(1, 3)) if rng.random() < 0.5 else [None]
    if rng.random() < 0.05:
        groups.append(None)  # some records with a group, some without: refused
    pin = rng.random()
    query = rng.choice([None] * 16 + ["last"] * 3 + ["any"])
    recs = []
    for i in range(rng.randint(8, 24)):
        split = None
        if pin < 0.2:
            split = "heldout" if i % 3 == 0 else "build"
        elif pin < 0.25:
            split = rng.choice(["build", "heldout", None, "train"])
        recs.append(_record(rng, rng.choice(features), rng.choice(groups), split, query))
    if rng.random() < 0.3:  # duplicates
        recs += rng.sample(recs, rng.randint(1, len(recs)))
    if rng.random() < 0.15:
        i = rng.randrange(len(recs))
        recs[i] = rng.choice(BROKEN)(recs[i], rng)
    lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in recs]
    r = rng.random()
    if r < 0.04:
        lines.insert(rng.randrange(len(lines)), '{"prompt": "broken')
    elif r < 0.08:
        lines[0] = lines[0].replace('"prompt": "', '"prompt": "\\ud83d', 1)  # lone surrogate
    elif r < 0.1:
        lines.append("[" * 5000 + "]" * 5000)
    elif r < 0.13:
        lines.insert(rng.randrange(len(lines)), "")  # blank lines are skipped
    return lines


@pytest.mark.parametrize("case", range(N_CASES))
def test_random_record_files_end_cleanly(case, tiny_dir, tmp_path, monkeypatch, capsys):
    rng = random.Random(1000 + case)
    data = tmp_path / "records.jsonl"
    data.write_text("\n".join(_record_file(rng)) + "\n", encoding="utf-8")
    ran = []
    real = contrast_mod.run_contrast

    def counted(*args, **kw):
        ran.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(contrast_mod, "run_contrast", counted)
    out = tmp_path / "runs" / "out"
    flags = [*FLAGS]
    if rng.random() < 0.25:
        flags.append("--chat")  # the tiny tokenizer has a chat template
    if rng.random() < 0.25:
        flags += ["--checkpoint-every", "1"]  # checkpoints beside --out, removed at the end
    rc = main(["run", "--data", str(data), "--model", str(tiny_dir), "--out", str(out), *flags])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert rc in (0, 2), captured.err
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")}
    assert all(f == "records.jsonl" or f.startswith("runs") for f in files), files
    if rc == 2:
        err = captured.err.strip()
        assert err.startswith("qkcov run: error: "), err
        # a file's record errors come as one list; any other error is one line
        assert len(err.splitlines()) == 1 or "invalid record line(s)" in err, err
        assert not ran, f"refused only after the ΔC pass: {err}"
        assert not out.exists() and {f for f in files if f.startswith("runs/")} == set()
    else:
        verify_run_folder(out)
        loaded = AnalysisResult.load(out)
        lines = data.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028
        assert loaded.n_records == sum(1 for line in lines if line.strip())
        assert {f for f in files if f.startswith("runs/")} >= {"runs/out", "runs/out/run.json"}
        assert all(f.startswith("runs/out") for f in files if f.startswith("runs/"))
