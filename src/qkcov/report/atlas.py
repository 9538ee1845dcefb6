"""The atlas page of ``qkcov explain``, from the saved ``explain.json`` only.

A layer × head grid: each cell is a link coloured by the head's top hypothesis and shaded
by its share; clicking it opens (``:target``) the head's section: its sentence, a bar figure
of every hypothesis' share (inline SVG) with the attention on its positive keys against
uniform attention, the table, and a token view of one corpus sequence (the head's attention
from its last token, keys shaded). Offline: no script library, nothing fetched; every text
goes through :mod:`qkcov.htmlsafe`, the one escaping path of every page.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from pathlib import Path
from typing import Any

from .. import htmlsafe
from ..artifacts import atomic_write_bytes

__all__ = ["write_atlas", "atlas_html", "ATLAS_FILE", "hypothesis_colour"]

ATLAS_FILE = "atlas.html"

_PALETTE = {
    "previous-token": 210,
    "induction": 0,
    "same-token": 30,
    "first-token": 0,  # grey, see below
    "same-word": 280,
    "delimiter": 120,
    "capitalised": 330,
    "number": 50,
}


def hypothesis_colour(name: str, share: float = 1.0) -> str:
    """``rgb(...)`` of a hypothesis, lighter for a smaller share (0..1)."""
    share = min(max(float(share), 0.0), 1.0)
    if name == "first-token":
        hue, sat = 0.0, 0.0
    elif name.startswith("offset:"):
        hue, sat = 190 / 360, 0.45
    elif name in _PALETTE:
        hue, sat = _PALETTE[name] / 360, 0.7
    else:
        hue = int(hashlib.sha256(name.encode()).hexdigest()[:4], 16) % 360 / 360
        sat = 0.55
    light = 0.93 - 0.5 * share
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return f"rgb({round(r * 255)},{round(g * 255)},{round(b * 255)})"


_e = htmlsafe.text  # every text and attribute value of the page


def _pct(x: Any) -> str:
    return f"{100 * float(x):.0f} %" if isinstance(x, (int, float)) else "–"


def _selection(h: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in h["hypotheses"] if x.get("part", "selection") == "selection"]


def _bars(h: dict[str, Any]) -> str:
    """Inline SVG: one bar per selection hypothesis (share), the unexplained rest last."""
    rows = [
        (x["name"], float(x["share"]), _direction(x) == "avoided" and float(x["share"]) >= 0.005)
        for x in _selection(h)
    ]  # "(avoided)" only beside a share that shows (≥ 0.5 %)
    rows.append(("rest (unexplained)", float(h.get("unexplained", 0.0)), False))
    w, bh = 360, 16
    parts = [f'<svg class="bars" width="{w + 250}" height="{bh * len(rows) + 4}" role="img">']
    for i, (name, share, avoided) in enumerate(rows):
        y = i * bh + 2
        width = max(0.0, min(1.0, share)) * w
        colour = hypothesis_colour(name, 0.8) if not name.startswith("rest") else "#bbb"
        label = _pct(share) + (" (avoided)" if avoided else "")
        parts.append(
            f'<text x="0" y="{y + 12}" font-size="11">{_e(name)}</text>'
            f'<rect x="130" y="{y + 2}" width="{width:.1f}" height="{bh - 4}" fill="{colour}">'
            f"<title>{_e(name)}: {_e(label)}</title></rect>"
            f'<text x="{134 + width:.1f}" y="{y + 12}" font-size="11">{_e(label)}</text>'
        )
    parts.append("</svg>")
    gate = (
        f"The first key (the gate, not in the bars): {_pct(h.get('sink_share'))} of the head's "
        f"whole logit variance; {_pct(h.get('sink_attention'))} of its attention."
    )
    return "".join(parts) + f'<p class="note">{_e(gate)}</p>'


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(float(x)) if isinstance(x, (int, float)) else "–"


def _direction(x: dict[str, Any]) -> str:
    """``picked`` / ``avoided``: whether the head's logits are higher or lower on the
    hypothesis' keys (a share counts variance either way); ``–`` for neither or an older
    explain.json."""
    d = x.get("direction")
    if not isinstance(d, int) or isinstance(d, bool) or d == 0:
        return "–"
    return "picked" if d > 0 else "avoided"


def _table(h: dict[str, Any]) -> str:
    cols = ["hypothesis", "part", "keys", "share", "alone", "logit contrast", "in subspace",
            "subspace variance", "random", "rank", "attention", "uniform", "pairs",
            "verdict"]  # fmt: skip
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = []
    for x in h["hypotheses"]:
        cells = [x["name"], x.get("part", "selection"), _direction(x), _pct(x["share"]),
                 _pct(x["solo_share"]),
                 _num(x.get("logit_contrast"), "{:+.2f}"), _pct(x.get("subspace_share")),
                 _pct(x.get("subspace_variance")), _pct(x["random_share"]), x["rank"],
                 _num(x["attention"]), _num(x["attention_baseline"]), x["n_pairs"],
                 x["verdict"]]  # fmt: skip
        tip = x.get("verdict_reason") or ""
        body.append(
            "<tr>"
            + "".join(f"<td>{_e(c)}</td>" for c in cells[:-1])
            + f'<td title="{_e(tip)}">{_e(cells[-1])}</td></tr>'
        )
    return (
        f'<table class="hyp"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )


def _token_view(example: dict[str, Any] | None, name: str) -> str:
    if not example or name not in example.get("attention", {}):
        return '<p class="tv-missing">Token view unavailable: no attention row saved for this head.</p>'
    row = example["attention"][name]
    toks = example["tokens"]
    q = int(example.get("query", len(toks) - 1))
    positives = {int(i) for i in example.get("positives") or [] if isinstance(i, int)}
    hyp = example.get("hypothesis")
    # the first key (the gate) in grey by its own attention; the others in red relative to
    # the largest of them (the selection), so a strong sink does not blank what is selected
    rest = [float(a) for a in row[1 : q + 1]]
    top = max(rest, default=0.0)
    spans = []
    for i, tok in enumerate(toks[: q + 1]):
        a = float(row[i]) if i < len(row) else 0.0
        if i == 0 and q > 0:
            colour = f"rgba(90,90,90,{0.6 * a:.3f})"
        else:
            colour = f"rgba(220,60,30,{(a / top if top > 0 else 0.0):.3f})"
        cls = "tok" + (" q" if i == q else "") + (" pos" if i in positives else "")
        tip = f"position {i}: attention {a:.3f}" + (f"; {hyp} holds" if i in positives else "")
        spans.append(
            f'<span class="{cls}" style="background:{colour}" title="{_e(tip)}">{_e(tok)}</span>'
        )
    sink = float(row[0]) if row and q > 0 else 0.0
    where = f" Keys where {hyp} holds are underlined." if hyp and positives else ""
    return (
        f'<p class="tv-cap">Attention of the boxed token of corpus document '
        f"{_e(example.get('document', '?'))} over its keys: the first key (grey, the gate) holds "
        f"{_e(_pct(sink))}; the others are shaded red relative to the largest of them "
        f"({_e(f'{100 * top:.1f} %')}).{_e(where)}</p>"
        f'<p class="tokens">{"".join(spans)}</p>'
    )


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table.grid{border-collapse:collapse;margin:1em 0}
table.grid td,table.grid th{padding:0;border:1px solid #fff;font-size:11px;text-align:center}
table.grid .cell{display:block;width:34px;height:22px;line-height:22px;color:#111;text-decoration:none}
table.grid a.cell:hover,table.grid a.cell:focus{outline:2px solid #000}
table.grid .cell.empty{display:block;width:34px;height:22px;background:#f6f6f6}
.legend span{display:inline-block;padding:2px 6px;margin:2px;font-size:12px;border-radius:3px}
section.head{display:none;border-top:2px solid #444;margin-top:1em;padding-top:.5em}
section.head:target{display:block}
table.hyp{border-collapse:collapse;font-size:13px}
table.hyp td,table.hyp th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.hyp td:first-child{text-align:left}
.tokens{font-family:monospace;white-space:pre-wrap;line-height:1.7}
.tok{border-radius:2px}.tok.q{outline:2px solid #000}
.tok.pos{text-decoration:underline 2px;text-underline-offset:3px}
.note{color:#555;font-size:13px}
"""


