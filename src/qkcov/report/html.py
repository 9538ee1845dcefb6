"""One self-contained HTML report from saved artifacts.

Every experiment writes ``<its folder>/section.json`` (via :func:`write_section`): a title,
key numbers, short text, tables and the figure files it produced. :func:`build_report`
finds every section below a folder and embeds PNGs as base64 and plotly figures (saved as
JSON) with one offline copy of plotly.js, so the page works without a network.

Only files inside the report folder are ever read: every section's figure paths are
resolved (symlinks included) and anything outside the folder is refused.
:func:`report_run_folder` (the ``qkcov report`` command) additionally verifies the
folder against its run manifest first and records the report in it.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

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
) -> Path:
    """Describe one experiment's results for the report (``out_dir/section.json``).

    ``figures``/``interactive`` entries are ``{"file": <path relative to out_dir>, "caption": str}``;
    ``tables`` entries are ``{"caption": str, "columns": [...], "rows": [[...], ...]}``.
    """
    out_dir = Path(out_dir)
    figures, interactive = list(figures), list(interactive)
    for entry in [*figures, *interactive]:
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
    for kind in ("figures", "interactive"):
        entries = sec.get(kind, [])
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


def _section_html(folder: Path, sec: dict[str, Any], root: Path) -> str:
    import plotly.io as pio

    anchor = html.escape(sec.get("key", folder.name))
    parts = [f'<section id="{anchor}"><h2>{html.escape(sec["title"])}</h2>']
    rel = folder.relative_to(root) if folder != root else Path(".")
    parts.append(f'<p class="src">artifacts: <code>{html.escape(str(rel))}/</code></p>')
    for para in sec.get("text", []):
        parts.append(f"<p>{html.escape(para)}</p>")
    if sec.get("summary"):
        rows = [[k, v] for k, v in sec["summary"].items()]
        parts.append(_table(["quantity", "value"], rows, "Key numbers"))
    for t in sec.get("tables", []):
        parts.append(_table(t["columns"], t["rows"], t.get("caption", "")))
    for fig in sec.get("figures", []):
        data = base64.b64encode(_inside(root, folder / fig["file"], "figure").read_bytes()).decode()
        parts.append(
            f'<figure><img alt="{html.escape(fig["file"])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(fig.get('caption', ''))}</figcaption></figure>"
        )
    for fig in sec.get("interactive", []):
        pfig = pio.from_json(_inside(root, folder / fig["file"], "figure").read_text())
        div = pio.to_html(pfig, full_html=False, include_plotlyjs=False)
        parts.append(
            f"<figure>{div}<figcaption>{html.escape(fig.get('caption', ''))}</figcaption></figure>"
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


def build_report(
    root: str | Path, out: str | Path | None = None, title: str = "qkcov report"
) -> Path:
    """Write ``root/report.html`` (or ``out``) embedding every section found under ``root``."""
    import plotly.offline

    root = Path(root)
    sections = find_sections(root)
    if not sections:
        raise FileNotFoundError(
            f"no {SECTION_FILE} found under {root}; run an experiment command with --out {root} first"
        )
    nav = " ".join(
        f'<a href="#{html.escape(s.get("key", f.name))}">{html.escape(s["title"])}</a>'
        for f, s in sections
    )
    needs_plotly = any(s.get("interactive") for _, s in sections)
    plotly_js = f"<script>{plotly.offline.get_plotlyjs()}</script>" if needs_plotly else ""
    body = "\n".join(_section_html(f, s, root) for f, s in sections)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style>{plotly_js}</head><body><h1>{html.escape(title)}</h1>"
        f"<nav>{nav}</nav>{body}</body></html>"
    )
    target = Path(out) if out is not None else root / "report.html"
    atomic_write_bytes(target, page.encode())
    write_json(
        root / "report_index.json",
        {
            "report": target.name,
            "sections": [
                {"key": s.get("key"), "folder": str(f.relative_to(root))} for f, s in sections
            ],
        },
    )
    return target


def report_run_folder(root: str | Path, title: str = "qkcov report") -> Path:
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
        add_to_manifest(root, [target.name, "report_index.json"])
    return target
