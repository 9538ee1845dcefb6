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
folder against its run manifest first, renders only the sections (and figures) the
manifest lists with a matching sha256 — any other ``section.json`` is named in one line
and skipped — and records the report in it.

Every string from a section reaches the page through :mod:`qkcov.htmlsafe` (escaped text
and attributes, percent-quoted relative URLs); nothing from an artifact is inserted as HTML.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import htmlsafe as esc
from ..artifacts import (
    add_to_manifest,
    artifact_errors,
    atomic_write_bytes,
    check_replaceable,
    lock_run_folder,
    parse_json,
    read_regular_bytes,
    seal_html,
    verify_run_folder,
    write_json,
)

Listed = dict[str, str] | None  # {relative path: sha256} of a verified manifest, or None

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


def _read_checked(root: Path, path: Path, listed: Listed, what: str) -> bytes:
    """The bytes of ``path`` (inside ``root``, a regular file); with ``listed``, only a file
    the manifest lists whose content still has the listed sha256."""
    real = _inside(root, path, what)
    data = read_regular_bytes(real, what=what)
    if listed is not None:
        rel = real.relative_to(root.resolve()).as_posix()
        if rel not in listed:
            raise ValueError(f"{path}: not listed in the run's manifest; not shown")
        if hashlib.sha256(data).hexdigest() != listed[rel]:
            raise ValueError(f"{path}: changed since the run (sha256 mismatch); not shown")
    return data


def _load_section(root: Path, path: Path, listed: Listed = None) -> dict[str, Any]:
    """Read and validate one ``section.json``; every problem is one line naming the file."""
    sec = parse_json(_read_checked(root, path, listed, "section file"), path, what="section file")
    if not isinstance(sec, dict) or not isinstance(sec.get("title"), str):
        raise ValueError(f"{path}: not a valid section file (expected an object with a 'title')")
    key = sec.get("key", path.parent.name)
    if not isinstance(key, str):
        raise ValueError(f"{path}: 'key' must be a string")
    heads = sec.get("heads", [])
    if not isinstance(heads, list) or not all(
        isinstance(h, dict) and isinstance(h.get("name"), str) for h in heads
    ):
        raise ValueError(f"{path}: 'heads' must be a list of {{'name': ..., ...}}")
    checks: list[tuple[str, Any]] = [
        (k, sec.get(k, [])) for k in ("figures", "interactive", "scatter", "pages")
    ]
    for hd in heads:
        checks += [(f"heads[{hd['name']}].{k}", hd.get(k, [])) for k in ("figures", "scatter")]
        if hd.get("token_view") is not None:
            checks.append((f"heads[{hd['name']}].token_view", [{"file": hd["token_view"]}]))
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
            if listed is not None:
                _read_checked(root, target, listed, "figure")
    for kind in ("text", "tables"):
        if not isinstance(sec.get(kind, []), list):
            raise ValueError(f"{path}: '{kind}' must be a list")
    for t in sec.get("tables", []):
        if not (isinstance(t, dict) and isinstance(t.get("columns"), list)
                and isinstance(t.get("rows"), list)
                and all(isinstance(r, list) for r in t["rows"])):  # fmt: skip
            raise ValueError(
                f"{path}: 'tables' entries must be {{'columns': [...], 'rows': [[...]]}}"
            )
    if not isinstance(sec.get("summary", {}), dict):
        raise ValueError(f"{path}: 'summary' must be an object")
    return sec


def find_sections(root: str | Path, listed: Listed = None) -> list[tuple[Path, dict[str, Any]]]:
    """All ``section.json`` below ``root`` (folder, section), sorted by ``order`` then path.

    Raises ``ValueError`` naming the file for an invalid section or one whose figure files
    resolve outside ``root``. With ``listed`` (a verified manifest's ``{path: sha256}``), a
    section the manifest does not list, or whose content or figures no longer match it, is
    named in one line on stderr and skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"report folder not found: {root}")
    found = []
    for p in sorted(root.rglob(SECTION_FILE)):
        if listed is not None:
            rel = p.relative_to(root).as_posix()
            if rel not in listed:
                print(f"qkcov: skipped {p}: not listed in the run's manifest", file=sys.stderr)
                continue
        found.append((p.parent, _load_section(root, p, listed)))
    return sorted(found, key=lambda item: (_order(item[1]), str(item[0])))


def _order(sec: dict[str, Any]) -> float:
    order = sec.get("order", 100)
    return float(order) if isinstance(order, (int, float)) else 100.0


def _fmt(value: Any) -> str:
    """A table value as plain text (escaped by :func:`qkcov.htmlsafe.table`)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _table(columns: list[str], rows: list[list[Any]], caption: str = "") -> str:
    return esc.table(columns, rows, _fmt, caption)