def _example_of(h: dict[str, Any], examples: list, data: dict[str, Any]) -> Any:
    i = h.get("example")
    if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(examples):
        return examples[i] if isinstance(examples[i], dict) else None
    return data.get("example")


def atlas_html(data: dict[str, Any]) -> str:
    """The atlas page of one ``explain.json`` (a dict)."""
    shape = data.get("shape", {})
    L, H = int(shape.get("n_layers", 0)), int(shape.get("n_heads", 0))
    heads = {h["name"]: h for h in data.get("heads", [])}
    by_pos = {(h["layer"], h["head"]): h for h in heads.values()}
    tops = sorted({h["top"] for h in heads.values() if h.get("top")})
    top_of = {n: next((x for x in h["hypotheses"] if x["name"] == h.get("top")), None)
              for n, h in heads.items()}  # fmt: skip
    best = max((float(x["share"]) for x in top_of.values() if x), default=0.0)
    legend = "".join(
        f'<span style="background:{hypothesis_colour(t, 0.8)}">{_e(t)}</span>' for t in tops
    )
    grid = ['<table class="grid"><thead><tr><th></th>']
    grid += [f"<th>H{j}</th>" for j in range(H)]
    grid.append("</tr></thead><tbody>")
    for layer in range(L):
        grid.append(f"<tr><th>L{layer}</th>")
        for j in range(H):
            h = by_pos.get((layer, j))
            if h is None or not h["hypotheses"]:
                grid.append('<td><span class="cell empty"></span></td>')
                continue
            top = top_of.get(h["name"]) or h["hypotheses"][0]
            colour = hypothesis_colour(top["name"], float(top["share"]) / best if best > 0 else 0)
            tip = h.get("sentence", "")
            grid.append(
                f'<td><a class="cell" href="#head-{_e(h["name"])}" data-head="{_e(h["name"])}" '
                f'data-top="{_e(top["name"])}" style="background:{colour}" title="{_e(tip)}">'
                f"{_e(_pct(top['share']).replace(' %', ''))}</a></td>"
            )
        grid.append("</tr>")
    grid.append("</tbody></table>")
    sections = []
    examples = data.get("examples")
    examples = examples if isinstance(examples, list) else []
    for h in data.get("heads", []):
        name = h["name"]
        sections.append(
            f'<section class="head" id="head-{_e(name)}"><h2>{_e(name)}</h2>'
            f'<p class="sentence">{_e(h.get("sentence", ""))}</p>{_bars(h)}{_table(h)}'
            f"<h3>{_e(name)}: token view</h3>{_token_view(_example_of(h, examples, data), name)}"
            '<p><a href="#top">back to the grid</a></p></section>'
        )
    corpus = data.get("corpus", {})
    mem = data.get("memory", {})
    title = f"qkcov explain atlas — {data.get('model') or 'model'}"
    meta = (
        f"{corpus.get('tokens', '?')} tokens in {corpus.get('sequences', '?')} sequences "
        f"({corpus.get('source', '')}); {len(heads)} heads × {len(data.get('hypotheses', []))} "
        f"hypotheses; running sums {mem.get('bytes', 0) / 2**20:.1f} MiB "
        f"({mem.get('formula', '')})."
    )
    note = (
        "Each cell: the head's top hypothesis (colour) and its share (number in %; shade "
        "relative to the largest share on the page) of what the head selects: the variance of "
        "its attention logits among the keys after the first, each row's keys weighted half "
        "by the head's attention and half uniformly, explained by the hypotheses in greedy "
        "order (exact; shares and rest sum to 100 %). The first key's part (the gate, how "
        "much the head attends at all) is reported apart. Each hypothesis also has a ΔC key "
        "subspace; the table gives the part of its logit contrast that subspace carries. "
        "Click a cell for the head."
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{_e(title)}</title><style>{_CSS}</style></head><body id="top">'
        f'<h1>{_e(title)}</h1><p class="note">{_e(meta)}</p><p class="note">{_e(note)}</p>'
        f'<div class="legend">{legend}</div>{"".join(grid)}{"".join(sections)}</body></html>'
    )


def write_atlas(folder: str | Path) -> Path:
    """``folder/atlas.html`` from ``folder/explain.json``."""
    folder = Path(folder)
    data = json.loads((folder / "explain.json").read_text(encoding="utf-8"))
    return atomic_write_bytes(folder / ATLAS_FILE, atlas_html(data).encode("utf-8"))
