"""Block finding, block-0 input catching and the block walker on tiny models of six architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _compress_models import ARCHS, batches, build
from coala.blocks import catch_block_inputs, find_blocks, normalize_batches
from coala.compress import collect_statistics
from coala.config import CompressConfig, RuntimeConfig
from coala.walker import BlockWalker

QUIET = RuntimeConfig(progress=False)


def _last_block_inputs(walker: BlockWalker) -> list[torch.Tensor]:
    """Walk every block (statistics on, original propagation); the hidden states reaching the last block."""
    seen: list[torch.Tensor] = []

    def solve(step):
        if step.index == len(walker) - 1:
            seen.extend(walker.inputs.hidden(b).clone() for b in range(len(walker.inputs)))

    walker.walk(solve, kinds={"r"})
    return seen

BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "opt": "model.decoder.layers", "gpt2": "transformer.h", "bert": "encoder.layer"}


@pytest.mark.parametrize("kind", ARCHS)
def test_blocks_found_and_walk_reproduces_the_forward(kind):
    model = build(kind)
    name, blocks = find_blocks(model)
    assert name == BLOCKS[kind] and len(blocks) == 2
    data = batches(n=2, pad=True)
    hidden = _last_block_inputs(BlockWalker(model, data, progress=False))
    # the hidden states reaching the last block are what the model's own forward feeds it
    seen = {}

    def record(_module, args, kwargs) -> None:
        seen.setdefault("h", args[0] if args else kwargs["hidden_states"])

    hook = blocks[-1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**data[1])
    finally:
        hook.remove()
    real = data[1]["attention_mask"].bool()
    torch.testing.assert_close(hidden[1][real], seen["h"][real], rtol=1e-6, atol=1e-6)


def test_offloaded_hidden_states_are_identical(tmp_path):
    data = batches(n=3, pad=True)
    files = []
    offloaded = BlockWalker(build("gpt2"), data, progress=False, offload_dir=tmp_path / "hidden")
    offloaded.walk(lambda step: files.extend((tmp_path / "hidden").glob("*.safetensors")), kinds={"r"})
    assert len(set(files)) == 3 and not (tmp_path / "hidden").exists()  # removed after the walk
    offloaded = BlockWalker(build("gpt2"), data, progress=False, offload_dir=tmp_path / "hidden")
    in_memory = BlockWalker(build("gpt2"), data, progress=False)
    for a, b in zip(_last_block_inputs(in_memory), _last_block_inputs(offloaded), strict=True):
        assert torch.equal(a, b)


def test_largest_repeated_modulelist_wins():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
            self.mixed = nn.ModuleList([nn.Linear(50, 50), nn.ReLU()])  # two classes: not blocks
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)])

    assert find_blocks(Toy())[0] == "layers"
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_block0_kwargs_are_kept_and_shared_across_batches():
    model = build("llama")
    inputs = catch_block_inputs(model, find_blocks(model)[1][0], batches(n=3), progress=False)
    assert len(inputs) == 3
    kw = inputs.kwargs
    assert "position_embeddings" in kw[0]
    # equal rotary tables / position ids of equal-length batches are stored once
    assert kw[1]["position_embeddings"][0] is kw[0]["position_embeddings"][0]
    assert all(m is None for m in inputs.masks)  # no padding: no mask needed
    assert model.config.use_cache is not False  # restored after catching


@pytest.mark.parametrize("kind", ARCHS)
def test_shared_inputs_are_captured_once(kind):
    model = build(kind, layers=3)
    stats = collect_statistics(model, batches(n=1), runtime=QUIET)
    distinct = {id(s) for s in stats.values()}
    # per block: q/k/v (one input), attention output, MLP in (gate/up share it), MLP out
    assert len(distinct) == 4 * 3
    if kind in ("llama", "mistral", "qwen2"):
        assert stats["model.layers.1.self_attn.q_proj"] is stats["model.layers.1.self_attn.v_proj"]
        assert stats["model.layers.1.mlp.gate_proj"] is stats["model.layers.1.mlp.up_proj"]
        assert stats["model.layers.1.mlp.gate_proj"] is not stats["model.layers.1.mlp.down_proj"]
    assert all(s.r is not None and s.r.R.device.type == "cpu" for s in stats.values())


def test_padding_rows_do_not_change_R():
    model = build("bert")
    padded = batches(n=1, batch=4, seq=12, pad=True)[0]
    other_pad = {k: v.clone() for k, v in padded.items()}
    other_pad["input_ids"][padded["attention_mask"] == 0] = 7  # different tokens under the padding
    singles = []
    for row in range(4):
        n = int(padded["attention_mask"][row].sum())
        singles.append({"input_ids": padded["input_ids"][row : row + 1, :n],
                        "attention_mask": torch.ones(1, n, dtype=torch.long)})
    cfg = CompressConfig(stats_dtype="float64")
    model.double()
    a = collect_statistics(model, [padded], cfg, runtime=QUIET)
    b = collect_statistics(model, [other_pad], cfg, runtime=QUIET)
    c = collect_statistics(model, singles, cfg, runtime=QUIET)
    real_tokens = int(padded["attention_mask"].sum())
    for name in a:
        assert a[name].num_rows == c[name].num_rows == real_tokens
        torch.testing.assert_close(a[name].r.R, b[name].r.R, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[name].r.R, c[name].r.R, rtol=1e-9, atol=1e-9)


def test_nan_activations_name_the_layer():
    model = build("llama")
    with torch.no_grad():  # finite weights (a NaN weight is named before calibration) that overflow float32
        model.model.layers[1].post_attention_layernorm.weight[0] = torch.finfo(torch.float32).max
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj.*non-finite"):
        collect_statistics(model, batches(n=1), runtime=QUIET)


def test_targets_are_validated_inside_blocks():
    model = build("llama")
    with pytest.raises(ValueError, match="nonexistent_proj"):
        BlockWalker(model, batches(n=1), targets=["nonexistent_proj"])
    with pytest.raises(ValueError, match="lm_head"):  # outside the blocks: never compressed
        BlockWalker(model, batches(n=1), targets=["lm_head"])
    walker = BlockWalker(model, batches(n=1), targets=["q_proj", "mlp.down_proj"])
    assert list(walker.layers[1]) == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def test_batches_are_validated():
    with pytest.raises(ValueError, match="empty"):
        normalize_batches([])
    with pytest.raises(TypeError, match="input_ids"):
        normalize_batches([{"ids": torch.zeros(1, 2, dtype=torch.long)}])
    assert normalize_batches([torch.zeros(1, 3, dtype=torch.long)])[0]["input_ids"].shape == (1, 3)
