"""CPU-specific defaults, in one place. Nothing here changes results, only speed on CPU hosts."""

from __future__ import annotations

import os


# Depth from which a stack of per-layer parameters runs under `lax.scan` on CPU (measured A/B of unrolled vs scanned
# stacks: experiments/RESULTS.md).
SCAN_MIN_LAYERS = 10


def scan_unrolled_layers(layers: int) -> bool:
    """Whether a transformer stack of `layers` blocks with per-layer parameters (`resblocks_i`) runs them under
    `lax.scan` (the parameters stacked on the fly; same names and results).

    On CPU, for deep stacks: XLA:CPU fuses the elementwise residual-stream gradient of every layer into one kernel
    per consumer, recomputing it from the top layer down (a cost quadratic in depth), and a scan keeps one layer per
    loop iteration. Shallow stacks run faster unrolled. Accelerators: unrolled. Override with
    CLIPJAX_LAYER_LOOP=unroll|scan.
    """
    choice = os.environ.get("CLIPJAX_LAYER_LOOP", "").strip().lower()
    if choice in ("scan", "unroll"):
        return choice == "scan"
    if choice:
        raise ValueError(f"CLIPJAX_LAYER_LOOP={choice!r}: valid values are 'scan', 'unroll'")
    import jax

    return jax.default_backend() == "cpu" and layers >= SCAN_MIN_LAYERS