def _folded(summary: str, inner: str, open_: bool = False) -> str:
    return f"<details{' open' if open_ else ''}><summary>{esc.text(summary)}</summary>{inner}</details>"


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
        src = esc.attr(esc.png_data_url(read_regular_bytes(real, what="figure")))
    else:
        src = esc.url(Path(os.path.relpath(real, ids.base)).as_posix())
    return (
        f'<figure><img alt="{esc.attr(fig["file"])}" src="{src}">'
        f"<figcaption>{esc.text(fig.get('caption', ''))}</figcaption></figure>"
    )


def _read_json(root: Path, folder: Path, name: str) -> Any:
    path = _inside(root, folder / name, "figure")
    return parse_json(read_regular_bytes(path, what="figure spec"), path)


def _scatter(root: Path, folder: Path, fig: dict[str, Any], ids: _Ids) -> str:
    from .views import scatter_html

    div = scatter_html(_read_json(root, folder, fig["file"]), ids("scatter"))
    return f"<figure>{div}<figcaption>{esc.text(fig.get('caption', ''))}</figcaption></figure>"


def _head_html(folder: Path, hd: dict[str, Any], root: Path, anchor: str, ids: _Ids) -> str:
    from .views import token_view_html, verdict_html

    name = esc.text(hd["name"])
    parts = [f'<article class="head" id="{esc.anchor(anchor, hd["name"])}"><h3>{name}</h3>']
    parts.append(verdict_html(hd.get("verdict"), str(hd.get("lead", ""))))
    figs = hd.get("figures", [])
    if figs:
        parts.append(
            '<div class="figs">' + "".join(_png(root, folder, f, ids) for f in figs) + "</div>"
        )
    for sc in hd.get("scatter", []):
        parts.append(_scatter(root, folder, sc, ids))
    parts.append(f"<h4>{name}: per-prompt token view</h4>")
    if hd.get("token_view"):
        parts.append(token_view_html(_read_json(root, folder, hd["token_view"]), ids("tokenview")))
    else:
        reason = hd.get("token_view_reason") or "Token view unavailable: no per-prompt data saved."
        parts.append(f'<p class="tv-missing">{esc.text(reason)}</p>')
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _section_html(folder: Path, sec: dict[str, Any], root: Path, ids: _Ids) -> str:
    import plotly.io as pio

    anchor = str(sec.get("key", folder.name))
    heads = sec.get("heads", [])
    parts = [f'<section id="{esc.anchor(anchor)}"><h2>{esc.text(sec["title"])}</h2>']
    rel = folder.relative_to(root) if folder != root else Path(".")
    parts.append(f'<p class="src">artifacts: <code>{esc.text(rel)}/</code></p>')
    if heads:  # a run: the verdicts first, one line per head
        parts.append('<ul class="verdicts">' + "".join(
            f'<li><a href="#{esc.anchor(anchor, hd["name"])}">{esc.text(hd["name"])}</a>: '
            f"{esc.text(_verdict_line(hd))}</li>"
            for hd in heads
        ) + "</ul>")  # fmt: skip
    text = "".join(f"<p>{esc.text(para)}</p>" for para in sec.get("text", []))
    if heads and text:  # method text: escaped paragraphs only (no markup from a section)
        parts.append(_folded("How this was measured", text))
    else:
        parts.append(text)
    for hd in heads:
        parts.append(_head_html(folder, hd, root, anchor, ids))
    if not heads and (folder / "run.json").is_file():
        parts.append(f'<p class="tv-missing">{esc.text(NO_VIEW_OLD)}</p>')
    if sec.get("summary"):
        rows = [[k, v] for k, v in sec["summary"].items()]
        table = _table(["quantity", "value"], rows, "Key numbers")
        parts.append(_folded("Key numbers", table) if heads else table)
    figs = "".join(_png(root, folder, f, ids) for f in sec.get("figures", []))
    figs += "".join(_scatter(root, folder, f, ids) for f in sec.get("scatter", []))
    for fig in sec.get("interactive", []):
        spec = _inside(root, folder / fig["file"], "figure")
        try:
            pfig = pio.from_json(read_regular_bytes(spec, what="figure spec").decode("utf-8"))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            first = str(err).strip().split("\n")[0]
            raise ValueError(f"{spec}: not a valid plotly figure ({first})") from None
        div = pio.to_html(pfig, full_html=False, include_plotlyjs=False)
        figs += f"<figure>{div}<figcaption>{esc.text(fig.get('caption', ''))}</figcaption></figure>"
    parts.append(figs)
    for page in sec.get("pages", []):  # another page of the folder (the explain atlas)
        real = _inside(root, folder / page["file"], "page")
        href = esc.url(Path(os.path.relpath(real, ids.base)).as_posix())
        cap = str(page.get("caption", "") or page["file"])
        parts.append(f'<p class="page"><a href="{href}">{esc.text(cap)}</a></p>')
    for t in sec.get("tables", []):
        cap = str(t.get("caption", "") or "table")
        parts.append(
            _folded(
                f"Table: {cap} ({_count(len(t['rows']), 'row')})", _table(t["columns"], t["rows"])
            )
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
    listed: Listed = None,
) -> Path:
    """Write ``root/report.html`` (or ``out``) showing every section found under ``root``
    (with ``listed``, only those a verified manifest lists: :func:`find_sections`).

    PNG figures are referenced by their paths inside the folder (one copy of each; the page
    reads nothing else and nothing from the network), or embedded as base64 with
    ``embed_figures=True`` (one self-contained file). Plotly figures (older sections only)
    get one ``plotly.min.js`` beside the report."""
    from .views import VIEW_CSS, VIEW_JS

    root = Path(root)
    sections = find_sections(root, listed)
    if not sections:
        raise FileNotFoundError(
            f"no {SECTION_FILE} found under {root}; run an experiment command with --out {root} first"
        )
    if title is None:  # one run: its section title names the records file and features
        title = f"qkcov — {sections[0][1]['title']}" if len(sections) == 1 else "qkcov report"
    nav = " ".join(
        f'<a href="#{esc.anchor(s.get("key", f.name))}">{esc.text(s["title"])}</a>'
        for f, s in sections
    )
    target = Path(out) if out is not None else root / "report.html"
    for path in (target, root / "report_index.json"):  # before any write
        _may_replace(path, root, listed)
    needs_plotly = any(s.get("interactive") for _, s in sections)
    plotly_js = ""
    if needs_plotly:
        import plotly.offline

        js = plotly.offline.get_plotlyjs().encode()
        _may_replace(target.parent / PLOTLY_FILE, root, listed, same=js)
        atomic_write_bytes(target.parent / PLOTLY_FILE, js)
        plotly_js = f'<script src="{PLOTLY_FILE}"></script>'
    ids = _Ids(target.parent, embed_figures)
    parts = []
    for f, s in sections:  # a section of the wrong shape: one line naming it
        with artifact_errors(f / SECTION_FILE, "section file"):
            parts.append(_section_html(f, s, root, ids))
    body = "\n".join(parts)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc.text(title)}</title>"
        f"<style>{_CSS}{VIEW_CSS}</style>{plotly_js}</head><body><h1>{esc.text(title)}</h1>"
        f"<nav>{nav}</nav><p class='src'>{esc.text(METHOD_NOTE)}</p>{body}"
        f"<script>{VIEW_JS}</script></body></html>"
    )
    atomic_write_bytes(target, seal_html(page).encode())
    write_json(
        root / "report_index.json",
        {
            "report": target.name,
            "plotly": PLOTLY_FILE if needs_plotly else None,
            "sections": [
                {"key": s.get("key"), "folder": str(f.relative_to(root))} for f, s in sections
            ],
        },
        seal=True,
    )
    return target


def _may_replace(path: Path, root: Path, listed: Listed, same: bytes | None = None) -> None:
    """The overwrite rule for the report's own files: a missing file, one qkcov sealed and
    nobody changed, one the verified manifest lists with its current hash, or one already
    holding exactly ``same``; anything else is refused in one line."""
    if not os.path.lexists(path) or os.path.isdir(path):
        return  # a folder in the way: the write itself fails naming it
    with contextlib.suppress(ValueError, OSError):
        data = read_regular_bytes(path, cap=64 << 20)
        if same is not None and data == same:
            return
        rel = path.resolve().relative_to(root.resolve()).as_posix()
        if listed is not None and listed.get(rel) == hashlib.sha256(data).hexdigest():
            return
    check_replaceable(path, flag="")


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
        manifest = verify_run_folder(root)
        listed = {e["path"]: str(e.get("sha256")) for e in manifest["files"]}
        target = build_report(root, title=title, listed=listed)
        extra = [PLOTLY_FILE] if (root / PLOTLY_FILE).is_file() else []
        add_to_manifest(root, [target.name, "report_index.json", *extra])
    return target
