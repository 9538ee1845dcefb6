"""One self-contained HTML report from saved artifacts.

Every experiment writes ``<its folder>/section.json`` (via :func:`write_section`): a title,
key numbers, short text, tables, the figure files it produced and, for a run, one block per
studied head (verdict line, figures, a hover-labelled scatter, the per-prompt token view).
:func:`build_report` finds every section below a folder, references its PNGs by their paths
inside the folder (one copy each; ``embed_figures=True`` embeds them as base64) and embeds
scatter specs and token views as escaped JSON drawn by a small inline script (no library,
nothing fetched), so the page works offline. Plotly figures of older sections are drawn with one
copy of plotly.js written beside the report (``plotly.min.js``) and referenced relatively.

Only files inside the report folder are ever read: every section's figure paths are
resolved (symlinks included) and anything outside the folder is refused.
:func:`report_run_folder` (the ``qkcov report`` command) additionally verifies the
folder against its run manifest first and records the report in it.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..artifacts import (
    add_to_manifest,
    atomic_write_bytes,
    lock_run_folder,
    verify_run_folder,
    write_json,
)

__all__ = ["write_section", "find_sections", "build_report", "report_run_folder", "SECTION_FILE"]

SECTION_FILE = "section.json"


def write_section(
    out_dir: str | Path,
    *,
    key: str,
    title: str,
    order: int = 100,
    summary: Mapping[str, Any] | None = None,
    text: Iterable[str] = (),
    tables: Iterable[Mapping[str, Any]] = (),
    figures: Iterable[Mapping[str, str]] = (),
    interactive: Iterable[Mapping[str, str]] = (),
    scatter: Iterable[Mapping[str, str]] = (),
    heads: Iterable[Mapping[str, Any]] = (),
) -> Path:
    """Describe one experiment's results for the report (``out_dir/section.json``).

    ``figures``/``interactive``/``scatter`` entries are ``{"file": <path relative to out_dir>,
    "caption": str}`` (PNG / plotly JSON / scatter spec of ``figures.common.save_scatter``);
    ``tables`` entries are ``{"caption": str, "columns": [...], "rows": [[...], ...]}`` (shown
    folded). ``heads`` (a run): one block per head ``{"name", "verdict": {"status",
    "sentence", "evidence"} | None, "lead": str, "figures", "scatter", "token_view": file |
    None, "token_view_reason": str | None}``, shown before the tables.
    """
    out_dir = Path(out_dir)
    figures, interactive, scatter = list(figures), list(interactive), list(scatter)
    heads = [dict(h) for h in heads]
    block_files = [
        e for h in heads for e in [*h.get("figures", []), *h.get("scatter", []),
                                   *([{"file": h["token_view"]}] if h.get("token_view") else [])]
    ]  # fmt: skip
    for entry in [*figures, *interactive, *scatter, *block_files]:
        _inside(out_dir, out_dir / entry["file"], f"section {key!r}")
        if not (out_dir / entry["file"]).is_file():
            raise FileNotFoundError(
                f"section {key!r}: figure file {entry['file']!r} not found in {out_dir}"
            )
    return write_json(
        out_dir / SECTION_FILE,
        {
            "key": key,
            "title": title,
            "order": order,
            "summary": dict(summary or {}),
            "text": list(text),
            "tables": [dict(t) for t in tables],
            "figures": [dict(f) for f in figures],
            "interactive": [dict(f) for f in interactive],
            "scatter": [dict(f) for f in scatter],
            "heads": heads,
        },
    )


def _inside(root: Path, path: Path, what: str) -> Path:
    """``path`` resolved (symlinks followed); ``ValueError`` unless it lies inside ``root``."""
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise ValueError(f"{what}: {path} resolves to {real}, outside the report folder {root}")
    return real


def _load_section(root: Path, path: Path) -> dict[str, Any]:
    """Read and validate one ``section.json``; every problem is one line naming the file."""
    real = _inside(root, path, "section file")
    try:
        sec = json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid section file ({err})") from None
    if not isinstance(sec, dict) or not isinstance(sec.get("title"), str):
        raise ValueError(f"{path}: not a valid section file (expected an object with a 'title')")
    key = sec.get("key", path.parent.name)
    heads = sec.get("heads", [])
    if not isinstance(heads, list) or not all(
        isinstance(h, dict) and isinstance(h.get("name"), str) for h in heads
    ):
        raise ValueError(f"{path}: 'heads' must be a list of {{'name': ..., ...}}")
    checks: list[tuple[str, Any]] = [
        (k, sec.get(k, [])) for k in ("figures", "interactive", "scatter")
    ]
    for h in heads:
        checks += [(f"heads[{h['name']}].{k}", h.get(k, [])) for k in ("figures", "scatter")]
        if h.get("token_view") is not None:
            checks.append((f"heads[{h['name']}].token_view", [{"file": h["token_view"]}]))
    for kind, entries in checks:
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and e["file"] for e in entries
        ):
            raise ValueError(f"{path}: '{kind}' must be a list of {{'file': ..., 'caption': ...}}")
        for e in entries:
            where = f"section {key!r} ({path})"
            target = _inside(root, path.parent / e["file"], where)
            if not target.is_file():
                raise ValueError(f"{where}: figure file {e['file']!r} not found")
    for kind in ("text", "tables"):
        if not isinstance(sec.get(kind, []), list):
            raise ValueError(f"{path}: '{kind}' must be a list")
    if not isinstance(sec.get("summary", {}), dict):
        raise ValueError(f"{path}: 'summary' must be an object")
    return sec


def find_sections(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """All ``section.json`` below ``root`` (folder, section), sorted by ``order`` then path.

    Raises ``ValueError`` naming the file for an invalid section or one whose figure files
    resolve outside ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report folder not found: {root}")
    found = [(p.parent, _load_section(root, p)) for p in sorted(root.rglob(SECTION_FILE))]
    return sorted(found, key=lambda item: (_order(item[1]), str(item[0])))


