"""``qkcov explain``: hypotheses from tokens, the one-pass sums, planted heads, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qkcov.core.attribution import attribute
from qkcov.core.explain import LayerSums, explain_head, memory_bytes, offset_bins
from qkcov.engine.explain import plan_corpus, tokenize_corpus
from qkcov.tasks.corpus import default_corpus
from qkcov.tasks.hypotheses import (
    Hypothesis,
    TokenRef,
    parse_hypothesis_spec,
    resolve_hypotheses,
    token_seq,
)


def _seq(words: list[str], doc: int = 0):
    """A word-per-token sequence (ids from a fixed vocabulary of the words)."""
    text, offsets = "", []
    for w in words:
        start = len(text) + (1 if text else 0)
        text = (text + " " + w) if text else w
        offsets.append((start, start + len(w)))
    ids = [abs(hash(w)) % 100_000 for w in words]
    return token_seq(text, ids, offsets, doc=doc)


# --------------------------------------------------------------------------- hypotheses
def test_builtin_masks_on_a_hand_example():
    s = _seq(["A", "b", ",", "c", "A", "b", "7"])
    h = {x.name: x.mask(s) for x in resolve_hypotheses()}
    assert h["previous-token"][3, 2] and not h["previous-token"][3, 1]
    assert h["same-token"][4, 0] and not h["same-token"][4, 4]  # earlier keys only
    assert h["induction"][4, 1] and h["induction"][5, 2] is not None  # after an earlier "A"
    assert not h["induction"][4, 0]
    assert h["first-token"][1:, 0].all() and not h["first-token"][:, 1:].any()
    assert not h["first-token"][0, 0]  # the first query has only itself to attend to
    assert h["delimiter"][5, 2] and not h["delimiter"][5, 3]
    assert h["capitalised"][5, 0] and not h["capitalised"][5, 1]
    assert h["number"][6, 6] and not h["number"][6, 5]
    assert h["offset:2-4"][6, 3] and not h["offset:2-4"][6, 5]


def test_same_word_groups_subword_pieces():
    text = "unbelievable things"
    s = token_seq(text, [1, 2, 3, 4], [(0, 2), (2, 9), (9, 12), (12, 19)])
    assert s.words == (0, 0, 0, 1)
    m = resolve_hypotheses(["same-word"])[0].mask(s)
    assert m[2, 0] and m[2, 1] and not m[3, 2]


def test_user_spec_and_predicate():
    s = _seq(["the", "Cat", "ate", "the", "apple", "and", "the", "pear"])
    caps = parse_hypothesis_spec("caps-after-the:query~^the$;key~^[A-Z]")
    m = caps.mask(s)
    assert m[3, 1] and not m[2, 1] and not m[3, 2]
    fruit = parse_hypothesis_spec("fruit:key@fruits")
    assert fruit.mask(s)[5, 4] and not fruit.mask(s)[5, 2]
    same = parse_hypothesis_spec("cat-match:same-category").mask(s)
    assert same[7, 4] and not same[7, 6]
    pred = Hypothesis.from_predicate("short", lambda q, k: len(k.text) <= 3 and q.pos - k.pos == 2)
    assert isinstance(TokenRef(0, 1, "a", "a", None), tuple)
    pm = pred.mask(s)
    assert pm[4, 2] and not pm[6, 4] and not pm[4, 3]  # "ate" yes; "apple" too long


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: resolve_hypotheses(["inductoin"]), "unknown hypothesis 'inductoin'"),
        (lambda: resolve_hypotheses(["offset:5-2"]), "1 <= a <= b"),
        (lambda: resolve_hypotheses(["induction", "induction"]), "given twice"),
        (lambda: parse_hypothesis_spec("x:key@planets"), "unknown category 'planets'"),
        (lambda: parse_hypothesis_spec("x:key~(["), "bad regex"),
        (lambda: parse_hypothesis_spec("induction:key~a"), "built-in name"),
        (lambda: parse_hypothesis_spec("nocolon"), "expected NAME:COND"),
        (
            lambda: Hypothesis.from_predicate("bad", lambda q, k: 1 / 0).check(),
            "hypothesis 'bad' raised ZeroDivisionError",
        ),
        (lambda: plan_corpus([], resolve_hypotheses()), "corpus is empty"),
        (lambda: plan_corpus([_seq(["a"] * 5)], resolve_hypotheses()), "one repeated token"),
    ],
)
def test_bad_input_is_one_line(call, needle):
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_config_checks_before_any_model(tmp_path):
    from qkcov.explainer import ExplainConfig, check_texts, load_texts

    for kw, needle in [
        ({"heads": "L5X3"}, "--heads"),
        ({"heads": "auto:0"}, "auto:K"),
        ({"hypotheses": "previous-token,nope"}, "unknown hypothesis 'nope'"),
        ({"hypothesis": ("x:key@nowhere",)}, "unknown category"),
        ({"energy": 0.0}, "--energy"),
    ]:
        with pytest.raises(ValueError, match=None) as err:
            ExplainConfig(**kw)
        assert needle in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        check_texts(["   ", ""])
    with pytest.raises(ValueError, match="one word repeated"):
        check_texts(["the the the", "the"])
    bad = tmp_path / "c.csv"
    bad.write_text("a,b")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        load_texts(bad)
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "one two"}\n"three four"\n\n')
    assert load_texts(j) == ["one two", "three four"]
    t = tmp_path / "c.txt"
    t.write_text("para one\nstill one\n\npara two\n")
    assert load_texts(t) == ["para one\nstill one", "para two"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 au lait\n\nna\u00efve".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_texts(latin)
    assert str(latin) in str(err.value) and "line 1" in str(err.value)
    assert "UTF-8" in str(err.value) and "\n" not in str(err.value)
    bom = tmp_path / "bom.jsonl"  # as some editors save it: the BOM is not part of the text
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "one two"}\n')
    assert load_texts(bom) == ["one two"]


def test_default_corpus_is_fixed_and_holds_every_kind():
    a, b = default_corpus(16), default_corpus(16)
    assert a == b and len(a) == 16
    assert any(d.split()[: len(d.split()) // 2] == d.rstrip(".").split()[len(d.split()) // 2 :]
               for d in a)  # fmt: skip  # a repeated random sequence
    assert any("\n" in d for d in a) and any('"' in d or "?" in d for d in a)
    assert default_corpus(16, seed=1) != a


# --------------------------------------------------------------------------- the sums
def test_offset_matched_weights_sum_to_one_per_side():
    g = torch.Generator().manual_seed(0)
    seqs = [_seq([f"w{int(t)}" for t in torch.randint(0, 6, (12,), generator=g)], i)
            for i in range(12)]  # fmt: skip
    plan = plan_corpus(seqs, resolve_hypotheses(["same-token", "previous-token"]))
    bt = plan.batch(list(range(12)))
    w = bt["weights"].double()
    for n in range(2):
        assert math.isclose(float(w[:, n].clamp_min(0).sum()), 1.0, rel_tol=1e-5)
        assert math.isclose(float(w[:, n].clamp_max(0).sum()), -1.0, rel_tol=1e-5)
    # same-token (not positional): negatives carry the positives' offset distribution
    bins = offset_bins(bt["pos"].shape[-1])
    pos_mass = torch.zeros(40, dtype=torch.float64)
    neg_mass = torch.zeros(40, dtype=torch.float64)
    for b in range(w.shape[0]):
        wp, wn = w[b, 0].clamp_min(0), -w[b, 0].clamp_max(0)
        pos_mass.index_add_(0, bins.clamp_min(0).flatten(), wp.flatten())
        neg_mass.index_add_(0, bins.clamp_min(0).flatten(), wn.flatten())
    assert torch.allclose(pos_mass, neg_mass, atol=1e-6)


def test_sums_match_explicit_capture_and_attribution():
    """ΔC, the Gram sums and the greedy shares from the one pass equal an explicit
    computation from captured q/k with core.attribution.attribute on the centred logits."""
    from qkcov.engine.explain import explain_heads
    from qkcov.models.capture import QKSites, capture_qk
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["abcab cabd ab.", "Hello hello 42 x", "xyz xyz xyz!"]
    seqs = tokenize_corpus(tok, texts, max_len=16)
    hyps = resolve_hypotheses(["previous-token", "same-token", "first-token", "delimiter"])
    plan = plan_corpus(seqs, hyps)
    layer, head = 1, 2
    out, sums = explain_heads(model, plan, [(layer, head)], batch_size=2, progress=False,
                              max_rank=2, pad_id=0)  # fmt: skip
    acc = sums[layer]
    delta = torch.zeros(len(hyps), 16, 16, dtype=torch.float64)
    gram = torch.zeros(16, 16, dtype=torch.float64)
    qs, ks = [], []
    wkey = torch.zeros(len(hyps), 16, dtype=torch.float64)
    for i, s in enumerate(plan.seqs):
        n = len(s)
        ids = torch.tensor([s.ids])
        cap = capture_qk(model, ids, torch.ones_like(ids),
                         QKSites([list(range(n))], [list(range(n))]), [layer], [head])[layer]  # fmt: skip
        q, k = cap.q[:, 0].double(), cap.k[:, 0].double()
        w = plan.batch([i])["weights"][0].double()  # [N, n, n]
        delta += torch.einsum("qd,nqk,ke->nde", q, w, k)
        wkey += torch.einsum("nqk,ke->ne", w, k)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        dots = (q @ k.T).masked_fill(~causal, 0)
        c = (dots - dots.sum(1, keepdim=True) / causal.sum(1, keepdim=True)) * causal
        gram += q.T @ (c @ k)
        qs.append(q)
        ks.append(k)
    assert torch.allclose(acc.delta[:, 0], delta, atol=1e-4 * float(delta.abs().max()))
    assert torch.allclose(acc.gram[0], gram, atol=1e-4 * float(gram.abs().max()))
    # the query-centred ΔC of relational hypotheses: Σ w (q − q̄) kᵀ
    qbar = torch.cat(qs).mean(0)
    centred = delta - torch.einsum("d,ne->nde", qbar, wkey)
    got = acc.delta[:, 0] - torch.einsum("d,ne->nde", acc.qsum[0] / acc.n_rows, acc.wkey[:, 0])
    assert torch.allclose(got, centred, atol=1e-4 * float(centred.abs().max()))
    # each key subspace's variance share == core.attribution.attribute on the centred logits
    e = out[0]
    for h in e.hypotheses:
        if h.rank == 0:
            continue
        num = den = 0.0
        for q, k in zip(qs, ks, strict=True):
            for r in range(1, q.shape[0]):
                kk = k[: r + 1] - k[: r + 1].mean(0)
                a = attribute(q[r], kk, {h.name: h.key_basis.double()})
                num += float((a.parts[0] * a.total).sum())
                den += float((a.total**2).sum())
        assert h.subspace_variance == pytest.approx(num / den, abs=1e-4)
    # gate and selection == an explicit split and weighted least squares over every row
    sc = acc.scaling
    names = plan.names
    sel_names = [n for n in names if n != "first-token"]
    cols, ys, ws = [], [], []
    gate = tot = sink = 0.0
    for i, (q, k) in enumerate(zip(qs, ks, strict=True)):
        masks = plan.masks[i]
        for r in range(1, q.shape[0]):
            lg = (q[r] @ k[: r + 1].T) * sc
            tot += float(((lg - lg.mean()) ** 2).sum())
            rest = lg[1:]
            gate += r / (r + 1) * float((lg[0] - rest.mean()) ** 2)
            sink += float(torch.softmax(lg, 0)[0])
            w = 0.5 * torch.softmax(rest, 0) + 0.5 / r
            x = torch.stack([masks[names.index(n), r, 1 : r + 1].double() for n in sel_names], 1)
            cols.append(x - w @ x)
            ys.append(rest - w @ rest)
            ws.append(w)
    X, y, w = torch.cat(cols), torch.cat(ys), torch.cat(ws)
    rw = w.sqrt()
    Xw, yw = X * rw[:, None], y * rw
    yy = float(yw @ yw)

    def r2(idx):
        if not idx:
            return 0.0
        beta = torch.linalg.lstsq(Xw[:, idx], yw[:, None], driver="gelsd").solution
        fit = Xw[:, idx] @ beta[:, 0]
        return float(fit @ fit) / yy

    sel = sorted((h for h in e.hypotheses if h.part == "selection" and h.order >= 0),
                 key=lambda h: h.order)  # fmt: skip
    chosen, done = [], 0.0
    for h in sel:
        chosen.append(sel_names.index(h.name))
        now = r2(chosen)
        assert h.share == pytest.approx(now - done, abs=1e-5), h.name
        done = now
    assert e.unexplained == pytest.approx(1 - done, abs=1e-5)
    assert e.sink_share == pytest.approx(gate / tot, rel=1e-4)
    assert e.sink_attention == pytest.approx(sink / sum(q.shape[0] - 1 for q in qs), rel=1e-4)
    assert e.hypotheses[-1].part == "gate" and e.hypotheses[-1].share == e.sink_share
    # the gate's attention is the sink attention, over the same rows (not the first query's
    # trivial 1 on itself)
    assert e.hypotheses[-1].attention == pytest.approx(e.sink_attention, rel=1e-6)
    assert sum(h.share for h in sel) + e.unexplained == pytest.approx(1.0, abs=1e-9)
    assert memory_bytes(270, 10, 64) == 270 * (11 * 64 * 64 + 100) * 8 + 270 * 11 * 8


# --------------------------------------------------------------------------- planted heads
def _planted(kind: str, seed: int = 0, sign: float = 1.0):
    """Hand-wired attention: one head whose logits follow the planted relation exactly.

    Keys carry a position code ``p`` (4 rotary-like dims), a token code ``e`` (24 dims) and a
    class code ``c`` (4 dims); a previous-token head's query reads ``p`` one step back, an
    induction head's key holds the previous token's code and its query the current token's,
    a class head's query and key hold their token's class. ``sign`` −1: the head avoids
    those keys instead."""
    g = torch.Generator().manual_seed(seed)
    V, D, beta = 24, 40, 6.0 * sign
    e = torch.linalg.qr(torch.randn(V, V, generator=g, dtype=torch.float64))[0]
    cls = torch.arange(V) % 4
    seqs, rows = [], []
    for d in range(40):
        if kind == "class":  # no repeated token: same-token / induction have no pairs
            toks = torch.randperm(V, generator=g)[:20].tolist()
        else:  # a random sequence and its repeat
            half = torch.randint(0, V, (10,), generator=g).tolist()
            toks = half + half
        seqs.append(_seq([f"w{t}" for t in toks], d))
        rows.append(toks)
    hyps = resolve_hypotheses(
        ["previous-token", "same-token", "induction", "first-token", "same-word", "delimiter",
         "capitalised", "number"]
    ) + [Hypothesis.from_predicate("class-match",
                                   lambda q, k: q.pos != k.pos and int(q.text[1:]) % 4 == int(k.text[1:]) % 4)]  # fmt: skip
    plan = plan_corpus(seqs, hyps)
    sums = LayerSums([0], len(hyps), D)
    omegas = torch.tensor([2.2, 2.9], dtype=torch.float64)
    for b0 in range(0, len(seqs), 8):
        idx = list(range(b0, min(b0 + 8, len(seqs))))
        bt = plan.batch(idx)
        S = bt["pos"].shape[-1]
        q = torch.zeros(len(idx), 1, S, D, dtype=torch.float64)
        k = torch.zeros_like(q)
        for bi, i in enumerate(idx):
            toks = rows[i]
            for j, t in enumerate(toks):
                ang = omegas * j
                pj = torch.stack([ang.cos(), ang.sin()], 1).flatten()  # [4]
                k[bi, 0, j, :4] = pj
                k[bi, 0, j, 4:28] = e[toks[j - 1]] if (kind == "induction" and j) else e[t]
                k[bi, 0, j, 28:32] = torch.nn.functional.one_hot(cls[t], 4).double()
                k[bi, 0, j, 32:] = 0.3 * torch.randn(8, generator=g, dtype=torch.float64)
                if kind == "previous":
                    a1 = omegas * (j - 1)
                    q[bi, 0, j, :4] = beta * torch.stack([a1.cos(), a1.sin()], 1).flatten()
                elif kind == "induction":
                    q[bi, 0, j, 4:28] = beta * e[t]
                else:
                    q[bi, 0, j, 28:32] = beta * torch.nn.functional.one_hot(cls[t], 4).double()
        sums.update(q, k, bt["pos"], bt["weights"], bt["allowed"], 1.0)
    return explain_head(sums, 0, plan.names, layer=0, name="L0H0", max_rank=8)


@pytest.mark.parametrize(
    ("kind", "planted"),
    [("previous", "previous-token"), ("induction", "induction"), ("class", "class-match")],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_hypothesis_ranks_first(kind, planted, seed):
    e = _planted(kind, seed)
    assert e.top.name == planted, e.sentence()
    assert e.top.share > e.top.random_share, e.sentence()  # above a random subspace's r/D
    assert e.top.attention > 3 * e.top.attention_baseline
    # its ΔC key subspace carries most of its logit contrast, and more of the head's
    # variance than a random subspace of its rank
    assert e.top.subspace_share is not None and e.top.subspace_share > 0.5, e.top
    assert e.top.subspace_variance > 1.5 * e.top.random_share
    assert e.top.direction == 1 and "avoid" not in e.sentence().split(";")[0]


@pytest.mark.parametrize("kind", ["previous", "class"])
def test_avoided_hypothesis_is_said_avoided(kind):
    """A head that suppresses the keys of a hypothesis gets a share for it too (R² counts
    variance either way); its direction and sentence must not read as if it picks them."""
    e = _planted(kind, 0, sign=-1.0)
    top = e.top
    assert top.share > 0.2, e.sentence()
    assert top.attention < top.attention_baseline and top.logit_contrast < 0
    assert top.direction == -1, e.sentence()
    assert ", by avoiding these keys" in e.sentence().split(";")[0]
    from qkcov.report.atlas import _bars, _direction

    assert _direction({"direction": -1}) == "avoided" and _direction({}) == "–"
    head = {"hypotheses": [{"name": top.name, "share": top.share, "direction": -1}],
            "unexplained": e.unexplained}  # fmt: skip
    assert "(avoided)" in _bars(head)
    head["hypotheses"][0]["share"] = 0.001  # a share shown as 0 %: no direction beside it
    assert "(avoided)" not in _bars(head)


def test_explain_api_and_saved_folder(tmp_path):
    """qkcov.explain on a tiny model: JSON contract, sorted by share, atlas written."""
    import qkcov
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = ["The cat sat. The cat sat.", "abc abc abc 12 34!", "Anna met Ben; Ben met Anna."]
    res = qkcov.explain(model, tok, texts, heads="all", progress=False, max_len=32)
    info = res.shape
    assert len(res.heads) == info["n_layers"] * info["n_heads"]
    tops = [h.top.share for h in res.heads]
    assert tops == sorted(tops, reverse=True)
    out = res.save(tmp_path / "ex")
    data = json.loads((out / "explain.json").read_text())
    h0 = data["heads"][0]
    assert set(h0) >= {"name", "hypotheses", "unexplained", "sentence"}
    assert h0["hypotheses"][0]["name"] == h0["top"]
    shares = [x["share"] for x in h0["hypotheses"] if x["part"] == "selection"]
    assert shares == sorted(shares, reverse=True)
    assert [x["part"] for x in h0["hypotheses"]][-1] == "gate"  # first-token last
    assert 0 <= h0["sink_share"] <= 1 and 0 <= h0["sink_attention"] <= 1
    # each head's token view is a corpus row where its top hypothesis holds
    for h in data["heads"]:
        ex = data["examples"][h["example"]]
        assert ex["hypothesis"] == h["top"] and ex["positives"], h["name"]
        assert len(ex["attention"][h["name"]]) == ex["query"] + 1 == len(ex["tokens"])
        assert sum(ex["attention"][h["name"]]) == pytest.approx(1.0, abs=1e-3)
    assert sum(shares) + h0["unexplained"] == pytest.approx(1.0, abs=1e-6)
    assert h0["hypotheses"][0]["verdict"] == "untested" and h0["hypotheses"][0]["verdict_reason"]
    assert h0["sentence"].startswith(h0["name"] + ": " + h0["top"])
    assert (out / "atlas.html").is_file() and (out / "manifest.json").is_file()
    sub = qkcov.explain(model, tok, texts, heads="L1H2,L0H0", progress=False)
    assert {h.name for h in sub.heads} == {"L1H2", "L0H0"}
    with pytest.raises(ValueError, match="out of range"):
        qkcov.explain(model, tok, texts, heads="L9H0", progress=False)
    caps = Hypothesis.from_predicate("caps", lambda q, k: k.text[:1].isupper())
    res2 = qkcov.explain(model, tok, texts, heads="L0H1", hypotheses=["induction", caps],
                         progress=False)  # fmt: skip
    assert {x.name for x in res2.heads[0].hypotheses} == {"induction", "caps"}


def test_cli_explain_end_to_end(tiny_dir, tmp_path, capsys):
    from qkcov.cli import main

    txt = tmp_path / "c.txt"
    txt.write_text("The cat sat on the mat. The cat sat.\n\nabc abc 42 abc!\n")
    out = tmp_path / "out"
    rc = main(["explain", "--model", str(tiny_dir), "--text", str(txt), "--heads", "auto:3",
               "--out", str(out), "--quiet", "--hypothesis", "caps:key~^[A-Z]"])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "explain.json").read_text())
    assert len(data["heads"]) == 3
    assert any(x["name"] == "caps" for x in data["heads"][0]["hypotheses"])
    printed = capsys.readouterr().out
    assert "unexplained" in printed and "atlas:" in printed
    assert "note:" not in printed  # caps matched ("The"): nothing to say
    rc = main(["explain", "--model", str(tiny_dir), "--text", str(txt), "--heads", "L0H0",
               "--out", str(tmp_path / "none"), "--quiet", "--hypothesis", "zz:key~^zzq$"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    note = [line for line in printed.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "'zz'" in note[0] and "no query–key pair" in note[0], printed
    # --force into a folder whose atlas.html is the user's: refused before any work, kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "atlas.html").write_text("my own page")
    from qkcov.explainer import ExplainConfig, run_explain

    with pytest.raises(ValueError, match="atlas.html"):  # the model name does not exist:
        run_explain(ExplainConfig(model=str(tmp_path / "no-model"), text=str(txt)), mine,
                    force=True, quiet=True)  # fmt: skip
    assert (mine / "atlas.html").read_text() == "my own page"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mine")) == ["mine"]
    # bad input: one line, exit 2, nothing written
    for argv, needle in [
        (["--hypotheses", "nope"], "unknown hypothesis 'nope'"),
        (["--heads", "L99H0"], "out of range"),
        (["--text", str(tmp_path / "missing.txt")], "missing.txt"),
    ]:
        rc = main(["explain", "--model", str(tiny_dir), "--text", str(txt), "--out",
                   str(tmp_path / "bad"), "--quiet", *argv])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad").exists()


def test_verify_top_runs_the_whole_method_on_the_top_hypothesis():
    import qkcov
    from qkcov.models.tiny import tiny_model, tiny_tokenizer
    from qkcov.results import VERDICTS
    from qkcov.tasks.corpus import default_corpus

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = default_corpus(16)
    res = qkcov.explain(model, tok, texts, heads="L1H0,L0H3", progress=False, max_len=64,
                        hypotheses=["previous-token", "same-token", "delimiter"],
                        verify_top=1, verify_records=24)  # fmt: skip
    first, second = res.heads
    assert first.top.verdict in VERDICTS, first.top.verdict_reason
    assert first.top.verdict_reason
    assert all(x.verdict == "untested" for x in first.hypotheses[1:])
    assert all(x.verdict == "untested" and "not verified" in x.verdict_reason
               for x in second.hypotheses)  # fmt: skip


@pytest.mark.parametrize("arch", ["gemma3", "gemma2", "llama"])
def test_attention_sums_match_the_models_own_attention(arch):
    """Attention on the first key and on each hypothesis' positives, from the one-pass sums,
    equal the model's eager attention — sliding windows and soft-capping included (the texts
    are longer than the tiny models' windows)."""
    from qkcov.engine.explain import explain_heads
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    model, tok = tiny_model(arch, attn_implementation="eager"), tiny_tokenizer()
    texts = ["abc abd abc. Hello 42 hello 42 x y z abc", "the cat sat on the mat, the cat sat"]
    seqs = tokenize_corpus(tok, texts, max_len=64)
    assert min(len(s) for s in seqs) > 7  # longer than every tiny window
    hyps = resolve_hypotheses(["previous-token", "same-token", "first-token"])
    plan = plan_corpus(seqs, hyps)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    heads = [(l, h) for l in range(L) for h in range(H)]
    out, sums = explain_heads(model, plan, heads, batch_size=2, progress=False, pad_id=0)
    got = {(e.layer, e.head): e for e in out}
    sink = torch.zeros(L, H, dtype=torch.float64)
    on_pos = torch.zeros(len(hyps), L, H, dtype=torch.float64)
    rows = torch.zeros(L, 1, dtype=torch.float64)  # rows that see the first key, per layer
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * L
    window = getattr(model.config, "sliding_window", None)
    for i, s in enumerate(plan.seqs):
        ids = torch.tensor([s.ids])
        with torch.no_grad():
            att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
        a = torch.stack([t[0] for t in att]).double()  # [L, H, S, S]
        sink += a[:, :, 1:, 0].sum(-1)
        n = a.shape[-1]
        for l in range(L):
            sliding = types[l] == "sliding_attention" and window
            rows[l] += min(n, window) - 1 if sliding else n - 1
        on_pos += torch.einsum("lhqk,nqk->nlh", a, plan.masks[i].double())
    for (l, h), e in got.items():
        assert e.sink_attention == pytest.approx(float(sink[l, h] / rows[l]), abs=1e-4)
        acc = sums[l]
        j = acc.heads.index(h)
        assert torch.allclose(acc.attn_pos[:, j], on_pos[:, l, h], atol=1e-3)


def test_token_view_shades_the_selection_apart_from_the_sink():
    """A head with 86 % on the first key: the keys after it are shaded relative to the
    largest of them, so what the head selects stays visible; the sink is said in numbers."""
    import re

    from qkcov.report.atlas import _token_view

    ex = {"tokens": ["<s>", "a", "b", "c"], "document": 0, "query": 3,
          "attention": {"L0H0": [0.86, 0.01, 0.1, 0.03]}}  # fmt: skip
    html = _token_view(ex, "L0H0")
    alphas = [float(a) for a in re.findall(r"rgba\(220,60,30,([0-9.]+)\)", html)]
    assert alphas == pytest.approx([0.1, 1.0, 0.3], abs=1e-3)  # "b" full, "a" faint
    assert "rgba(90,90,90," in html and "86 %" in html and "10.0 %" in html
