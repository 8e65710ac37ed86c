"""`clipjax.cpu.use_huge_pages`: the command-line entry points re-execute themselves once with glibc's malloc backing
large blocks with transparent huge pages, so XLA:CPU's per-execution temporaries stop costing a page fault per 4 KiB
(real subprocesses, real page-fault counts)."""

import os
import pathlib
import subprocess
import sys

import pytest

from clipjax.cpu import HUGE_PAGES_TUNABLE, _glibc_at_least

ROOT = pathlib.Path(__file__).resolve().parents[1]
THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_at_least(2, 35),
                                reason="glibc ≥ 2.35 on Linux only")

# Prints the tunables it runs with, then the page faults of the 2nd–4th executions of a program whose temporaries
# are ~200 MB (what XLA allocates fresh for each execution).
PROBE = '''
import os, resource, sys
from clipjax.cpu import use_huge_pages
use_huge_pages()
print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
if "faults" in sys.argv:
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
    x = jnp.ones((7000, 64), jnp.float32)
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        f(x).block_until_ready()
    print("faults", (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
'''


def probe(*args: str, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CLIPJAX_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], env={**clean, **env}, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=300).stdout
    lines = [line.split(" ", 1) for line in out.splitlines()]
    assert len([k for k, _ in lines if k == "pid"]) == 1, out  # re-executed once, not in a loop
    return {k: v for k, v in lines}


def test_reexecutes_once_with_the_tunable_and_keeps_the_users_own():
    assert probe()["pid"].split()[-1] == HUGE_PAGES_TUNABLE
    mine = "glibc.malloc.arena_max=2"
    assert probe(GLIBC_TUNABLES=mine)["pid"].split()[-1] == f"{mine}:{HUGE_PAGES_TUNABLE}"
    chosen = "glibc.malloc.hugetlb=0"  # the user's own hugetlb choice is kept as it is
    assert probe(GLIBC_TUNABLES=chosen)["pid"].split()[-1] == chosen
    for off in ("0", "off", "False"):
        assert probe(CLIPJAX_HUGE_PAGES=off)["pid"].split()[-1] == "tunables"  # switched off: none set


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off")
def test_a_programs_temporaries_fault_far_less():
    with_pages = int(probe("faults")["faults"])
    without = int(probe("faults", CLIPJAX_HUGE_PAGES="0")["faults"])
    assert without > 20_000, without  # ~200 MB of 4 KiB pages a call
    assert with_pages < without / 10, (with_pages, without)
