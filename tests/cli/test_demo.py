"""``qkcov demo`` end to end on a tiny model: every section, the explain atlas linked from the
report, and a folder ``qkcov report`` verifies."""

from __future__ import annotations

import json
import re

from qkcov.cli import main


def test_demo_on_a_tiny_model_links_the_atlas(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "explain (best 5 of 8 heads" in printed
    page = (out / "report.html").read_text()
    for key in ("filter", "binding", "agreement", "explain"):
        assert f'id="{key}"' in page, key
    href = re.search(r'<a href="([^"]*atlas\.html)"', page)
    assert href is not None and (out / href.group(1)).is_file()
    data = json.loads((out / "explain" / "explain.json").read_text())
    assert len(data["heads"]) == 8
    assert f"<td>{data['heads'][0]['name']}</td><td>{data['heads'][0]['top']}</td>" in page
    # the run folder's manifest lists the explain files: `qkcov report` verifies and rebuilds
    assert main(["report", str(out)]) == 0
    assert "What each head selects" in (out / "report.html").read_text()
