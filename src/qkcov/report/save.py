"""A result → its complete run folder (artifacts, figures, ``section.json``,
``report.html``, manifest): what :meth:`qkcov.results.AnalysisResult.save` and ``report``
call (results.py imports no report module; see :func:`qkcov._operation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifacts import RunFolder
from .html import build_report
from .run import write_run_section

__all__ = ["save_run"]


def save_run(
    result: Any, out_dir: str | Path, *, section: dict[str, Any] | None = None, force: bool = False
) -> Path:
    """Write ``result`` (an :class:`~qkcov.results.AnalysisResult`) as a complete run folder,
    replacing ``out_dir`` as a whole (see :meth:`~qkcov.results.AnalysisResult.save`)."""
    with RunFolder(out_dir, command="run", force=force) as staging:
        result.write_artifacts(staging)
        write_run_section(staging, **dict(section or {}))
        build_report(staging)
    return Path(out_dir)
