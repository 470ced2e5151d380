"""Benchmarks reachable as ``coala bench NAME``; each module has ``main(argv) -> int``."""
