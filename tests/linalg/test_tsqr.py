"""Streaming R factor (TSQR), activation statistics and input capture, against float64 references."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coala.capture import InputCapture
from coala.linalg import ActivationStats, RFactor, regularize
from coala.linalg.stats import AbsMeanAccumulator, GramAccumulator

F64 = torch.float64


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def _stream(X: torch.Tensor, chunks: list[int], **kw) -> RFactor:
    f = RFactor(X.shape[1], **kw)
    for part in X.split(chunks):
        f.update(part)
    return f


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("N", [300, 7])  # 7 < n: rank-deficient X
def test_rtr_equals_xtx(ref, dtype, tol, N):
    n = 20
    X = ref.well_conditioned(N, n, cond=30.0, seed=N)
    f = _stream(X.to(dtype), [N // 3, N - N // 3], dtype=dtype, block_rows=16)
    R = f.R
    assert R.dtype == dtype and R.shape == (n, n)
    assert torch.equal(R, R.triu()) and bool((R.diagonal() >= 0).all())
    assert f.num_rows == N
    G = X.T @ X
    assert _rel(R.T @ R, G) < tol
    if N >= n:  # R is unique (diag ≥ 0) for full column rank X
        assert _rel(R, ref.r_factor(X)) < 50 * tol


@pytest.mark.parametrize("block_rows", [1, 3, 20, 64, None])
def test_block_rows_and_chunks_do_not_change_R(ref, block_rows):
    X = ref.well_conditioned(67, 20, cond=1e3, seed=1)
    R_ref = ref.r_factor(X)
    for chunks in ([67], [1] * 67, [30, 3, 34], [17] * 3 + [16]):
        f = _stream(X, chunks, dtype=F64, block_rows=block_rows)
        assert _rel(f.R, R_ref) < 1e-12, (block_rows, chunks[:3])


def test_merge_order_does_not_change_R(ref):
    X = ref.well_conditioned(250, 16, cond=1e4, seed=2)
    parts = list(X.split([40, 70, 1, 89, 50]))
    R_ref = ref.r_factor(X)

    def leaf(p: torch.Tensor) -> RFactor:
        return RFactor(16, dtype=F64, block_rows=32).update(p)

    seq = leaf(parts[0])
    for p in parts[1:]:
        seq.merge(leaf(p))
    rev = leaf(parts[-1])
    for p in reversed(parts[:-1]):
        rev.merge(leaf(p))
    tree = leaf(parts[0]).merge(leaf(parts[1])).merge(
        leaf(parts[2]).merge(leaf(parts[3]).merge(leaf(parts[4])))
    )
    for f in (seq, rev, tree):
        assert f.num_rows == 250
        assert _rel(f.R, R_ref) < 1e-12
    # merging a factor that still has buffered rows, into one that has buffered rows too
    a = RFactor(16, dtype=F64, block_rows=1000).update(parts[0])
    b = RFactor(16, dtype=F64, block_rows=1000).update(torch.cat(parts[1:]))
    assert _rel(a.merge(b).R, R_ref) < 1e-12


@pytest.mark.parametrize("mask_kind", ["bool", "int", "float"])
def test_mask_drops_padding_rows(ref, mask_kind):
    n = 12
    lengths = [9, 3, 6, 1]
    x = torch.full((4, 9, n), 1e6, dtype=F64)  # padding: large values, NaN and Inf, none of them data
    x[0, -1, 0] = float("nan")
    x[1, 5, 3] = float("inf")
    real = []
    for b, L in enumerate(lengths):
        rows = ref.randn(L, n, seed=10 + b)
        x[b, :L] = rows
        real.append(rows)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for b, L in enumerate(lengths):
        mask[b, :L] = True
    mask = {"bool": mask, "int": mask.long(), "float": mask.double()}[mask_kind]
    f = RFactor(n, dtype=F64, block_rows=5).update(x, mask)
    X_real = torch.cat(real)
    assert f.num_rows == sum(lengths)
    assert _rel(f.R, ref.r_factor(X_real)) < 1e-12
    stats = ActivationStats(n, ("r", "gram", "absmean"), dtype=F64).update(x, mask)
    assert stats.num_rows == sum(lengths)
    assert _rel(stats.gram.G, X_real.T @ X_real) < 1e-14
    assert _rel(stats.absmean.mean, X_real.abs().mean(0)) < 1e-14
    assert _rel(stats.r.R, ref.r_factor(X_real)) < 1e-12


def test_state_dict_round_trip_through_safetensors(ref, tmp_path):
    X = ref.well_conditioned(500, 24, cond=100.0, seed=3)
    first, rest = X[:213], X[213:]
    f = RFactor(24, dtype=F64, block_rows=50, name="layer.0").update(first)  # 13 rows still buffered
    state = f.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, tmp_path / "r.safetensors")
    (tmp_path / "r.json").write_text(json.dumps(meta))
    loaded_state = {**load_file(tmp_path / "r.safetensors"), **json.loads((tmp_path / "r.json").read_text())}
    g = RFactor(24, dtype=F64, block_rows=50).load_state_dict(loaded_state)
    assert g.num_rows == 213 and torch.equal(g.R, f.R)
    f.update(rest)
    g.update(rest)
    assert f.num_rows == g.num_rows == 500
    assert _rel(g.R, f.R) < 1e-14  # resuming from the saved state = never having stopped
    assert _rel(g.R, ref.r_factor(X)) < 1e-12


def test_load_state_dict_rejects_other_width(ref):
    state = RFactor(8, dtype=F64).update(ref.randn(20, 8)).state_dict()
    with pytest.raises(ValueError, match="in_features=8"):
        RFactor(9).load_state_dict(state)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
def test_low_precision_input_is_upcast(ref, low, acc):
    x = ref.randn(2, 40, 16, seed=4).to(low)  # (batch, seq, n) in bf16/fp16
    f = RFactor(16, dtype=acc, block_rows=32).update(x)
    assert f.R.dtype == acc
    X_exact = x.reshape(-1, 16).to(F64)  # the data actually given
    tol = 1e-12 if acc == F64 else 2e-6
    assert _rel(f.R.T @ f.R, X_exact.T @ X_exact) < tol
    stats = ActivationStats(16, ("r", "gram", "absmean"), dtype=acc).update(x)
    assert stats.gram.G.dtype == acc and stats.absmean.mean.dtype == F64
    assert _rel(stats.gram.G, X_exact.T @ X_exact) < tol


def test_regularized_is_r_of_stacked_identity(ref):
    X = ref.well_conditioned(60, 10, cond=1e3, seed=5)
    f = RFactor(10, dtype=F64).update(X)
    for mu in (0.0, 1e-3, 2.5):
        Rm = f.regularized(mu)
        assert torch.equal(Rm, Rm.triu())
        expected = X.T @ X + mu * torch.eye(10, dtype=F64)
        assert _rel(Rm.T @ Rm, expected) < 1e-13
        aug = torch.cat([X, mu**0.5 * torch.eye(10, dtype=F64)])
        assert _rel(Rm, ref.r_factor(aug)) < 1e-12
    assert torch.equal(regularize(f.R, 0.0), f.R)
    with pytest.raises(ValueError, match="mu"):
        f.regularized(-1.0)


def test_rfactor_misuse():
    with pytest.raises(ValueError, match="in_features"):
        RFactor(0)
    with pytest.raises(TypeError, match=r"float32 or torch\.float64"):
        RFactor(4, dtype=torch.float16)
    with pytest.raises(ValueError, match="block_rows"):
        RFactor(4, block_rows=0)
    with pytest.raises(ValueError, match="in_features=5"):
        RFactor(4).merge(RFactor(5))
    with pytest.raises(TypeError, match="merge expects an RFactor"):
        RFactor(4).merge(torch.eye(4))
    with pytest.raises(ValueError, match="seen no rows"):
        RFactor(4, name="blk.q").require_rows()


def test_accumulators_merge_like_one_pass(ref):
    X = ref.randn(90, 7, seed=6)
    a = ActivationStats(7, ("r", "gram", "absmean"), dtype=F64).update(X[:30])
    b = ActivationStats(7, ("r", "gram", "absmean"), dtype=F64).update(X[30:])
    a.merge(b)
    assert a.num_rows == 90 and a.r.num_rows == 90
    assert _rel(a.gram.G, X.T @ X) < 1e-14
    assert _rel(a.absmean.mean, X.abs().mean(0)) < 1e-14
    assert _rel(a.r.R, ref.r_factor(X)) < 1e-12
    g = GramAccumulator(7).update(X.float())
    assert g.G.dtype == torch.float32  # SVD-LLM's raw fp32 sum by default
    assert _rel(g.G, X.float().double().T @ X.float().double()) < 1e-6
    m = AbsMeanAccumulator(7).update(X)
    assert _rel(m.mean, X.abs().mean(0)) < 1e-15
    with pytest.raises(ValueError, match="unknown statistics"):
        ActivationStats(7, ("r", "hessian"))
    with pytest.raises(ValueError, match="cannot merge"):
        ActivationStats(7, ("r",)).merge(ActivationStats(7, ("gram",)))


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return BertModel(cfg).double().eval()


def test_capture_excludes_padding_and_shares_qkv():
    """InputCapture on a tiny BERT: a padded batch gives the R factors of the real tokens only."""
    model = _tiny_bert()
    att = model.encoder.layer[0].attention.self
    layers = {"q": att.query, "k": att.key, "v": att.value, "o": model.encoder.layer[0].output.dense}
    seqs = [torch.randint(1, 50, (L,), generator=torch.Generator().manual_seed(L)) for L in (7, 3, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1

    with torch.no_grad(), InputCapture(model, layers, ("r", "gram"), dtype=F64) as padded:
        padded.mask = mask
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), InputCapture(model, layers, ("r", "gram"), dtype=F64) as single:
        for s in seqs:  # one sequence at a time: no padding at all
            single.mask = None
            model(input_ids=s[None], attention_mask=torch.ones(1, len(s), dtype=torch.long))

    assert padded.group_of == {"q": "q", "k": "q", "v": "q", "o": "o"}
    assert set(padded.stats) == {"q", "o"}
    for key in ("q", "o"):
        p, s = padded.stats[key], single.stats[key]
        assert p.num_rows == s.num_rows == 15
        assert _rel(p.gram.G, s.gram.G) < 1e-12
        assert _rel(p.r.R, s.r.R) < 1e-12
    assert padded.stats_for("v") is padded.stats["q"]
    with pytest.raises(KeyError, match="saw no input"):
        InputCapture(model, layers).stats_for("q")


def test_benchmark_capture_keeps_the_rows_the_statistics_saw():
    """benchmarks/_activations.py: raw rows (padding excluded) next to InputCapture's streamed R of the same rows."""
    from _benchmarks import load_benchmark

    capture_linear_inputs = load_benchmark("_activations").capture_linear_inputs

    model = _tiny_bert().float()

    class Tok:  # a whitespace tokenizer with the transformers call signature the capture uses
        def __call__(self, texts, *, padding, truncation, max_length, return_tensors):
            ids = [[1 + (ord(w[0]) % 49) for w in t.split()][:max_length] for t in texts]
            L = max(len(i) for i in ids)
            input_ids = torch.tensor([i + [0] * (L - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (L - len(i)) for i in ids])
            from transformers import BatchEncoding

            return BatchEncoding({"input_ids": input_ids, "attention_mask": mask})

    texts = ["a b c d e", "f g", "h i j", "k l m n o p q", "r"]
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
    deeper = []
    handle = model.pooler.register_forward_hook(lambda *_: deeper.append(1))
    out = capture_linear_inputs(model, Tok(), names, texts, max_tokens=8, batch_size=2, progress=False)
    handle.remove()
    assert not deeper  # the forward stopped once the last requested layer had its input
    assert set(out) == set(names)
    q, o = out[names[0]], out[names[1]]
    assert q.rows.shape == (17, 16) and o.rows.shape == (17, 32)  # batches of 7 and 10 real tokens; "r" unused
    assert q.weight.shape == (16, 16) and o.weight.shape == (16, 32)
    for cap in (q, o):
        R = cap.stats.r.R.double()
        X = cap.rows.double()
        assert _rel(R.T @ R, X.T @ X) < 1e-5
    with pytest.raises(KeyError, match="no module named"):
        capture_linear_inputs(model, Tok(), ["encoder.nope"], texts, max_tokens=8, progress=False)


def test_r_read_from_many_threads_at_once_holds_every_row():
    """Layers that share an input (q/k/v) read one factor's R from several solver threads: the first read folds
    the buffered rows in, and no thread may see R before that (it did: an all-zero R, a 0.0 error)."""
    from concurrent.futures import ThreadPoolExecutor

    for trial in range(20):
        X = torch.randn(100, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(trial))
        acc = RFactor(24, dtype=torch.float64, block_rows=4096).update(X)  # every row still buffered
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda a: a.R.clone(), [acc] * 8))
        for R in got:
            torch.testing.assert_close(R.T @ R, X.T @ X)