def _order(sec: dict[str, Any]) -> float:
    order = sec.get("order", 100)
    return float(order) if isinstance(order, (int, float)) else 100.0


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return html.escape(str(value))


def _table(columns: list[str], rows: list[list[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _folded(summary: str, inner: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>{inner}</details>"


class _Ids:
    """Unique element ids for the data blocks of one page, and the page's folder (figures
    are referenced relative to it)."""

    def __init__(self, base: Path, embed: bool = False) -> None:
        self.n = 0
        self.base = base.resolve()
        self.embed = embed

    def __call__(self, kind: str) -> str:
        self.n += 1
        return f"{kind}-{self.n}"


def _png(root: Path, folder: Path, fig: dict[str, Any], ids: _Ids) -> str:
    """A figure referenced by its path relative to the page (one copy of each PNG per
    folder), or embedded as base64 (``build_report(..., embed_figures=True)``: one file)."""
    real = _inside(root, folder / fig["file"], "figure")
    if ids.embed:
        src = "data:image/png;base64," + base64.b64encode(real.read_bytes()).decode()
    else:
        src = quote(Path(os.path.relpath(real, ids.base)).as_posix())
    return (
        f'<figure><img alt="{html.escape(fig["file"])}" src="{html.escape(src)}">'
        f"<figcaption>{html.escape(fig.get('caption', ''))}</figcaption></figure>"
    )


def _read_json(root: Path, folder: Path, name: str) -> Any:
    return json.loads(_inside(root, folder / name, "figure").read_text(encoding="utf-8"))


def _scatter(root: Path, folder: Path, fig: dict[str, Any], ids: _Ids) -> str:
    from .views import scatter_html

    div = scatter_html(_read_json(root, folder, fig["file"]), ids("scatter"))
    return f"<figure>{div}<figcaption>{html.escape(fig.get('caption', ''))}</figcaption></figure>"


def _head_html(folder: Path, h: dict[str, Any], root: Path, anchor: str, ids: _Ids) -> str:
    from .views import token_view_html, verdict_html

    name = html.escape(h["name"])
    parts = [f'<article class="head" id="{anchor}-{name}"><h3>{name}</h3>']
    parts.append(verdict_html(h.get("verdict"), h.get("lead", "")))
    figs = h.get("figures", [])
    if figs:
        parts.append(
            '<div class="figs">' + "".join(_png(root, folder, f, ids) for f in figs) + "</div>"
        )
    for sc in h.get("scatter", []):
        parts.append(_scatter(root, folder, sc, ids))
    parts.append(f"<h4>{name}: per-prompt token view</h4>")
    if h.get("token_view"):
        parts.append(token_view_html(_read_json(root, folder, h["token_view"]), ids("tokenview")))
    else:
        reason = h.get("token_view_reason") or "Token view unavailable: no per-prompt data saved."
        parts.append(f'<p class="tv-missing">{html.escape(reason)}</p>')
    parts.append("</article>")
    return "\n".join(parts)


def _verdict_line(h: dict[str, Any]) -> str:
    v = h.get("verdict") if isinstance(h.get("verdict"), dict) else {}
    if v.get("sentence") or v.get("status"):
        return " — ".join(str(x) for x in (v.get("status"), v.get("sentence")) if x)
    return str(h.get("lead", ""))


NO_VIEW_OLD = (
    "Token view unavailable: this section was written before per-prompt token views existed "
    "(its section.json has no head blocks); rerun the analysis to get it."
)


def _section_html(folder: Path, sec: dict[str, Any], root: Path, ids: _Ids) -> str:
    import plotly.io as pio

    anchor = html.escape(sec.get("key", folder.name))
    heads = sec.get("heads", [])
    parts = [f'<section id="{anchor}"><h2>{html.escape(sec["title"])}</h2>']
    rel = folder.relative_to(root) if folder != root else Path(".")
    parts.append(f'<p class="src">artifacts: <code>{html.escape(str(rel))}/</code></p>')
    if heads:  # a run: the verdicts first, one line per head
        parts.append('<ul class="verdicts">' + "".join(
            f'<li><a href="#{anchor}-{html.escape(h["name"])}">{html.escape(h["name"])}</a>: '
            f"{html.escape(_verdict_line(h))}</li>"
            for h in heads
        ) + "</ul>")  # fmt: skip
    text = "".join(f"<p>{html.escape(para)}</p>" for para in sec.get("text", []))
    if heads and text:
        parts.append(_folded("How this was measured", text + (sec.get("method_html") or "")))
    else:
        parts.append(text)
    for h in heads:
        parts.append(_head_html(folder, h, root, anchor, ids))
    if not heads and (folder / "run.json").is_file():
        parts.append(f'<p class="tv-missing">{html.escape(NO_VIEW_OLD)}</p>')
    if sec.get("summary"):
        rows = [[k, v] for k, v in sec["summary"].items()]
        table = _table(["quantity", "value"], rows, "Key numbers")
        parts.append(_folded("Key numbers", table) if heads else table)
    figs = "".join(_png(root, folder, f, ids) for f in sec.get("figures", []))
    figs += "".join(_scatter(root, folder, f, ids) for f in sec.get("scatter", []))
    for fig in sec.get("interactive", []):
        pfig = pio.from_json(_inside(root, folder / fig["file"], "figure").read_text())
        div = pio.to_html(pfig, full_html=False, include_plotlyjs=False)
        figs += (
            f"<figure>{div}<figcaption>{html.escape(fig.get('caption', ''))}</figcaption></figure>"
        )
    parts.append(figs)
    for t in sec.get("tables", []):
        cap = t.get("caption", "") or "table"
        parts.append(
            _folded(f"Table: {cap} ({len(t['rows'])} rows)", _table(t["columns"], t["rows"]))
        )
    parts.append("</section>")
    return "\n".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}caption{text-align:left;font-weight:600}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}
figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:0.9em}
.src{color:#777;font-size:0.85em}nav a{margin-right:1em}
"""

PLOTLY_FILE = "plotly.min.js"
METHOD_NOTE = (
    "Method, null, ranks, swap, attribution and every metric (Δp, flip rate, log-prob shift, "
    "explained fraction): docs/method.md in the qkcov repository."
)


def build_report(
    root: str | Path,
    out: str | Path | None = None,
    title: str | None = None,
    *,
    embed_figures: bool = False,
) -> Path:
    """Write ``root/report.html`` (or ``out``) showing every section found under ``root``.

    PNG figures are referenced by their paths inside the folder (one copy of each; the page
    reads nothing else and nothing from the network), or embedded as base64 with
    ``embed_figures=True`` (one self-contained file). Plotly figures (older sections only)
    get one ``plotly.min.js`` beside the report."""
    from .views import VIEW_CSS, VIEW_JS

    root = Path(root)
    sections = find_sections(root)
    if not sections:
        raise FileNotFoundError(
            f"no {SECTION_FILE} found under {root}; run an experiment command with --out {root} first"
        )
    if title is None:  # one run: its section title names the records file and features
        title = f"qkcov — {sections[0][1]['title']}" if len(sections) == 1 else "qkcov report"
    nav = " ".join(
        f'<a href="#{html.escape(s.get("key", f.name))}">{html.escape(s["title"])}</a>'
        for f, s in sections
    )
    target = Path(out) if out is not None else root / "report.html"
    needs_plotly = any(s.get("interactive") for _, s in sections)
    plotly_js = ""
    if needs_plotly:
        import plotly.offline

        atomic_write_bytes(target.parent / PLOTLY_FILE, plotly.offline.get_plotlyjs().encode())
        plotly_js = f'<script src="{PLOTLY_FILE}"></script>'
    ids = _Ids(target.parent, embed_figures)
    body = "\n".join(_section_html(f, s, root, ids) for f, s in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}{VIEW_CSS}</style>{plotly_js}</head><body><h1>{html.escape(title)}</h1>"
        f"<nav>{nav}</nav><p class='src'>{html.escape(METHOD_NOTE)}</p>{body}"
        f"<script>{VIEW_JS}</script></body></html>"
    )
    atomic_write_bytes(target, page.encode())
    write_json(
        root / "report_index.json",
        {
            "report": target.name,
            "plotly": PLOTLY_FILE if needs_plotly else None,
            "sections": [
                {"key": s.get("key"), "folder": str(f.relative_to(root))} for f, s in sections
            ],
        },
    )
    return target


def report_run_folder(root: str | Path, title: str | None = None) -> Path:
    """``qkcov report DIR``: verify ``root`` against its run manifest, write
    ``root/report.html`` and record it (and ``report_index.json``) in the manifest.

    Refuses (``ValueError``) a folder without a manifest, with a modified or missing file, or
    with files from another run; holds the folder's run lock while writing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report folder not found: {root}")
    with lock_run_folder(root):
        verify_run_folder(root)
        target = build_report(root, title=title)
        extra = [PLOTLY_FILE] if (root / PLOTLY_FILE).is_file() else []
        add_to_manifest(root, [target.name, "report_index.json", *extra])
    return target
