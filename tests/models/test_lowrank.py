"""LowRankLinear, dense weights of Linear/Conv1D, layer finding and swapping on tiny real models."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from _tiny_models import factorise, inputs, output, tiny
from coala.lowrank import (
    LowRankLinear,
    dense_bias,
    dense_weight,
    find_linear_layers,
    linear_shape,
    low_rank_layers,
    low_rank_params,
    replace_module,
)


def test_forward_is_x_Bt_At_plus_bias_in_float64():
    torch.manual_seed(0)
    A, B, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.randn(7).double()
    layer = LowRankLinear.from_factors(A, B, b)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    assert layer.up.weight.dtype == torch.float64
    torch.testing.assert_close(layer(x), x @ B.T @ A.T + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.to_dense_weight(), A @ B, rtol=1e-12, atol=1e-12)
    assert (layer.in_features, layer.out_features, layer.rank) == (5, 7, 3)
    assert layer.num_weights() == low_rank_params(7, 5, 3) == 36
    assert linear_shape(layer) == (7, 5)


def test_state_dict_keys_are_stable_and_documented():
    with_bias = LowRankLinear(5, 7, 3)
    assert {k: tuple(v.shape) for k, v in with_bias.state_dict().items()} == {
        "down.weight": (3, 5), "up.weight": (7, 3), "up.bias": (7,)
    }
    without = LowRankLinear(5, 7, 3, bias=False)
    assert set(without.state_dict()) == {"down.weight", "up.weight"}
    assert without.bias is None
    assert isinstance(without.down, nn.Linear) and isinstance(without.up, nn.Linear)


def test_from_factors_dtype_cast_and_errors():
    A, B = torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert LowRankLinear.from_factors(A, B, None, dtype=torch.float32).down.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="ranks differ"):
        LowRankLinear.from_factors(A, torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        LowRankLinear.from_factors(A, B, torch.zeros(3))
    with pytest.raises(TypeError, match="pass dtype"):
        LowRankLinear.from_factors(A, B.float())
    with pytest.raises(TypeError, match="2-D floating"):
        LowRankLinear.from_factors(A[0], B)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LowRankLinear(5, 7, 0)
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankLinear(5, 7, 2.0)


def test_dense_weight_of_conv1d_is_out_by_in():
    torch.manual_seed(0)
    conv = Conv1D(6, 4)  # nf=out=6, nx=in=4: weight stored 4 × 6
    nn.init.normal_(conv.bias)
    x = torch.randn(3, 4)
    W = dense_weight(conv)
    assert W.shape == (6, 4) and linear_shape(conv) == (6, 4)
    torch.testing.assert_close(conv(x), x @ W.T + dense_bias(conv))
    lin = nn.Linear(4, 6)
    assert dense_weight(lin) is lin.weight and dense_bias(lin) is lin.bias
    with pytest.raises(TypeError, match="Embedding is not a linear layer"):
        dense_weight(nn.Embedding(3, 4))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert", "opt"])
def test_exact_full_rank_factors_keep_outputs(kind):
    model = tiny(kind)
    ids = inputs()
    before = output(model, ids)
    ranks = factorise(model)
    assert len(ranks) > 0 and set(low_rank_layers(model)) == set(ranks)
    torch.testing.assert_close(output(model, ids), before, rtol=1e-4, atol=1e-5)


def test_peft_lora_can_target_the_factors():
    from peft import LoraConfig, get_peft_model

    model = tiny("llama")
    factorise(model, ["q_proj", "down_proj"], rank=8)
    ids = inputs()
    before = output(model, ids)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["down", "up"], lora_dropout=0.0))
    wrapped = [n for n, _ in peft_model.named_modules() if n.endswith(("q_proj.down", "q_proj.up"))]
    assert len(wrapped) == 4
    torch.testing.assert_close(output(peft_model, ids), before, rtol=0, atol=0)  # LoRA B = 0 at init


def test_find_all_excludes_tied_and_untied_heads():
    gpt2 = tiny("gpt2")
    names = find_linear_layers(gpt2, None)
    assert "lm_head" not in names and len(names) == 8
    assert all(isinstance(m, Conv1D) for m in names.values())
    untied = tiny("llama", tie=False)
    names = find_linear_layers(untied, None)
    assert "lm_head" not in names and len(names) == 14
    assert list(find_linear_layers(untied, ["lm_head"])) == ["lm_head"]  # explicit and untied: allowed


def test_find_by_suffix_on_component_boundaries():
    gpt2 = tiny("gpt2")
    assert list(find_linear_layers(gpt2, ["attn.c_proj"])) == [f"transformer.h.{i}.attn.c_proj" for i in range(2)]
    assert len(find_linear_layers(gpt2, ["c_proj"])) == 4
    assert list(find_linear_layers(gpt2, ["h.1.mlp.c_fc"])) == ["transformer.h.1.mlp.c_fc"]
    llama = tiny("llama")
    got = find_linear_layers(llama, ["v_proj", "q_proj"])
    assert list(got) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="'proj' matches no linear layer"):  # whole components only
        find_linear_layers(llama, ["proj"])


def test_find_errors_name_target_and_available_layers():
    llama = tiny("llama")
    with pytest.raises(ValueError, match=r"'c_attn' matches no linear layer .*down_proj, gate_proj, .*q_proj"):
        find_linear_layers(llama, ["q_proj", "c_attn"])
    with pytest.raises(TypeError, match=r"write \['q_proj'\]"):
        find_linear_layers(llama, "q_proj")
    with pytest.raises(ValueError, match="targets is empty"):
        find_linear_layers(llama, [])
    with pytest.raises(ValueError, match="tied to the input embedding"):
        find_linear_layers(llama, ["lm_head"])


def test_find_skips_factors_of_low_rank_layers_and_works_on_a_block():
    llama = tiny("llama")
    factorise(llama, ["q_proj"], rank=4)
    names = find_linear_layers(llama, None)
    assert len(names) == 12 and not any(n.endswith((".up", ".down")) for n in names)
    with pytest.raises(ValueError, match="'q_proj' matches no"):
        find_linear_layers(llama, ["q_proj"])
    block = llama.model.layers[1]
    assert list(find_linear_layers(block, ["k_proj", "up_proj"])) == ["self_attn.k_proj", "mlp.up_proj"]


def test_replace_module_dotted_and_errors():
    llama = tiny("llama")
    new = LowRankLinear(64, 64, 4, bias=False)
    replace_module(llama, "model.layers.0.self_attn.q_proj", new)
    assert llama.model.layers[0].self_attn.q_proj is new
    with pytest.raises(ValueError, match="no child module 'nope'"):
        replace_module(llama, "model.layers.0.self_attn.nope", new)
    with pytest.raises(ValueError, match="no submodule"):
        replace_module(llama, "model.blocks.0.q_proj", new)
    with pytest.raises(TypeError, match=r"must be an nn\.Module"):
        replace_module(llama, "lm_head", torch.zeros(2))
