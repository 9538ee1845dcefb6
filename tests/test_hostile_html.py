"""Inert pages by construction (issue 23): hostile strings in every field that reaches a page
(names, notes, model, feature, group, folder names, method text) never run and never break
the page, in headless Chromium; the report renders only sections its manifest lists with a
matching hash; links are quoted relative file URLs.

The browser cases skip with one line without Chromium (/usr/bin/chromium)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from _cdp import Browser, find_chromium
from qkcov.artifacts import RunFolder, add_to_manifest, read_json, write_json
from qkcov.cli import main
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records

CHROMIUM = find_chromium()
FAST = dict(n_random=20, n_permutations=50, n_bootstrap=20, batch_size=16, rank_rule="energy")

PAYLOADS = [
    "<script>top.__pwned=1</script>",
    '"><img src=x onerror="top.__pwned=1">',
    "'><svg onload='top.__pwned=1'>",
    "javascript:top.__pwned=1",
    "</script><script>top.__pwned=1</script>",
    '<iframe srcdoc="<script>top.__pwned=1</script>"></iframe>',
    '<a href="javascript:top.__pwned=1" id=pwn>x</a>',
    'x" onmouseover="top.__pwned=1" y="',
    "</title></style><script>top.__pwned=1</script>",
    "&lt;script&gt;top.__pwned=1&lt;/script&gt;",
    "\u2028<!--<script>top.__pwned=1</script>-->",
    "<details open ontoggle=top.__pwned=1>",
    "{{constructor.constructor('top.__pwned=1')()}}",
    '<meta http-equiv=refresh content="0;url=javascript:top.__pwned=1">',
]
# where each payload goes on each page (field placements per payload)
REPORT_FIELDS = [
    "folder name", "section key", "title", "text (method text)", "method_html", "summary key",
    "summary value (model)", "table caption", "table column", "table cell (feature)",
    "table cell (group)", "head name", "verdict status", "verdict sentence", "verdict evidence",
    "lead", "token view reason", "figure caption", "notes", "page link caption",
]  # fmt: skip
INDEX_FIELDS = ["folder name", "model"]
COMPARE_FIELDS = ["run labels", "model", "head", "feature", "only_in_one"]


def _folder_name(payload: str, i: int) -> str:
    return f"{i}-" + payload.replace("/", "∕").replace("\x00", "")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    result = analyze(
        tiny_model("llama"), tiny_tokenizer(), build_task_records("agreement", n=40),
        heads="L1H2", progress=False, **FAST,
    )  # fmt: skip
    out = tmp_path_factory.mktemp("html") / "run"
    result.save(out)
    return out, result


def _hostile_section(sec: dict, p: str) -> dict:
    sec = dict(sec)
    sec.update(key=p, title=p, method_html=p)
    sec["text"] = [p, *sec.get("text", []), f"note: {p}"]
    sec["summary"] = {p: p, "model": p}
    tables = [dict(t) for t in sec.get("tables", [])]
    tables.append(
        {"caption": p, "columns": ["head", "feature", "group", p], "rows": [[p, p, p, p]]}
    )
    sec["tables"] = tables
    heads = []
    for h in sec.get("heads", []):
        h = dict(h, name=p, lead=p, token_view_reason=p, token_view=None)
        h["verdict"] = {"status": p, "sentence": p, "evidence": {p: p}}
        h["figures"] = [dict(f, caption=p) for f in h.get("figures", [])]
        heads.append(h)
    sec["heads"] = heads
    sec["figures"] = [dict(f, caption=p) for f in sec.get("figures", [])]
    sec["pages"] = [{"file": "run.json", "caption": p}]  # a link to a file of the folder
    return sec


def _pages(run: Path, result, base: Path) -> list[tuple[str, str, Path]]:
    """(payload, page kind, page path) for every payload on the report, index and compare pages."""
    from qkcov.comparison import compare
    from qkcov.report import build_report
    from qkcov.report.compare import write_comparison_page, write_index

    pages = []
    for i, p in enumerate(PAYLOADS):
        root = base / f"report{i}"
        folder = root / _folder_name(p, i)
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns("manifest.json", "report*"))
        sec = _hostile_section(read_json(folder / "section.json"), p)
        write_json(folder / "section.json", sec)
        pages.append((p, "report", build_report(root)))

        runs = base / f"index{i}"
        one = runs / _folder_name(p, i)
        shutil.copytree(run, one)
        info = read_json(one / "run.json")
        info["model"] = p
        ident = (info.get("provenance") or {}).get("model_identity")
        if isinstance(ident, dict):  # the index names the model by its recorded identity
            ident["name"] = p
        (one / "run.json").write_text(json.dumps(info))
        add_to_manifest(one, ["run.json"])  # hashes forged: only escaping stands in the way
        shutil.copytree(run, runs / "plain")
        pages.append((p, "index", write_index(runs)))

        cmp = compare([result, result], labels=[p + "a", p + "b"])
        cmp.model = p
        for row in [*cmp.pairs, *cmp.ranks]:
            row.update(head=p, feature=p)
        cmp.only_in_one = [p]
        pages.append((p, "compare", write_comparison_page(cmp, base / f"compare{i}.html")))
    return pages


CHECK = r"""(function(){
  var bad = [];
  document.querySelectorAll('*').forEach(function(e){
    for (var a of e.attributes) { if (/^on/i.test(a.name)) bad.push(e.tagName + ' ' + a.name); }
  });
  document.querySelectorAll('a[href]').forEach(function(a){
    if (a.protocol !== 'file:') bad.push('href ' + a.href); });
  document.querySelectorAll('img[src]').forEach(function(i){
    if (i.src && !/^(file|data):/.test(i.src)) bad.push('src ' + i.src); });
  document.querySelectorAll('iframe, object, embed, meta[http-equiv]').forEach(function(e){
    bad.push(e.tagName); });
  document.querySelectorAll('script').forEach(function(s){
    if (s.type !== 'application/json' && (s.src || !/use strict|Plotly/.test(s.textContent)))
      bad.push('script ' + s.outerHTML.slice(0, 60)); });
  return {pwned: window.__pwned === 1, bad: bad, h1: !!document.querySelector('h1'),
          text: document.body.textContent, title: document.title,
          links: document.querySelectorAll('a[href]').length};
})()"""


@pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium (/usr/bin/chromium): apt-get install -y chromium"
)
def test_hostile_strings_in_every_field_never_run_and_the_pages_render(run, tmp_path):
    out, result = run
    pages = _pages(out, result, tmp_path)
    n_fields = {
        "report": len(REPORT_FIELDS),
        "index": len(INDEX_FIELDS),
        "compare": len(COMPARE_FIELDS),
    }
    cases = sum(n_fields[kind] for _, kind, _ in pages)
    assert len(pages) == 3 * len(PAYLOADS) and cases == len(PAYLOADS) * 27  # 14 × 27 = 378
    b = Browser(CHROMIUM)
    try:
        for p, kind, page in pages:
            b.open(page.as_uri())
            # hover and toggle everything a payload could have hooked
            b.eval("document.querySelectorAll('details').forEach(function(d){d.open=true})")
            b.eval(
                "document.querySelectorAll('*').forEach(function(e){e.dispatchEvent(new MouseEvent('mouseover',{bubbles:true}))})"
            )
            got = b.eval(CHECK)
            where = f"{kind} page with {p!r}"
            assert not got["pwned"] and got["bad"] == [], (where, got["bad"])
            assert got["h1"] and p.strip() in got["text"], where  # rendered, as text
            if kind == "report":
                # the title names the run (its records and features): text, never markup
                assert got["title"].startswith("qkcov"), where
            if kind == "index":
                assert got["links"] == 2, where  # both runs' report links, as file URLs
            assert b.eval("window.__pwned === undefined"), where
        assert b.errors() == []
    finally:
        b.close()


def test_index_link_of_a_javascript_folder_name_is_a_quoted_relative_path(run, tmp_path):
    from qkcov.report.compare import write_index

    out, _ = run
    root = tmp_path / "runs"
    shutil.copytree(out, root / "javascript:document.title='x';x=1")
    page = write_index(root).read_text()
    assert "href='javascript%3Adocument.title%3D%27x%27%3Bx%3D1/report.html'" in page
    assert "href='javascript:" not in page


def test_method_html_of_a_section_is_never_copied_into_the_page(run, tmp_path):
    from qkcov.report import build_report

    out, _ = run
    root = tmp_path / "r"
    shutil.copytree(out, root, ignore=shutil.ignore_patterns("manifest.json", "report*"))
    sec = read_json(root / "section.json")
    sec["method_html"] = "<b id='raw-method'>raw</b>"
    write_json(root / "section.json", sec)
    page = build_report(root).read_text()
    assert "raw-method" not in page


def test_report_renders_only_sections_the_manifest_lists(run, tmp_path, capsys):
    out, _ = run
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with RunFolder(project, command="run", force=True) as stage:
        for f in out.iterdir():
            if f.name not in ("manifest.json", "report.html", "report_index.json"):
                shutil.copy(f, stage / f.name)
    sneaky = project / "sneaky"
    sneaky.mkdir()
    write_json(
        sneaky / "section.json",
        {"key": "sneaky", "title": "<script>top.__pwned=1</script>UNLISTED", "text": ["x"]},
    )  # fmt: skip
    assert main(["report", str(project)]) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "sneaky/section.json: not listed in the run's manifest" in err
    page = (project / "report.html").read_text()
    assert "UNLISTED" not in page and "Contrast analysis" in page
    assert (project / "notes.txt").read_text() == "mine"
    # a listed section changed after the run: the folder no longer verifies at all
    sec = read_json(project / "section.json")
    sec["title"] = "tampered"
    write_json(project / "section.json", sec)
    assert main(["report", str(project)]) == 2
    assert "modified after the run" in capsys.readouterr().err


def test_build_report_never_overwrites_a_users_page(run, tmp_path):
    from qkcov.report import build_report

    out, _ = run
    root = tmp_path / "r"
    shutil.copytree(out, root, ignore=shutil.ignore_patterns("manifest.json", "report*"))
    mine = tmp_path / "mine.html"
    mine.write_text("<p>my page</p>")
    with pytest.raises(ValueError, match="was not written by qkcov"):
        build_report(root, out=mine)
    assert mine.read_text() == "<p>my page</p>"
    (root / "report.html").write_text("my report")
    with pytest.raises(ValueError, match="was not written by qkcov"):
        build_report(root)
    assert (root / "report.html").read_text() == "my report"
    (root / "report.html").unlink()
    page = build_report(root)
    build_report(root)  # its own sealed page: replaced
    assert page.read_text().rstrip().endswith("-->")


@pytest.mark.parametrize(
    "change",
    [
        {"tables": [{"caption": "t", "columns": ["a"], "rows": 5}]},
        {"heads": [{"name": "L0H0", "verdict": "not a dict", "figures": []}]},
        {"key": ["not", "a", "string"]},
        {"interactive": [{"file": "section.json"}]},
    ],
)
def test_section_of_the_wrong_shape_is_one_line(tmp_path, capsys, change):
    from qkcov.report import build_report

    sec = {"key": "k", "title": "t", "text": ["x"], **change}
    write_json(tmp_path / "section.json", sec)
    try:
        build_report(tmp_path)
    except ValueError as err:
        assert "section.json" in str(err) and "\n" not in str(err)
    else:  # rendered: the odd value shows as text
        assert "<h1>" in (tmp_path / "report.html").read_text()
