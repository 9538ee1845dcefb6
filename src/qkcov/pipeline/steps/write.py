"""Step: the run folder — ``run.json`` + ``run.safetensors``, the report section and
``report.html`` (rank 0 only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...results import AnalysisResult
from ...runtime import Timer


def _write_step(
    folder: Any, result: AnalysisResult, section: Mapping[str, Any], timer: Timer
) -> None:
    """Write ``result`` into the locked :class:`~qkcov.artifacts.RunFolder` ``folder``, with
    the run's timings up to now."""
    from ...report import build_report
    from ...report.run import write_run_section

    with folder as staging:
        result.timings = dict(timer.seconds)
        result.seconds = timer.total()
        result.write_artifacts(staging)
        write_run_section(staging, **section)
        build_report(staging)
