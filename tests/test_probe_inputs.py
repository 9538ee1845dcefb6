"""Bad input found by the new-user probe: each is one clear line before the model loads (or
a correct result): records, checkpoints, notebook arguments, torchrun output, --chat spans."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qkcov.artifacts import read_tensor_metadata, write_json
from qkcov.cli import main
from qkcov.config import InputError
from qkcov.engine.checkpoint import Checkpoint, load_checked, save_checked
from qkcov.engine.contrast import resolve_records
from qkcov.models.positions import encode
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.pipeline import RunConfig, RunState, analyze
from qkcov.runtime import is_main_process
from qkcov.tasks.records import ContrastRecord, Span, parse_records, save_records

NO_MODEL = ["--model", "/nonexistent/model"]


def _line(prompt="the cat and the dog", **extra) -> str:
    rec = {"prompt": prompt, "positives": [{"text": "cat"}], "negatives": [{"text": "dog"}]}
    return json.dumps({**rec, **extra})


def _records(n=12, **kw) -> list[ContrastRecord]:
    return [ContrastRecord(f"the cat and the dog {i}", (Span(4, 7),), (Span(16, 19),), **kw)
            for i in range(n)]  # fmt: skip


def _cli(tmp_path, capsys, lines: list[str], *flags: str) -> str:
    data = tmp_path / "r.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), *NO_MODEL, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out").exists(), err
    return err


# --------------------------------------------------------------------------- records
def test_lone_surrogate_is_refused_at_validation_naming_the_line(tmp_path, capsys):
    lines = [_line(), _line(prompt="the cat \\ud800 and the dog")]
    lines[1] = lines[1].replace("\\\\ud800", "\\ud800")
    err = _cli(tmp_path, capsys, lines)
    assert "line 2: prompt: not valid Unicode (a lone surrogate" in err
    with pytest.raises(ValueError, match="system: not valid Unicode"):
        ContrastRecord("the cat", (Span(4, 7),), (), system="x\udc80")


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    deep = '{"prompt": "the cat and the dog", "positives": [{"text": "cat"}], "meta": {"m": '
    deep += "[" * 100_000 + "]" * 100_000 + "}}"
    err = _cli(tmp_path, capsys, [_line(), deep])
    assert "line 2: JSON nested too deeply" in err
    with pytest.raises(ValueError, match="meta: nested deeper than 64 levels"):
        parse_records([_line(meta=json.loads('{"m": ' + "[" * 70 + "]" * 70 + "}"))])


@pytest.mark.parametrize("split", ["train", "test", 1, "Build"])
def test_unknown_split_values_are_refused(split, tmp_path, capsys):
    err = _cli(tmp_path, capsys, [_line(meta={"split": "build"}), _line(meta={"split": split})])
    assert "records (line 2): meta.split must be 'build' or 'heldout'" in err


def test_pins_on_only_some_records_are_refused(tmp_path, capsys):
    lines = [_line(meta={"split": "build"}), _line(meta={"split": "heldout"}), _line(), _line()]
    err = _cli(tmp_path, capsys, lines)
    assert "meta.split pins 2 of 4 records but not line 3, line 4" in err


def test_data_folder_says_it_is_a_folder(tmp_path, capsys):
    rc = main(["run", "--data", str(tmp_path), "--out", str(tmp_path / "out"), *NO_MODEL])
    err = capsys.readouterr().err
    assert rc == 2 and "is a folder, expected a JSONL file" in err


# --------------------------------------------------------------------------- checkpoints
def test_negative_checkpoint_every_is_refused(tmp_path, capsys):
    err = _cli(tmp_path, capsys, [_line()], "--checkpoint-every", "-1")
    assert "--checkpoint-every must be an integer >= 0, got -1" in err


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    err = _cli(tmp_path, capsys, [_line(), _line()], "--resume")
    assert "--resume: no checkpoint to resume" in err and len(err.strip().splitlines()) == 1


def test_resume_without_a_checkpoint_over_a_run_says_only_that(tmp_path, capsys):
    """Nothing to resume: the one line says so, not that the run in --out is being replaced;
    that run stays as it was."""
    from qkcov.artifacts import RunFolder, atomic_write_bytes

    with RunFolder(tmp_path / "out", command="qkcov run") as stage:
        atomic_write_bytes(stage / "run.json", b'{"model": "m", "heads": []}')
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    data = tmp_path / "r.jsonl"
    data.write_text(_line() + "\n" + _line() + "\n", encoding="utf-8")
    rc = main(["run", "--data", str(data), "--out", str(tmp_path / "out"), *NO_MODEL, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume: no checkpoint to resume" in err, err
    assert len(err.strip().splitlines()) == 1 and "replacing" not in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_edited_checkpoint_json_is_refused(tmp_path):
    js, ts = tmp_path / "head-L0H1.json", tmp_path / "head-L0H1.safetensors"
    save_checked(js, ts, {"swap": {"delta_p": 0.12}}, {"x": torch.ones(3, dtype=torch.float64)})
    assert load_checked(js, ts)[0] == {"swap": {"delta_p": 0.12}}
    saved = json.loads(js.read_text())
    saved["data"]["swap"]["delta_p"] = 0.999
    write_json(js, saved)
    with pytest.raises(ValueError, match="was changed after qkcov wrote it"):
        load_checked(js, ts)
    save_checked(js, ts, {"a": 1}, {"x": torch.ones(3, dtype=torch.float64)})
    save_file({"x": 2 * torch.ones(3, dtype=torch.float64)}, str(ts))  # scaled tensors
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checked(js, ts)


def test_scaled_checkpoint_sums_are_refused(tmp_path):
    ck = Checkpoint(tmp_path / "c.safetensors", {"model": "m"}, resume=True)
    sums = {"sum_pos": torch.arange(6, dtype=torch.float64).reshape(2, 3)}
    ck.save(sums, 2, 5)
    assert torch.equal(ck.load().tensors["sum_pos"], sums["sum_pos"])
    meta = {k: json.dumps(v) for k, v in read_tensor_metadata(ck.path).items()}
    save_file({"sum_pos": 10 * sums["sum_pos"]}, str(ck.path), metadata=meta)
    with pytest.raises(ValueError, match=r"--resume: .*c\.safetensors was changed after"):
        ck.load()


def test_resumed_head_checkpoint_is_verified(tmp_path):
    """RunState's finished-head checkpoint: edited on disk → refused on resume."""
    cfg = RunConfig(checkpoint_every=1, heads="L0H1", n_random=20, n_permutations=0,
                    n_bootstrap=0)  # fmt: skip
    recs = _records(16)
    state = RunState(tmp_path / "out", cfg, recs, resume=False)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    head = analyze(model, tok, recs, config=cfg, progress=False).heads[0]
    state.save_head(head)
    again = RunState(tmp_path / "out", cfg, recs, resume=True)
    assert again.load_head("L0H1").to_dict() == head.to_dict()
    path = again.dir / "head-L0H1.json"
    path.write_text(path.read_text().replace('"n_random": 20', '"n_random": 21'))
    with pytest.raises(ValueError, match="head-L0H1.json was changed after qkcov wrote it"):
        again.load_head("L0H1")


