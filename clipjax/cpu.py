"""CPU-specific defaults, in one place. Nothing here changes results, only speed on CPU hosts."""

from __future__ import annotations

import os


def scan_unrolled_layers() -> bool:
    """Whether transformer stacks with per-layer parameters (`resblocks_i`) run their layers under `lax.scan`.

    On CPU, yes: XLA:CPU fuses the elementwise residual-stream gradient of every layer into one kernel per consumer,
    recomputing it from the top layer down (quadratic in depth); a scan keeps one layer per loop iteration.
    ViT-B-32 train step 1.7× faster, compile 4× faster (experiments/RESULTS.md). Override with
    CLIPJAX_LAYER_LOOP=unroll|scan.
    """
    choice = os.environ.get("CLIPJAX_LAYER_LOOP", "").strip().lower()
    if choice in ("scan", "unroll"):
        return choice == "scan"
    if choice:
        raise ValueError(f"CLIPJAX_LAYER_LOOP={choice!r}: valid values are 'scan', 'unroll'")
    import jax

    return jax.default_backend() == "cpu"


def apply_cpu_defaults(compilation_cache: bool = True) -> None:
    """Settings measured to help on CPU (experiments/RESULTS.md); a no-op on accelerators."""
    import jax

    if jax.default_backend() != "cpu":
        return
    # Keep compilation cache for repeated CPU runs (saves the compile on resume).
    cache = os.environ.get("CLIPJAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/clipjax/xla"))
    if cache and compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
