"""The generated report in a real browser (headless Chromium from the OS package, driven over
the DevTools protocol): no console errors, the token view steps through prompts, hovering or
focusing a key shows the numbers saved for it, and hostile prompt text shows as text.

Without Chromium these tests skip with a one-line reason (CI installs it: ``.ci/run``)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from _cdp import Browser, find_chromium
from qkcov.artifacts import read_json
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, run
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import Span, save_records

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (/usr/bin/chromium): apt-get install -y chromium"
)
HOSTILE = '</script><img src=x onerror="window.__pwned=1">\'q\' "dq" & '
FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16)


def _shift(span: Span | None, n: int) -> Span | None:
    return (
        None if span is None else dataclasses.replace(span, start=span.start + n, end=span.end + n)
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A small run on a tiny model whose prompts start with hostile text, loaded from JSONL."""
    base = tmp_path_factory.mktemp("browser")
    recs = [
        dataclasses.replace(
            r, prompt=HOSTILE + r.prompt, query=_shift(r.query, len(HOSTILE)),
            positives=tuple(_shift(s, len(HOSTILE)) for s in r.positives),
            negatives=tuple(_shift(s, len(HOSTILE)) for s in r.negatives),
        )
        for r in build_task_records("agreement", n=40)
    ]  # fmt: skip
    save_records(base / "records.jsonl", recs)
    # the CLI's path (a records file), so the page can name it
    run(RunConfig(heads="auto:2", **FAST), base / "records.jsonl", base / "run", quiet=True,
        loaded=(tiny_model("llama"), tiny_tokenizer()))  # fmt: skip
    return base / "run"


@pytest.fixture(scope="module")
def browser(report):
    b = Browser(CHROMIUM)
    try:
        b.open((report / "report.html").as_uri())
        yield b
    finally:
        b.close()


def _saved(report, head: str) -> dict:
    from qkcov.artifacts import load_tensors
    from qkcov.report.figures.run import token_view_data

    info = read_json(report / "run.json")
    h = next(h for h in info["heads"] if h["name"] == head)
    return token_view_data(h, load_tensors(report / "run.safetensors"))


def test_page_loads_without_console_errors(browser):
    assert browser.eval("document.querySelectorAll('.tokenview .tv-prompt').length") == 2
    assert browser.eval("document.querySelectorAll('.scatter svg circle').length") > 10
    assert browser.errors() == []


def test_hostile_prompt_text_shows_as_text(browser):
    assert browser.eval("window.__pwned === undefined")
    assert browser.eval("document.querySelectorAll('img[onerror], img[src=x]').length") == 0
    text = browser.eval("document.querySelector('.tokenview .tv-prompt').textContent")
    assert HOSTILE in text  # one character token each: the prompt reads as written
    # every <script> the page has is the report's own (data blocks and the view script)
    kinds = browser.eval(
        "Array.from(document.scripts).map(function(s){return s.type||'js'}).join(',')"
    )
    assert set(kinds.split(",")) == {"application/json", "js"}


def test_token_view_steps_through_prompts_with_their_lines(browser, report):
    head = read_json(report / "run.json")["heads"][0]["name"]
    saved = _saved(report, head)
    assert len(saved["prompts"]) >= 2
    label = "document.querySelector('.tokenview .tv-label').textContent"
    first = browser.eval(label)
    assert f"JSONL line {saved['prompts'][0]['line']}" in first
    browser.eval("document.querySelector('.tokenview .tv-next').click()")
    second = browser.eval(label)
    assert f"JSONL line {saved['prompts'][1]['line']}" in second and second != first
    n_tokens = browser.eval(
        "document.querySelectorAll('.tokenview')[0].querySelectorAll('.tv-tok').length"
    )
    assert n_tokens == len(saved["prompts"][1]["tokens"])
    browser.eval("document.querySelector('.tokenview .tv-prev').click()")
    assert browser.eval(label) == first


def _detail(browser) -> str:
    return browser.eval("document.querySelector('.tokenview .tv-detail').textContent")


def _numbers(text: str) -> list[float]:
    import re

    return [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]?\d+)?", text)]


