"""Behaviour check of answer-letter tasks: is the model's next token the right candidate?

Records carry ``meta["letters"]`` (the candidate answers, in order) and
``meta["answer_letter"]`` (the correct one), as the binding task's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .contrast import ResolvedRecord

__all__ = ["task_accuracy"]


def _letter_token_sets(tokenizer: Any, r: ResolvedRecord) -> dict[str, set[int]]:
    """Token ids that answer each candidate letter: its in-context token plus the letter's
    first token with and without a leading space (chat answers start a fresh line)."""
    out: dict[str, set[int]] = {}
    by_char = {c["letter"]: c for c in r.record.meta.get("candidates", [])}
    for letter in by_char:
        ids = set()
        for variant in (letter, " " + letter):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if enc:
                ids.add(int(enc[0]))
        out[letter] = ids
    for site in r.keys:  # in-context letter token
        if site.label in out:
            out[site.label].add(int(r.input_ids[site.first]))
    return out


def _pad_left(batch: Sequence[ResolvedRecord], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.input_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, r in enumerate(batch):
        ids[b, width - len(r.input_ids) :] = torch.tensor(r.input_ids)
        mask[b, width - len(r.input_ids) :] = 1
    return ids, mask


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    resolved: Sequence[ResolvedRecord],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Next-token score over the candidate letters of order-design records.

    A letter's score is the max logit over its answer tokens (see ``_letter_token_sets``);
    a record is correct when the answer letter has the highest score. Returns ``accuracy``,
    ``chance`` (1 / n_pairs), ``per_position`` accuracy, ``predicted_position`` counts,
    ``p_answer`` (mean softmax probability of the answer among the candidates), ``n``.
    """
    from ..models.capture import padded_forward

    recs = [r for r in resolved if r.record.meta.get("answer_letter") is not None]
    if not recs:
        raise ValueError("task_accuracy: no record has an answer letter")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    correct, p_ans = [], []
    per_pos: dict[int, list[int]] = {}
    pred_pos: dict[int, int] = {}
    starts = range(0, len(recs), batch_size)
    for start in tqdm(starts, desc="accuracy", unit="batch", disable=not progress):
        batch = recs[start : start + batch_size]
        ids, mask = _pad_left(batch, pad)
        with torch.no_grad():
            logits = (
                padded_forward(model, ids.to(device), mask.to(device), logits_to_keep=1)
                .logits[:, -1]
                .double()
                .cpu()
            )  # [B, V]
        for b, r in enumerate(batch):
            letters = r.record.meta["letters"]
            sets = _letter_token_sets(tokenizer, r)
            scores = torch.tensor([max(float(logits[b, t]) for t in sets[l]) for l in letters])
            ans = letters.index(r.record.meta["answer_letter"])
            pred = int(scores.argmax())
            correct.append(int(pred == ans))
            p_ans.append(float(torch.softmax(scores, 0)[ans]))
            per_pos.setdefault(ans, []).append(int(pred == ans))
            pred_pos[pred] = pred_pos.get(pred, 0) + 1
    n_pairs = len(recs[0].record.meta["letters"])
    return {
        "accuracy": sum(correct) / len(correct),
        "chance": 1.0 / n_pairs,
        "p_answer": sum(p_ans) / len(p_ans),
        "per_position": {str(p): sum(v) / len(v) for p, v in sorted(per_pos.items())},
        "predicted_position": {str(p): c for p, c in sorted(pred_pos.items())},
        "n": len(correct),
    }
