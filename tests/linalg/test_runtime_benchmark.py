"""benchmarks/runtime.py and calibration_speed.py on tiny inputs: every section runs and reports its ratios (the
GPU section through the CPU, which takes the same code path as CUDA but for the device)."""

from __future__ import annotations

import torch

import coala.linalg.qr_update as qr


def test_runtime_sections_on_tiny_inputs(tmp_path):
    from _benchmarks import load_benchmark

    bench = load_benchmark("runtime")
    cfg = {"streams": {64: 4096}, "route": (64,), "route_rows": 4096, "sweep_n": 64, "sweep_rows": 4096,
           "gpu": (64,), "gpu_rows": 4096, "repeats": 1}
    threads = torch.get_num_threads()
    res = {"streams": bench.bench_streams(cfg, [1, 2]), "route": bench.bench_route(cfg, [1]),
           "gpu": bench.bench_gpu(cfg, device="cpu"), "sweep": bench.bench_sweep(dict(cfg, sweep_n=(64, 96)), [1])}
    assert torch.get_num_threads() in (1, 2)
    torch.set_num_threads(threads)
    assert {(r["n"], r["threads"]) for r in res["streams"]} == {(64, 1), (64, 2)}
    assert all(r["ratio"] > 0 for r in res["streams"] + res["route"]) and res["streams"][0]["gram"] > 0
    assert res["gpu"][0]["blocked/gram"] > 0 and qr.BLOCKED_DEVICES == {"cpu"}  # restored after the GPU section
    assert all(res["gpu"][0][k] > 0 for k in ("stacked 4n/gram", "one QR/gram", "stacked/gram"))
    text = bench.report(res, cfg, wall=1.0)
    assert "stream R / Gram, n = 64, 2 thread(s)" in text and "route coala / SVD-LLM, n = 64" in text
    assert "GPU n = 64: stacked / Gram" in text and "Kernel settings" in text
    assert {(r["n"], r["threads"]) for r in res["sweep"]} == {(64, 1), (96, 1)} and qr.PANEL == 128
    bench.plot(tmp_path / "runtime.png", res)
    assert (tmp_path / "runtime.png").stat().st_size > 10_000
