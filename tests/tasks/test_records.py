"""Contrast-record schema: round trip, JSONL validation, span resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkcov.tasks.records import (
    ContrastRecord,
    Span,
    find_spans,
    load_records,
    parse_records,
    save_records,
)

PROMPT = "- apple\n- pearl\n- pear\n- horse\nWhat are the fruits in the list?"


def _record(**kw) -> ContrastRecord:
    base = dict(
        prompt=PROMPT,
        positives=(Span(2, 7, label="apple"),),
        negatives=(Span(26, 31, "first", "horse"),),
        group="fruits",
        meta={"answer": "apple", "items": [1, 2]},
    )
    base.update(kw)
    return ContrastRecord(**base)


def _write(path, objs) -> None:
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    path.write_text("\n".join(lines) + "\n")


def test_find_spans_respects_word_boundaries() -> None:
    assert find_spans(PROMPT, "pear") == [(18, 22)]
    assert find_spans("Box A, Box AB", "Box A") == [(0, 5)]
    assert find_spans("a, b, c", ",") == [(1, 2), (4, 5)]
    assert find_spans("The Apple", "apple", ignore_case=True) == [(4, 9)]


def test_round_trip_dict_and_jsonl(tmp_path) -> None:
    rec = _record(query=Span(35, 39, "first"), system="Be brief.")
    assert ContrastRecord.from_dict(rec.to_dict()) == rec
    json.dumps(rec.to_dict())  # JSON-able
    path = save_records(tmp_path / "r.jsonl", [rec, _record(group=None)])
    loaded = load_records(path)
    assert loaded == [rec, _record(group=None)]


def test_text_spans_resolve_to_intended_words(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    _write(
        path,
        [
            {
                "prompt": PROMPT,
                "positives": [{"text": "pear"}, {"text": "apple", "occurrence": -1}],
                "negatives": [{"text": "horse", "token": "first"}, {"start": 10, "end": 15}],
                "query": {"text": "list"},
                "group": "fruits",
                "meta": {"k": 1},
            },
            "",
            {"prompt": "a b", "negatives": [{"text": "b"}]},
        ],
    )
    recs = load_records(path)
    assert len(recs) == 2
    r = recs[0]
    assert [r.span_text(s) for s in r.positives] == ["pear", "apple"]
    assert [r.span_text(s) for s in r.negatives] == ["horse", "pearl"]
    assert r.negatives[0].token == "first" and r.positives[0].label == "pear"
    assert r.span_text(r.query) == "list"
    assert recs[1].positives == () and recs[1].query is None


def test_two_bad_lines_reported_and_nothing_loaded(tmp_path) -> None:
    good = {"prompt": PROMPT, "positives": [{"text": "apple"}], "negatives": [{"text": "horse"}]}
    bad_word = {
        "prompt": PROMPT,
        "positives": [{"text": "apple"}, {"text": "kiwi"}],
        "negatives": [{"text": "horse"}],
    }
    path = tmp_path / "r.jsonl"
    _write(path, [good, good, "", bad_word, good, "{not json"])
    with pytest.raises(ValueError) as exc:
        load_records(path)
    msg = str(exc.value)
    assert "line 4: positives[1]: 'kiwi' not found in prompt" in msg
    assert "line 6: invalid JSON" in msg
    assert "2 invalid record line(s)" in msg


@pytest.mark.parametrize(
    "obj, fragment",
    [
        ({"positives": [{"text": "a"}]}, "missing required key 'prompt'"),
        ({"prompt": "", "positives": []}, "prompt must be a non-empty string"),
        ({"prompt": "a b", "positives": [], "negatives": []}, "at least one positive"),
        (
            {"prompt": "a b", "positives": [{"text": "a"}], "negatives": [{"start": 0, "end": 1}]},
            "overlap",
        ),
        ({"prompt": "a b", "positives": [{"start": 0, "end": 9}]}, "exceeds the prompt length"),
        ({"prompt": "a b", "positives": [{"start": 2, "end": 2}]}, "start < end"),
        ({"prompt": "a b", "positives": [{"text": "a", "token": "mid"}]}, "token must be one of"),
        ({"prompt": "a b", "positives": [{"text": "a", "occurrence": 1}]}, "out of range"),
        ({"prompt": "a b", "positives": [{"text": "a", "start": 0, "end": 1}]}, "not both"),
        ({"prompt": "a b", "positives": [{"text": "a"}], "colour": 1}, "unknown key"),
        ({"prompt": "a b", "positives": [{"text": "a"}], "group": 3}, "group must be a string"),
        ({"prompt": "a b", "positives": "a"}, "positives must be a list"),
        ({"prompt": "a b", "positives": [{"text": "a"}], "meta": []}, "meta must be an object"),
        (
            {"prompt": "a b", "positives": [{"text": "a"}], "answer": ""},
            "answer must be a non-empty",
        ),
        ({"prompt": "a b", "positives": [{"text": "a"}], "answer": "  "}, "answer must be"),
        ({"prompt": "a b", "positives": [{"text": "a"}], "answer": 3}, "answer must be"),
    ],
)
def test_invalid_lines(tmp_path, obj, fragment) -> None:
    path = tmp_path / "r.jsonl"
    _write(path, [obj])
    with pytest.raises(ValueError, match="line 1") as exc:
        load_records(path)
    assert fragment in str(exc.value)


def test_answer_round_trip_and_one_error_naming_the_line(tmp_path) -> None:
    rec = _record(answer=" apple")
    assert rec.to_dict()["answer"] == " apple"
    assert "answer" not in _record().to_dict()  # absent stays absent (same records hash)
    path = tmp_path / "a.jsonl"
    save_records(path, [rec, _record()])
    back = load_records(path)
    assert back[0].answer == " apple" and back[1].answer is None
    good = {"prompt": "a b", "positives": [{"text": "a"}], "answer": "b"}
    _write(path, [good, good, {**good, "answer": ""}])
    with pytest.raises(ValueError) as exc:
        load_records(path)
    lines = str(exc.value).splitlines()
    assert len(lines) == 2 and "1 invalid record line(s)" in lines[0]
    assert lines[1].strip() == "line 3: answer must be a non-empty string or null, got ''"
    with pytest.raises(ValueError, match="answer must be"):
        _record(answer="")


def test_empty_file_and_error_cap(tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        load_records(path)
    _write(path, [{"prompt": "x"}] * 30)
    with pytest.raises(ValueError, match="and 10 more") as exc:
        load_records(path)
    assert "30 invalid record line(s)" in str(exc.value)
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


def test_direct_construction_validates() -> None:
    with pytest.raises(ValueError, match="overlap"):
        _record(negatives=(Span(3, 9),))
    with pytest.raises(ValueError, match="at least one"):
        _record(positives=(), negatives=())
    with pytest.raises(ValueError, match="exceeds"):
        _record(query=Span(0, 999))
    with pytest.raises(ValueError, match="start < end"):
        Span(3, 3)
    with pytest.raises(ValueError, match="token"):
        Span(0, 1, "middle")
    assert _record(positives=[Span(2, 7)]).positives == (Span(2, 7),)  # lists become tuples
    with pytest.raises(ValueError, match="no records"):
        save_records("unused.jsonl", [])


def test_documented_example_parses() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "contrast-records.md"
    block = doc.read_text().split("### Example\n\n```json\n")[1].split("```")[0]
    recs = parse_records(block.splitlines())
    assert [[r.span_text(s) for s in r.positives] for r in recs] == [
        ["apple", "banana"],
        ["F"],
        ["F"],
        ["Mary"],
    ]
    assert recs[-1].answer == " Mary" and recs[0].answer is None


def test_key_attrs_round_trip_and_checks(tmp_path: Path) -> None:
    """Key attributes (rival features a run can control for) are validated, saved and
    loaded; a feature with them on some key spans only, or a --control naming an attribute no
    record has, is refused in one line naming the lines / the attribute."""
    from qkcov.checks import check_controls, check_key_attrs
    from qkcov.tasks.records import parse_controls

    ok = (
        '{"prompt": "The key near the cabinets is", "positives": [{"text": "key", '
        '"attrs": {"role": "subject"}}], "negatives": [{"text": "cabinets", '
        '"attrs": {"role": "attractor"}}]}'
    )
    partial = (
        '{"prompt": "The keys near the cabinet are", "positives": [{"text": "keys", '
        '"attrs": {"role": "subject"}}], "negatives": [{"text": "cabinet"}]}'
    )
    recs = parse_records([ok, ok])
    assert recs[0].positives[0].attributes == {"role": "subject"}
    save_records(tmp_path / "r.jsonl", recs)
    assert load_records(tmp_path / "r.jsonl") == recs
    check_key_attrs(recs)
    assert check_controls(recs, "offset,role") == ["offset", "role"]
    assert parse_controls("none") == [] and parse_controls("offset") == ["offset"]
    with pytest.raises(
        ValueError, match=r"'role' is on some key spans but not on every key span of line 3;"
    ):
        check_key_attrs(parse_records([ok, ok, partial]))
    with pytest.raises(ValueError, match=r"--control 'number': no key span .* present: 'role'"):
        check_controls(recs, "offset,number")
    with pytest.raises(ValueError, match="--control"):
        parse_controls("offset,offset")
    for bad, msg in (('{"role": ""}', "non-empty"), ('{"offset": "x"}', "computed by qkcov"),
                     ('{"a b": "x"}', "name"), ('[1]', "object")):  # fmt: skip
        line = '{"prompt": "a b", "positives": [{"text": "a", "attrs": ' + bad + "}]}"
        with pytest.raises(ValueError, match=msg):
            parse_records([line])


def test_kind_declaration_round_trip_and_consistency():
    from qkcov.tasks.records import ContrastRecord, feature_kinds, parse_records

    line = '{"prompt": "a b a", "positives": [{"text": "b"}], "negatives": [{"start": 0, "end": 1}], "kind": "relation"}'
    (rec,) = parse_records([line])
    assert rec.kind == "relation" and rec.to_dict()["kind"] == "relation"
    assert ContrastRecord.from_dict(rec.to_dict()) == rec
    assert "kind" not in ContrastRecord("a b", rec.positives[:0], rec.negatives).to_dict()
    with pytest.raises(ValueError, match="line 1: kind must be one of"):
        parse_records([line.replace('"relation"', '"match"')])
    plain = line.replace(', "kind": "relation"', "")
    recs = parse_records([line, plain, line])
    with pytest.raises(
        ValueError, match=r"more than one kind \('relation' on lines 1, 3; no kind on lines 2\)"
    ):
        feature_kinds(recs)
    assert feature_kinds(parse_records([line, line])) == {None: "relation"}
    assert feature_kinds(parse_records([plain])) == {None: None}
