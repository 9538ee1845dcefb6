"""The HTML report embeds every section found under a folder, offline."""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402

from qkcov.cli import main  # noqa: E402
from qkcov.report import build_report, write_section  # noqa: E402


def _section(folder, key, order):
    folder.mkdir(parents=True)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(folder / "fig.png")
    plt.close(fig)
    (folder / "fig.plotly.json").write_text(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])).to_json())
    write_section(
        folder,
        key=key,
        title=f"Section {key}",
        order=order,
        summary={"rank": 3, "delta_p": 0.25},
        tables=[{"caption": "t", "columns": ["a", "b"], "rows": [[1, 2.5]]}],
        figures=[{"file": "fig.png", "caption": "a line"}],
        interactive=[{"file": "fig.plotly.json", "caption": "interactive"}],
    )


def test_report_embeds_sections_in_order(tmp_path):
    _section(tmp_path / "b", "second", 2)
    _section(tmp_path / "a", "first", 1)
    out = build_report(tmp_path)
    page = out.read_text()
    assert page.index("Section first") < page.index("Section second")
    assert page.count("<img ") == 2
    # plotly figures (older sections) use ONE plotly.js copy beside the page, nothing fetched
    assert "Plotly.newPlot" in page and page.count('<script src="plotly.min.js">') == 1
    assert (tmp_path / "plotly.min.js").is_file() and "http" not in page.split("<body>")[0]
    assert sum(1 for _ in tmp_path.rglob("plotly*.js")) == 1
    index = json.loads((tmp_path / "report_index.json").read_text())
    assert [s["key"] for s in index["sections"]] == ["first", "second"]


def test_section_with_missing_figure_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_section(
            tmp_path, key="x", title="x", figures=[{"file": "missing.png", "caption": ""}]
        )


def test_report_cli_errors_on_empty_folder(tmp_path, capsys):
    from qkcov.artifacts import RunFolder

    assert main(["report", str(tmp_path)]) == 2  # not a run folder at all
    assert "no manifest: incomplete run" in capsys.readouterr().err
    with RunFolder(tmp_path / "run", command="qkcov test"):
        pass  # a complete run without any section
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "no section.json" in capsys.readouterr().err


def test_old_section_without_head_blocks_renders_with_a_reason(tmp_path):
    """A run section written before head blocks existed: the page says why there is no view."""
    from qkcov.report.html import NO_VIEW_OLD

    (tmp_path / "run.json").write_text("{}")
    write_section(tmp_path, key="run", title="Contrast analysis", text=["old"])
    page = build_report(tmp_path).read_text()
    assert page.count(NO_VIEW_OLD) == 1 and "Contrast analysis" in page


def test_unavailable_groups_collapse_into_one_row():
    from qkcov.report.run import _subspace_rows

    unavailable = {"available": False, "reason": "significance unavailable (n=2)"}
    groups = {
        f"g{i}": {"rank": i % 3, "rank_energy": 1, "n_pos": 2, "n_neg": 2, "singular_values": [1.0],
                  "significance": unavailable}
        for i in range(40)
    }  # fmt: skip
    groups["pooled"] = {"rank": 2, "rank_energy": 1, "n_pos": 80, "n_neg": 80,
                        "singular_values": [3.0], "significance": {"available": True, "p_value": 0.01}}  # fmt: skip
    groups["g39"] = dict(groups["g39"], n_pos=4, significance={"available": False, "reason": "significance unavailable (n=4)"})  # fmt: skip
    info = {"heads": [{"name": "L0H0", "features": {"f": {"groups": groups}}}]}
    rows = _subspace_rows(info)
    assert len(rows) == 2
    assert rows[0][2] == "pooled" and rows[0][7] == 0.01
    assert rows[1][2].startswith("40 groups (g0, g1, g2, g3, …)") and rows[1][3] == "0–2"
    assert rows[1][5] == "2–4" and rows[1][7] == "unavailable: significance unavailable"


@pytest.mark.parametrize("kind", ["token_view", "scatter", "figures"])
def test_head_block_files_outside_the_folder_are_refused(tmp_path, kind):
    from qkcov.artifacts import write_json

    entry = "/etc/hostname" if kind == "token_view" else [{"file": "/etc/hostname"}]
    write_json(
        tmp_path / "section.json",
        {"key": "h", "title": "t", "heads": [{"name": "L0H0", kind: entry}]},
    )
    with pytest.raises(ValueError, match=r"heads\[L0H0\]|/etc/hostname.*outside"):
        build_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_figures_are_referenced_once_or_embedded_on_request(tmp_path):
    _section(tmp_path / "a", "first", 1)
    page = build_report(tmp_path).read_text()
    assert 'src="a/fig.png"' in page and "base64," not in page
    page = build_report(tmp_path, embed_figures=True).read_text()
    assert 'src="a/fig.png"' not in page and page.count("data:image/png;base64,") == 1


