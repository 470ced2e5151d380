"""Run as ``python -I tests/_without_coala.py PLAN.json`` (``run_without_coala`` does, from the tests): load
compressed / exported folders the way users of transformers, lm-eval, pipelines and sentence-transformers do,
in a process that cannot import coala.

PLAN.json: {"out": folder for the results, "ids": [[token ids]] for the logits, "cases": [{"name", "dir",
"auto" (an Auto class name), "checks": [...]}, ...]}. Checks: "refuse" (the Auto class without
trust_remote_code must raise), "auto" (with trust_remote_code=True), "plain" (without: a dense export),
"hflm" (lm-eval HFLM, trust_remote_code=True; also refused without), "pipeline" (text-generation),
"st" (SentenceTransformer, "sentences" in the case). Writes OUT/results.json ({"coala_importable", "cases":
{name: {check: {"ok", "error", ...}}}}) and OUT/outputs.safetensors (tensors "<name>/<check>").
Every check runs even when another fails; the tests read the results.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path


def run_without_coala(plan: dict, folder: Path, timeout: int = 300) -> tuple[dict, dict]:
    """Run this file on ``plan`` in a fresh ``python -I`` (no PYTHONPATH, coala hidden), results in ``folder``;
    return its results.json and outputs (name → tensor)."""
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps({**plan, "out": str(folder)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_MODULES_CACHE"] = str(folder / "hf_modules")  # the remote code's import cache, not the user's
    done = subprocess.run([sys.executable, "-I", __file__, str(folder / "plan.json")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((folder / "results.json").read_text())
    return results, safetensors.torch.load_file(str(folder / "outputs.safetensors"))


class _HideCoala(importlib.machinery.PathFinder):
    """sys.meta_path's PathFinder, blind to the coala package (wherever and however it is installed)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "coala" or name.startswith("coala."):
            return None
        return super().find_spec(name, path, target)


def _without_coala() -> bool:
    """Make coala unimportable in this process; True when it still is (the tests then fail)."""
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "coala", "__init__.py"))
                   or os.path.isdir(os.path.join(p or ".", "transformers"))]
    sys.meta_path[:] = [_HideCoala if f is importlib.machinery.PathFinder else f for f in sys.meta_path
                        if "coala" not in getattr(f, "__module__", "") + repr(f)]
    return importlib.util.find_spec("coala") is not None


def _first(output):
    for key in ("logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            return getattr(output, key)
    return output[0]


def _check(case: dict, check: str, ids, tensors: dict) -> dict:
    import torch
    import transformers

    name, folder = case["name"], case["dir"]
    auto = getattr(transformers, case.get("auto", "AutoModel"))
    key = f"{name}/{check}"
    if check == "refuse":
        try:
            auto.from_pretrained(folder)
        except Exception as err:  # transformers' own refusal: a ValueError asking for trust_remote_code
            return {"ok": "trust_remote_code" in str(err), "error": f"{type(err).__name__}: {err}"[:400]}
        return {"ok": False, "error": "loaded without trust_remote_code"}
    if check in ("auto", "plain"):
        model = auto.from_pretrained(folder, **({"trust_remote_code": True} if check == "auto" else {})).eval()
        with torch.no_grad():
            tensors[key] = _first(model(input_ids=ids)).contiguous()
        info = {"ok": True, "class": type(model).__name__, "module": type(model).__module__,
                "auto_map": getattr(model.config, "auto_map", None)}
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None:
            info["tied"] = out_emb.weight is in_emb.weight
        return info
    if check == "hflm":
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        try:
            HFLM(pretrained=folder, device="cpu", batch_size=1)
            refused = False
        except Exception:
            refused = True
        lm = HFLM(pretrained=folder, trust_remote_code=True, device="cpu", batch_size=1)
        tensors[key] = lm._model_call(ids).contiguous()
        requests = [Instance("loglikelihood", {}, tuple(pair), i) for i, pair in enumerate(case["requests"])]
        scores = lm.loglikelihood(requests, disable_tqdm=True)
        return {"ok": True, "refused_without_trust": refused, "class": type(lm.model).__name__,
                "loglikelihood": [[float(s), bool(g)] for s, g in scores]}
    if check == "pipeline":
        pipe = transformers.pipeline("text-generation", model=folder, trust_remote_code=True, device="cpu")
        with torch.no_grad():
            tensors[key] = pipe.model(input_ids=ids).logits.contiguous()
        text = pipe(case["prompt"], max_new_tokens=4, do_sample=False, return_full_text=False)[0]["generated_text"]
        return {"ok": True, "class": type(pipe.model).__name__, "generated": text}
    if check in ("st", "st_plain"):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(folder, device="cpu", **({"trust_remote_code": True} if check == "st" else {}))
        tensors[key] = model.encode(case["sentences"], convert_to_tensor=True).contiguous()
        return {"ok": True, "modules": [type(m).__name__ for m in model]}
    return {"ok": False, "error": f"unknown check {check!r}"}


def main(plan_path: str) -> int:
    hidden = not _without_coala()
    import safetensors.torch
    import torch

    torch.set_num_threads(1)
    plan = json.loads(open(plan_path).read())
    ids = torch.tensor(plan["ids"], dtype=torch.long)
    results: dict = {"coala_importable": not hidden, "cases": {}}
    tensors: dict = {}
    for case in plan["cases"]:
        got = results["cases"].setdefault(case["name"], {})
        for check in case["checks"]:
            try:
                got[check] = _check(case, check, ids, tensors)
            except Exception as err:
                got[check] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000],
                              "traceback": traceback.format_exc()[-3000:]}
    os.makedirs(plan["out"], exist_ok=True)
    safetensors.torch.save_file(tensors, os.path.join(plan["out"], "outputs.safetensors"))
    with open(os.path.join(plan["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
