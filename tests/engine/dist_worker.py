"""Worker for the distributed / checkpoint tests, run as a script in its own process.

``python dist_worker.py OUT MODE`` with MODE:

- ``dist``: join the process group from torchrun-style env vars (RANK, WORLD_SIZE, ...), run
  run_contrast, attention_rows and collect_qk with ``dist`` and save them to ``OUT``.
- ``ckpt``: run_contrast with a checkpoint every batch at ``$QKCOV_TEST_CKPT`` (resume if
  ``$QKCOV_TEST_RESUME`` is set); with ``$QKCOV_TEST_KILL_AFTER=k`` the process SIGKILLs
  itself right after the k-th checkpoint was written (a crash mid-run).

The tests import :func:`build` and :func:`run_all` for the in-process one-process reference.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from qkcov.artifacts import save_tensors
from qkcov.engine.checkpoint import Checkpoint
from qkcov.engine.contrast import collect_qk, resolve_records, run_contrast
from qkcov.engine.distributed import Dist
from qkcov.engine.scan import attention_rows
from qkcov.models.tiny import tiny_model, tiny_tokenizer
from qkcov.tasks.records import ContrastRecord, Span

WORDS = ["red", "cat", "blue", "dog", "green", "cow", "pink", "ant"]
COLOURS = {"red", "blue", "green", "pink"}
HEADS = [(0, 1), (1, 2)]
BATCH = 3  # 14 records -> 5 batches, the last one partial


def records(n: int = 14, shift: int = 0) -> list[ContrastRecord]:
    recs = []
    for i in range(n):
        items = [WORDS[(i + j + shift) % len(WORDS)] for j in range(3 + i % 3)]
        prompt = "list: " + ", ".join(items) + (". colours?" if i % 2 else ". animals!")
        spans, cursor = [], 6
        for w in items:
            s = prompt.index(w, cursor)
            spans.append((Span(s, s + len(w), label=w), w in COLOURS))
            cursor = s + len(w)
        asked = bool(i % 2)
        pos = tuple(s for s, c in spans if c == asked)
        neg = tuple(s for s, c in spans if c != asked)
        recs.append(ContrastRecord(prompt, pos, neg, group="colour" if asked else "animal"))
    return recs


def build(shift: int = 0):
    """float64 tiny Llama (exact comparisons), tokenizer and resolved records."""
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    return tiny_model("llama").to(torch.float64), tok, resolve_records(tok, records(shift=shift))


def run_all(model, tok, resolved, dist=None) -> dict[str, torch.Tensor]:
    res = run_contrast(model, tok, resolved, HEADS, batch_size=BATCH, progress=False, dist=dist)
    out = {
        f"{h[0]}.{h[1]}.{k}": v for h in HEADS for k, v in res.accumulators[h].sum_tensors().items()
    }
    out["rows"] = attention_rows(model, tok, resolved, batch_size=BATCH, progress=False, dist=dist)
    vecs = collect_qk(model, tok, resolved, HEADS, batch_size=BATCH, progress=False, dist=dist)
    for h, v in vecs.items():
        out.update({k: t.clone() for k, t in v.to_tensors(f"{h[0]}.{h[1]}.vec.").items()})
    return out


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "dist":
        dist = Dist.from_env()
        model, tok, resolved = build()
        tensors = run_all(model, tok, resolved, dist)
        save_tensors(out, tensors, {"rank": dist.rank, "world_size": dist.world_size})
        return
    assert mode == "ckpt", mode
    model, tok, resolved = build(int(os.environ.get("QKCOV_TEST_SHIFT", "0")))
    kill_after = int(os.environ.get("QKCOV_TEST_KILL_AFTER", "0"))
    if kill_after:
        saves = [0]
        original = Checkpoint.save

        def save_then_crash(self, *args, **kwargs):
            path = original(self, *args, **kwargs)
            saves[0] += 1
            if saves[0] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        Checkpoint.save = save_then_crash
    ckpt = Checkpoint(
        os.environ["QKCOV_TEST_CKPT"],
        {"model": "tiny-llama", "setting": os.environ.get("QKCOV_TEST_SETTING", "a")},
        every=1,
        resume=bool(os.environ.get("QKCOV_TEST_RESUME")),
    )
    res = run_contrast(
        model, tok, resolved, HEADS, batch_size=BATCH, progress=False, checkpoint=ckpt
    )
    tensors = {
        f"{h[0]}.{h[1]}.{k}": v for h in HEADS for k, v in res.accumulators[h].sum_tensors().items()
    }
    save_tensors(out, tensors, {"meta": res.meta})


if __name__ == "__main__":
    main()
