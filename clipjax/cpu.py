"""CPU-specific defaults, in one place. Nothing here changes results, only speed on CPU hosts."""

from __future__ import annotations

import os


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