def test_hover_and_focus_show_the_saved_numbers(browser, report):
    head = read_json(report / "run.json")["heads"][0]["name"]
    p = _saved(report, head)["prompts"][0]
    browser.eval(
        "var s=document.querySelector('.tokenview .tv-select');s.value='0';s.dispatchEvent(new Event('change'))"
    )
    j = p["positives"][0]
    browser.hover(f".tokenview .tv-tok[data-pos='{j}']")  # a real mouse move
    text = _detail(browser)
    assert f"position {j}" in text and "positive key" in text
    got = _numbers(text.split("position")[1])
    want = [p["before"][j], p["after"][j], p["logit"][j], *[row[j] for row in p["parts"]]]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=2e-3, abs=2e-4)
    # the parts add up to the logit the page shows
    assert sum(got[3:]) == pytest.approx(got[2], rel=1e-2, abs=1e-3)
    k = p["negatives"][0]
    browser.eval(f"document.querySelector(\".tokenview .tv-tok[data-pos='{k}']\").focus()")
    text = _detail(browser)
    assert f"position {k}" in text and "negative key" in text
    assert _numbers(text.split("position")[1])[0] == pytest.approx(
        p["before"][k], rel=2e-3, abs=2e-4
    )


def test_after_toggle_recolours_with_the_swapped_attention(browser, report):
    head = read_json(report / "run.json")["heads"][0]["name"]
    p = _saved(report, head)["prompts"][0]
    browser.eval(
        "var s=document.querySelector('.tokenview .tv-select');s.value='0';s.dispatchEvent(new Event('change'))"
    )
    title = f"document.querySelector(\".tokenview .tv-tok[data-pos='{p['target']}']\").title"
    before = browser.eval(title)
    browser.eval(
        "var m=document.querySelector('.tokenview .tv-mode');m.value='after';m.dispatchEvent(new Event('change'))"
    )
    after = browser.eval(title)
    assert _numbers(before)[0] == pytest.approx(p["before"][p["target"]], rel=2e-3, abs=2e-4)
    assert _numbers(after)[0] == pytest.approx(p["after"][p["target"]], rel=2e-3, abs=2e-4)
    browser.eval(
        "var m=document.querySelector('.tokenview .tv-mode');m.value='before';m.dispatchEvent(new Event('change'))"
    )
    assert browser.errors() == []


def test_title_names_records_file_not_the_unnamed_feature(browser):
    title = browser.eval("document.title")
    assert "records.jsonl" in title and "feature" not in title
    assert browser.eval("document.querySelector('h1').textContent") == title


LEGEND_MIN_PX = 13  # the scatter legend, read at the report's width


def test_scatter_shows_groups_of_queries_and_negative_keys(browser):
    names = browser.eval(
        "Array.from(document.querySelectorAll('.sc-legend>span')).map(function(s){return s.textContent})"
    )
    for side in ("positive keys", "negative keys", "queries"):
        assert any(n.endswith(f"{side}: plural") for n in names), (side, names)
        assert any(n.endswith(f"{side}: singular") for n in names), (side, names)
    # negative keys are hollow circles in their group's colour, positive keys filled
    hollow = browser.eval("document.querySelectorAll('.scatter svg circle[fill=\"none\"]').length")
    assert hollow > 0
    size = browser.eval(
        "parseFloat(getComputedStyle(document.querySelector('.sc-legend>span')).fontSize)"
    )
    assert size >= LEGEND_MIN_PX


def test_scatter_points_name_token_and_line(browser):
    labels = browser.eval(
        "Array.from(document.querySelectorAll('.scatter svg circle title')).map(function(t){return t.textContent})"
    )
    assert labels and all(" · line " in s for s in labels)
    assert any(s.startswith("key ") for s in labels) and any(s.startswith("query ") for s in labels)


def test_old_run_folder_renders_with_one_line_reason(report, tmp_path):
    """A run saved before token views: no 'token_view' in run.json, no such tensors."""
    from qkcov.artifacts import load_tensors, save_tensors, write_json
    from qkcov.report import build_report
    from qkcov.report.figures.run import NO_TOKEN_VIEW
    from qkcov.report.run import write_run_section

    info = read_json(report / "run.json")
    for h in info["heads"]:
        h.pop("token_view")
    write_json(tmp_path / "run.json", info)
    t = {
        k: v for k, v in load_tensors(report / "run.safetensors").items() if ".token_view." not in k
    }
    save_tensors(tmp_path / "run.safetensors", t)
    write_run_section(tmp_path)
    page = build_report(tmp_path)
    b = Browser(CHROMIUM)
    try:
        b.open(page.as_uri())
        assert b.eval("document.querySelectorAll('.tokenview').length") == 0
        reasons = b.eval(
            "Array.from(document.querySelectorAll('.tv-missing')).map(function(e){return e.textContent})"
        )
        assert reasons == [NO_TOKEN_VIEW] * len(info["heads"])
        assert b.errors() == []
    finally:
        b.close()
    assert json.loads((tmp_path / "section.json").read_text())["heads"][0]["token_view"] is None
