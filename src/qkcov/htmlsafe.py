"""The one HTML escaping path: every page qkcov writes (report, compare, index, notebook
tables) builds its markup from these helpers, so nothing a record or an artifact holds is
ever inserted as HTML.

- :func:`text` / :func:`attr`: any value as element text / a quoted attribute value
  (``& < > " '`` escaped);
- :func:`url`: a link or image source, only ever a *relative file path*: each component
  percent-quoted (so ``javascript:x`` becomes the relative path ``javascript%3Ax``), absolute
  paths and back-slashes refused; :func:`png_data_url` is the one other source allowed
  (bytes qkcov read from a PNG it checked);
- :func:`anchor`: an element id and the ``#fragment`` pointing at it;
- :func:`json_block`: data for the page's script, inert (``<``, ``>``, ``&`` escaped).

Torch-free and dependency-free (no template engine is a declared dependency).
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any
from urllib.parse import quote

__all__ = ["text", "attr", "url", "png_data_url", "anchor", "json_block", "table"]


def text(value: Any) -> str:
    """``value`` as element text."""
    return html.escape(str(value), quote=True)


def attr(value: Any) -> str:
    """``value`` as the content of a double- or single-quoted attribute."""
    return html.escape(str(value), quote=True)


def url(path: str) -> str:
    """A relative file path as an ``href``/``src`` value (already attribute-escaped).

    Every component is percent-quoted, so no scheme (``javascript:``, ``data:``, ``http:``)
    or query survives; ``ValueError`` for an absolute path, a back-slash or an empty one."""
    p = str(path)
    if not p or p.startswith("/") or "\\" in p or "\x00" in p:
        raise ValueError(f"not a relative file path for a link: {p!r}")
    parts = p.split("/")
    if any(part == "" for part in parts[:-1]):
        raise ValueError(f"not a relative file path for a link: {p!r}")
    quoted = "/".join(quote(part, safe="") for part in parts)
    return attr(quoted)


def png_data_url(data: bytes) -> str:
    """PNG bytes as an embedded image source."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def anchor(*parts: Any) -> str:
    """An element id made of ``parts`` (percent-quoted, attribute-safe); link to it with
    ``href="#" + anchor(...)``."""
    return attr(quote("-".join(str(p) for p in parts), safe=""))


def json_block(data: Any, ident: str) -> str:
    """``data`` as an inert JSON script block whose text cannot close the element."""
    body = json.dumps(data, ensure_ascii=False, allow_nan=False)
    body = body.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    body = body.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{attr(ident)}">{body}</script>'


def table(columns: list[Any], rows: list[list[Any]], cell: Any = None, caption: str = "") -> str:
    """An escaped table; ``cell(v) -> str`` formats a value as *text* (escaped here)."""
    fmt = cell or str
    head = "".join(f"<th>{text(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{text(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    cap = f"<caption>{text(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