# --------------------------------------------------------------------------- notebook
@pytest.mark.parametrize("model", [None, "smollm2-135m", 3])
def test_analyze_without_a_loaded_model_is_one_clear_error(model):
    with pytest.raises(InputError, match="expected a loaded transformers model") as info:
        analyze(model, tiny_tokenizer(), _records())
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert "qkcov.load_model" in str(info.value)


def test_analyze_records_none_and_ignored_device_are_refused(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(InputError, match=r"analyze\(\.\.\., records\): expected a list"):
        analyze(model, tok, None)
    with pytest.raises(InputError, match=r"analyze\(model, tokenizer, \.\.\.\)"):
        analyze(model, None, _records())
    for kw in ({"device": "meta"}, {"dtype": "float16"}, {"device_map": "auto"}):
        with pytest.raises(InputError, match=r"is a setting for loading a model.*float32 on cpu"):
            analyze(model, tok, _records(), progress=False, **kw)
    with pytest.raises(InputError, match="device='cuda:1' is a setting"):
        analyze(model, tok, _records(), config=RunConfig(device="cuda:1"), progress=False)
    path = tmp_path / "r.jsonl"  # a JSONL path is loaded, like `qkcov run --data`
    save_records(path, _records(16))
    result = analyze(
        model,
        tok,
        path,
        heads="L0H1",
        n_random=20,
        n_permutations=0,
        n_bootstrap=0,
        steps="",
        progress=False,
        device="cpu",
        dtype="float32",
    )  # fmt: skip  (the model's own device and dtype: honoured)
    assert result.n_records == 16


# --------------------------------------------------------------------------- torchrun
def test_only_rank_0_prints_the_summary(tmp_path, monkeypatch, capsys):
    import qkcov.pipeline

    class Fake:
        def summary(self, wide: bool = False) -> str:
            return "SUMMARY"

    monkeypatch.setattr(qkcov.pipeline, "run", lambda *a, **kw: Fake())
    data = tmp_path / "r.jsonl"
    save_records(data, _records())
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert is_main_process() is printed
        assert main(["run", "--data", str(data), "--out", str(tmp_path / "o")]) == 0
        assert ("SUMMARY" in capsys.readouterr().out) is printed


# --------------------------------------------------------------------------- --chat
@pytest.mark.parametrize("system", ["the cat and the dog", None])
def test_chat_spans_land_in_the_user_message(system):
    tok = tiny_tokenizer()
    rec = ContrastRecord("the cat and the dog", (Span(4, 7),), (Span(16, 19),), system=system)
    (res,) = resolve_records(tok, [rec], chat=True)
    user = res.text.index("<|user|>") + len("<|user|>")
    _, offsets = encode(tok, res.text)
    starts = sorted(offsets[k.pos][0] for k in res.keys)
    assert starts == [user + 6, user + 18]  # last token of "cat" and of "dog" in the user text
    assert res.text[user : user + len(rec.prompt)] == rec.prompt


def test_chat_default_system_prompt_holding_the_prompt_is_skipped(monkeypatch):
    tok = tiny_tokenizer()
    tok.chat_template = (
        "<|system|>You are a helpful AI assistant<|end|>\n"
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rec = ContrastRecord("a helpful AI", (Span(2, 9),), (Span(10, 12),))
    (res,) = resolve_records(tok, [rec], chat=True)
    user = res.text.index("<|user|>") + len("<|user|>")
    _, offsets = encode(tok, res.text)
    assert sorted(offsets[k.pos][0] for k in res.keys) == [user + 8, user + 11]