@pytest.fixture(scope="module")
def tiny_saved_run(tmp_path_factory):
    """A small run of a tiny Llama on agreement records (null rule, causal rank curve)."""
    from qkcov.models.tiny import tiny_model, tiny_tokenizer
    from qkcov.pipeline import RunConfig, run
    from qkcov.tasks.builtin import build_task_records
    from qkcov.tasks.records import save_records

    base = tmp_path_factory.mktemp("figs")
    save_records(base / "pronouns.jsonl", build_task_records("agreement", n=48))
    cfg = RunConfig(heads="L1H2", n_random=20, n_permutations=50, n_bootstrap=0, batch_size=16)
    run(cfg, base / "pronouns.jsonl", base / "run", quiet=True,
        loaded=(tiny_model("llama"), tiny_tokenizer()))  # fmt: skip
    return base / "run"


def _drawn_figures(monkeypatch, out):
    """Redraw a run's figures, keeping each matplotlib figure by file name."""
    from qkcov.artifacts import read_json
    from qkcov.report.figures import position, run

    figs = {}

    def keep(fig, path, *args, **kwargs):
        figs[path.name] = fig
        return path

    monkeypatch.setattr(run, "save_png", keep)
    monkeypatch.setattr(position, "save_png", keep)
    run.plot_heads(out)
    info = read_json(out / "run.json")
    position.plot_rotary(out, info)
    position.plot_offsets(out, info)
    return figs, info


def test_legends_are_readable_at_report_width(tiny_saved_run, monkeypatch):
    from qkcov.report.figures.common import LEGEND_FONTSIZE

    figs, _ = _drawn_figures(monkeypatch, tiny_saved_run)
    assert LEGEND_FONTSIZE >= 10
    checked = 0
    for name in ("rotary_L1H2.png", "L1H2.swaps.png", "L1H2.scree.png", "offsets.png"):
        legends = [ax.get_legend() for ax in figs[name].axes if ax.get_legend() is not None]
        assert legends, name
        for leg in legends:
            sizes = [t.get_fontsize() for t in leg.get_texts()]
            assert sizes and min(sizes) >= 10, (name, sizes)
            checked += 1
    assert checked >= 5
    plt.close("all")


def test_scree_band_is_the_null_of_the_rule_in_force(tiny_saved_run, monkeypatch):
    figs, info = _drawn_figures(monkeypatch, tiny_saved_run)
    h = info["heads"][0]
    sig = h["features"]["feature"]["groups"]["pooled"]["significance"]
    band = sig["step_null_band"]  # [3, K]: 5 %, 95 %, (1 − α) per step of the sequential test
    assert len(band) == 3 and len(band[0]) == len(sig["step_p_values"]) >= 1
    assert all(lo <= hi for lo, hi in zip(band[0], band[1], strict=True))
    ax = figs["L1H2.scree.png"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "feature: step null 5–95 %" in labels and "feature: whitened ΔC" in labels
    assert not any("raw" in x for x in labels)
    (poly,) = ax.collections  # the shaded band: exactly the saved step null
    ys = poly.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(min(band[0])) and max(ys) == pytest.approx(max(band[1]))
    # the observed curve is the whitened spectrum the test read
    line = ax.get_lines()[0]
    w = sig["whitened_singular_values"]
    assert list(line.get_ydata()[:3]) == pytest.approx(w[:3])
    plt.close("all")


def test_title_and_method_text_name_the_run(tiny_saved_run):
    from qkcov.artifacts import read_json

    page = (tiny_saved_run / "report.html").read_text()
    title = page.split("<title>")[1].split("</title>")[0]
    assert "pronouns.jsonl" in title and "feature" not in title  # one unnamed feature
    sec = read_json(tiny_saved_run / "section.json")
    text = " ".join(sec["text"])
    assert "whitened sequential deflated permutation test" in text
    assert "causal rank" in text and "above the permutation null's (1−α) quantile" not in text


def test_a_section_links_only_files_of_its_folder(tmp_path):
    """``pages`` (the explain atlas' link): a file inside the folder becomes a relative link;
    one outside it, or missing, is refused in one line naming the section."""
    from qkcov.artifacts import write_json
    from qkcov.report import build_report

    root = tmp_path / "r"
    (root / "x").mkdir(parents=True)
    (root / "x" / "atlas.html").write_text("<p>atlas</p>")
    (tmp_path / "evil.html").write_text("<p>outside</p>")
    write_json(root / "x" / "section.json",
               {"title": "t", "pages": [{"file": "atlas.html", "caption": "the atlas"}]})  # fmt: skip
    page = build_report(root).read_text()
    assert '<a href="x/atlas.html">the atlas</a>' in page
    for bad in ("../../evil.html", "missing.html"):
        write_json(root / "x" / "section.json", {"title": "t", "pages": [{"file": bad}]})
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            build_report(root)
        assert len(str(err.value).splitlines()) == 1 and "section" in str(err.value)
