"""The explain atlas in headless Chromium: the grid, a click opening a head, hostile text."""

from __future__ import annotations

import json

import pytest

from _cdp import Browser, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (/usr/bin/chromium): apt-get install -y chromium"
)

HOSTILE = "</script><img src=x onerror=alert(1)> <b>bold</b> & \u2028 "


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    import qkcov
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    texts = [
        HOSTILE + "The cat sat. The cat sat.",
        "abc abc abc 12 34!",
        "Anna met Ben; Ben met Anna.",
    ]
    res = qkcov.explain(tiny_model("llama"), tiny_tokenizer(), texts, progress=False, max_len=48)
    return res.save(tmp_path_factory.mktemp("atlas") / "ex")


@pytest.fixture(scope="module")
def browser(atlas):
    b = Browser(CHROMIUM)
    try:
        b.open((atlas / "atlas.html").as_uri())
        yield b
    finally:
        b.close()


def _click(b: Browser, selector: str) -> None:
    box = b.eval(
        f"(function(){{var e=document.querySelector({json.dumps(selector)});"
        "e.scrollIntoView({block:'center'});var r=e.getBoundingClientRect();"
        "return [r.left+r.width/2, r.top+r.height/2];})()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        b.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
               clickCount=1)  # fmt: skip


def test_grid_has_every_head_coloured_by_its_top_hypothesis(browser, atlas):
    data = json.loads((atlas / "explain.json").read_text())
    shape = data["shape"]
    n = browser.eval("document.querySelectorAll('table.grid a.cell').length")
    assert n == shape["n_layers"] * shape["n_heads"] == len(data["heads"])
    tops = browser.eval(
        "Array.from(document.querySelectorAll('a.cell')).map(a=>[a.dataset.head,a.dataset.top,"
        "getComputedStyle(a).backgroundColor])"
    )
    saved = {h["name"]: h["top"] for h in data["heads"]}
    assert {h: t for h, t, _ in tops} == saved
    colours = {}
    for _, t, c in tops:
        colours.setdefault(t, set()).add(c)
    assert all(c.startswith("rgb(") for cs in colours.values() for c in cs)
    # no section is shown before a click
    assert (
        browser.eval(
            "Array.from(document.querySelectorAll('section.head')).filter(s=>getComputedStyle(s).display!='none').length"
        )
        == 0
    )
    assert browser.errors() == []


def test_click_opens_the_heads_section(browser, atlas):
    data = json.loads((atlas / "explain.json").read_text())
    name = data["heads"][-1]["name"]
    _click(browser, f'a.cell[data-head="{name}"]')
    assert browser.eval("location.hash") == f"#head-{name}"
    shown = browser.eval(
        "Array.from(document.querySelectorAll('section.head')).filter(s=>getComputedStyle(s).display!='none').map(s=>s.id)"
    )
    assert shown == [f"head-{name}"]
    text = browser.eval(f"document.getElementById('head-{name}').innerText")
    assert data["heads"][-1]["sentence"] in text
    assert (
        browser.eval(f"document.querySelectorAll('#head-{name} svg.bars rect').length")
        == sum(x["part"] == "selection" for x in data["heads"][-1]["hypotheses"]) + 1
    )
    assert "The first key (the gate" in text
    assert browser.eval(f"document.querySelectorAll('#head-{name} .tok').length") > 10


def test_hostile_corpus_text_shows_as_text_and_nothing_is_fetched(browser):
    assert browser.eval("document.images.length") == 0
    assert browser.eval("document.querySelectorAll('script').length") == 0
    assert browser.eval("document.querySelectorAll('.tokens b').length") == 0
    joined = browser.eval(
        "Array.from(document.querySelectorAll('.tok')).map(s=>s.textContent).join('')"
    )
    assert "<img" in joined and "</script>" in joined
    hrefs = browser.eval(
        "Array.from(document.querySelectorAll('a')).map(a=>a.getAttribute('href'))"
    )
    assert all(h.startswith("#") for h in hrefs)
    assert browser.errors() == []


def test_grid_of_a_few_heads_keeps_every_column_legible(tmp_path):
    """With --heads naming a few heads, the empty cells keep their width: the column headers
    (H0, H1, ...) must not run into each other."""
    import qkcov
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama")
    res = qkcov.explain(model, tiny_tokenizer(), ["The cat sat. The cat sat.", "abc abc 12 34!"],
                        heads="L0H0", progress=False, max_len=32)  # fmt: skip
    folder = res.save(tmp_path / "few")
    b = Browser(CHROMIUM)
    try:
        b.open((folder / "atlas.html").as_uri())
        widths = b.eval(
            "Array.from(document.querySelectorAll('table.grid thead th')).slice(1)"
            ".map(t=>t.getBoundingClientRect().width)"
        )
        cells = b.eval("document.querySelectorAll('table.grid .cell').length")
    finally:
        b.close()
    assert len(widths) == res.shape["n_heads"] >= 2
    assert cells == res.shape["n_heads"] * res.shape["n_layers"]
    assert min(widths) >= 30, widths  # the width of a filled cell (34 px)
