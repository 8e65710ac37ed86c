"""CPU-specific defaults, in one place. Nothing here changes results, only speed on CPU hosts."""

from __future__ import annotations

import os
import sys


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


# glibc's malloc asked to back its large blocks with transparent huge pages (a tunable since glibc 2.35).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def use_huge_pages() -> None:
    """Re-executes this process once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, so that glibc backs large blocks
    with 2 MiB transparent huge pages. A command-line entry point calls it first thing (glibc reads its tunables when
    a process starts); the command line and the process id stay the same.

    XLA:CPU allocates the temporaries of each execution as one block, which glibc maps fresh from the kernel and
    unmaps after it: for the small config's training step at batch 128 that is 2.3 GB, ~570 000 page faults and ~1 s
    of kernel time a step with 4 KiB pages, ~1 200 faults with huge pages (step 2.0 → 1.4 s; experiments/RESULTS.md).
    Nothing happens when: the C library is not glibc ≥ 2.35, `GLIBC_TUNABLES` already names `glibc.malloc.hugetlb`
    (the user's choice, or this process after its re-execution), or `CLIPJAX_HUGE_PAGES=0` (or false/off/no). Huge
    pages also need the kernel's transparent huge pages in `madvise` or `always` mode
    (/sys/kernel/mm/transparent_hugepage/enabled).
    """
    off = os.environ.get("CLIPJAX_HUGE_PAGES", "1").strip().lower() in ("0", "false", "off", "no")
    if off or not sys.platform.startswith("linux"):
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or not _glibc_at_least(2, 35):
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
        return name == "glibc" and tuple(int(x) for x in version.split(".")[:2]) >= (major, minor)
    except (AttributeError, ValueError, OSError):
        return False
