"""Pages that span several runs, from their artifacts only: the ``qkcov compare`` page and
the index page of ``qkcov report DIR`` over a folder of run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import htmlsafe as esc

__all__ = ["comparison_html", "write_comparison_page", "run_folders", "write_index"]

GENERATOR = "qkcov-multi-run"
INDEX_FILE = "index.html"
_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:0.6em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f2f2f2}"
    ".note{color:#555}"
)


_INDEX_COLUMNS = (
    "run", "model", "records", "dtype", "best head", "verdict", "headline", "rank", "Δp",
    "Δp random", "p",
)  # fmt: skip


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return ", ".join(_cell(x) if not isinstance(x, float) else f"{x:.1f}" for x in v[:8]) + (
            " …" if len(v) > 8 else ""
        )
    return esc.text(str(v))


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc.text(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, body: str) -> str:
    """A whole page, sealed (:func:`qkcov.artifacts.seal_html`): qkcov later replaces only
    a page of its own that nobody changed."""
    from ..artifacts import seal_html

    return seal_html(
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='generator' "
        f"content='{GENERATOR}'><title>{esc.text(title)}</title><style>{_CSS}</style>"
        f"</head><body><h1>{esc.text(title)}</h1>{body}</body></html>"
    )


def comparison_html(cmp: Any, *, full_page: bool = True) -> str:
    """The comparison as HTML: principal angles per pair of runs, ranks and swaps per run."""
    runs = "".join(f"<li>{esc.text(r)}</li>" for r in cmp.runs)
    angles = _table(
        ["head", "feature", "run a", "run b", "rank a/b", "k", "key angles @k (°)",
         "query angles @k (°)", "random max @k (°)", "top-1 key°", "top-1 query°",
         "energy rank a/b", "key angles at energy rank (°)"],
        [[p["head"], p["feature"], p["a"], p["b"], f"{p['rank_a']}/{p['rank_b']}",
          p["common_rank"], p["key_deg_common"], p["query_deg_common"],
          p["random_max_deg_common"], p["key_top1_deg"], p["query_top1_deg"],
          f"{p['rank_energy_a']}/{p['rank_energy_b']}", p["key_deg_energy"]] for p in cmp.pairs],
    )  # fmt: skip
    ranks = _table(
        ["run", "head", "feature", "verdict", "condition", "rank", "rule", "rank (energy)",
         "rank (null)", "rank (causal)", "p", "Δp swap", "Δp random"],
        [[r["run"], r["head"], r["feature"], r.get("verdict"), r["swap_condition"], r["rank"],
          r["rank_rule"], r["rank_energy"], r["rank_null"], r["rank_causal"], r["p_value"],
          r["delta_p"], r["delta_p_random"]] for r in cmp.ranks],
    )  # fmt: skip
    only = (
        f"<p class='note'>In one run only, not compared: {esc.text(', '.join(cmp.only_in_one))}</p>"
        if cmp.only_in_one
        else ""
    )
    body = (
        f"<p>Model <b>{esc.text(cmp.model)}</b>; runs:</p><ul>{runs}</ul>"
        "<h2>Principal angles between the subspaces</h2><p class='note'>0° = the same "
        "direction; 90° = orthogonal. Angles are between the first k = min(rank a, rank b) "
        "directions of each run (a bigger subspace covers more of the head, so its angles to "
        "anything shrink); 'random max' is the median largest angle between two random "
        "k-dimensional subspaces of the head.</p>"
        f"{angles}{only}<h2>Ranks and swap effects</h2>{ranks}"
    )
    return _page("qkcov compare", body) if full_page else body


def write_comparison_page(cmp: Any, out: str | Path, *, force: bool = False) -> Path:
    """``out`` (an HTML file): never replaces a file qkcov did not write, or one it wrote
    that was changed since (unless ``force``)."""
    from ..artifacts import atomic_write_bytes, check_replaceable

    out = Path(out)
    check_replaceable(out, force=force)
    atomic_write_bytes(out, comparison_html(cmp).encode())
    return out


def run_folders(root: str | Path) -> list[Path]:
    """Sub-folders of ``root`` (any depth) holding a run (a ``run.json`` or a manifest)."""
    from ..artifacts import MANIFEST_FILE
    from ..results import RUN_JSON

    root = Path(root)
    found = {p.parent for name in (RUN_JSON, MANIFEST_FILE) for p in root.rglob(name)}
    out = []
    for f in sorted(found):
        if f != root and not any(a in found for a in f.parents if a != root and root in a.parents):
            out.append(f)
    return out


def write_index(root: str | Path, title: str = "qkcov runs") -> Path:
    """``root/index.html`` linking every run folder under ``root`` with its key numbers.

    Each run folder is checked against its manifest first: a partial or mixed run is refused
    (``ValueError`` naming it) and nothing is written.
    """
    from ..artifacts import (
        artifact_errors,
        atomic_write_bytes,
        check_replaceable,
        read_json,
        verify_run_folder,
    )
    from ..results import RUN_JSON, headline_of, headline_p

    root = Path(root)
    folders = run_folders(root)
    if not folders:
        raise FileNotFoundError(f"{root}: no run folders (with {RUN_JSON}) under it")
    target = root / INDEX_FILE
    check_replaceable(target)
    rows = []
    for f in folders:
        verify_run_folder(f)  # refuses a partial or mixed run
        rel = f.relative_to(root).as_posix()
        report = f / "report.html"
        link = (
            f"<a href='{esc.url(rel + '/report.html')}'>{esc.text(rel)}</a>"
            if report.is_file()
            else esc.text(rel)
        )
        if not (f / RUN_JSON).is_file():
            rows.append([link, *[""] * (len(_INDEX_COLUMNS) - 1)])
            continue
        with artifact_errors(f / RUN_JSON, "run.json"):
            d = read_json(f / RUN_JSON, expect=dict)
            heads = [x for x in d.get("heads") or [] if isinstance(x, dict)]
            best = next((x for x in heads if x.get("name") == d.get("best_head")), None)
            prov = d.get("provenance") if isinstance(d.get("provenance"), dict) else {}
            ident = (
                prov.get("model_identity") if isinstance(prov.get("model_identity"), dict) else {}
            )
            hl = None if best is None else headline_of(best)
            verdict = None if best is None else (best.get("verdict") or {}).get("status")
            c = None
            if best is not None and hl is not None and hl.condition:
                c = ((best.get("swaps") or {}).get("conditions") or {}).get(hl.condition)
            rows.append(
                [link, ident.get("name") or d.get("model"), d.get("n_records"), prov.get("dtype"),
                 None if best is None else best.get("name"), verdict,
                 None if hl is None else hl.label,
                 None if hl is None else f"{hl.rank} ({hl.rule})",
                 None if c is None else c.get("delta_p"),
                 None if c is None else ((c.get("random") or {}).get("delta_p") or {}).get("mean"),
                 None if best is None else headline_p(best)]
            )  # fmt: skip
    cells = "".join(
        "<tr>" + "".join(f"<td>{v if i == 0 else _cell(v)}</td>" for i, v in enumerate(r)) + "</tr>"
        for r in rows
    )
    cols = list(_INDEX_COLUMNS)
    table = (
        "<table><thead><tr>" + "".join(f"<th>{esc.text(c)}</th>" for c in cols) + "</tr></thead>"
        f"<tbody>{cells}</tbody></table>"
    )
    atomic_write_bytes(target, _page(title, table).encode())
    return target
