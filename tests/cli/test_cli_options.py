"""The command line's shared options and small commands: help with every default, --threads, ``coala export``,
the eval table's header, lora-init's default model."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import transformers

import coala
from _compress_models import batches, build, settings, word_tokenizer
from coala.cli import build_parser, main
from coala.cli._common import DefaultsHelpFormatter, default_threads, set_threads

WORKING = ("compress", "eval", "compare", "lora-init", "finetune")


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_describes_every_option_and_its_default(name, capsys):
    parser = _commands()[name]
    assert parser.formatter_class is DefaultsHelpFormatter
    formatter = parser.formatter_class(prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.nargs != 0 and action.default is not None:
            assert "default" in formatter._get_help_string(action), (name, action.option_strings)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "default: 2GB" in capsys.readouterr().out if name in ("compress", "export") else True


@pytest.mark.parametrize("name", WORKING)
def test_every_working_command_takes_threads(name):
    assert "--threads" in _commands()[name]._option_string_actions


def test_threads_default_and_validation(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(before)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle: every core, up to torch's default
        assert default_threads() == min(cores, before)
        monkeypatch.setattr(os, "getloadavg", lambda: (float(cores) + 3, 0.0, 0.0))  # busy: one thread
        assert default_threads() == 1
        assert set_threads(None) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_lora_init_defaults_to_the_bundled_minilm():
    assert build_parser().parse_args(["lora-init", "--out", "x"]).model is None


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    model = build("llama")
    coala.compress(model, batches(), **settings(ratio=0.4, out_dir=str(root / "c")), tokenizer=word_tokenizer())
    text = root / "text.txt"
    text.write_text("\n".join(" ".join(f"w{4 + (7 * i + j) % 90}" for j in range(12)) for i in range(40)))
    return root, text


def test_export_command_writes_a_plain_model(compressed, tmp_path, capsys):
    root, _ = compressed
    out = tmp_path / "dense"
    assert main(["export", str(root / "c"), "--dense", str(out)]) == 0
    assert "plain LlamaForCausalLM" in capsys.readouterr().out
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(4, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, coala.load(root / "c")(ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["export", str(root / "c"), "--dense", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--dense", str(tmp_path / "x")]) == 2
    assert "no compressed model folder" in capsys.readouterr().err


def test_eval_table_says_what_it_compares(compressed, capsys):
    root, text = compressed
    before = torch.get_num_threads()
    try:
        assert main(["eval", str(root / "c"), "--ppl", str(text), "--seqlen", "16", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "c: compressed, float32"
    assert lines[1].split()[:3] == ["metric", "value", "(c)"] and lines[3].startswith(f"ppl {text}")
