"""Where clipjax keeps what it can make again: one root for every cache, so that `XDG_CACHE_HOME` moves them all.

    root()           $XDG_CACHE_HOME/clipjax, else ~/.cache/clipjax
    root()/xla       the persistent XLA compilation cache ($CLIPJAX_COMPILATION_CACHE overrides it; see compile_cache)
    root()/datasets  generated datasets such as `scenes` ($CLIPJAX_DATA_DIR overrides it)
    root()/zeroshot  zero-shot classifiers of `python -m clipjax.evaluate` (its --cache-dir overrides it)

Only the standard library: data worker processes import it without JAX.
"""

from __future__ import annotations

import os
import pathlib


def root() -> pathlib.Path:
    """`$XDG_CACHE_HOME/clipjax` when XDG_CACHE_HOME is set (and not empty), else `~/.cache/clipjax`."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (pathlib.Path(base).expanduser() if base else pathlib.Path.home() / ".cache") / "clipjax"


def path(*parts: str) -> pathlib.Path:
    """`root()/part/...`, e.g. `path("datasets")`."""
    return root().joinpath(*parts)
