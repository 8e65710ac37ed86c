"""The persistent XLA compilation cache: a re-run of the same program (a resume, the same recipe again, evaluation
of a workdir) loads its compiled executables from disk instead of compiling them again.

On by default in the command-line entry points (``python -m clipjax.main``, ``python -m clipjax.evaluate``), on every
backend. Where it lives, by ``config.compilation_cache`` (the trainer) and the environment:

    ""          the default: $CLIPJAX_COMPILATION_CACHE if set, else $XDG_CACHE_HOME/clipjax/xla, else
                ~/.cache/clipjax/xla
    "off"       no persistent cache (also CLIPJAX_COMPILATION_CACHE=off or empty)
    a path      that directory (local, or an object store such as gs://bucket/xla-cache, shared by a pod's hosts)

A local directory that cannot be created switches the cache off, with one warning. Only programs that took at least
``MIN_COMPILE_SECONDS`` to compile are stored (small eager helpers are not worth a file). The cache never changes
results: JAX keys an entry by the program, the backend, its version and the flags.
"""

from __future__ import annotations

import logging
import os

from clipjax import cache_dir

log = logging.getLogger(__name__)

ENV = "CLIPJAX_COMPILATION_CACHE"
OFF = ("off", "none", "false", "0")
MIN_COMPILE_SECONDS = 1.0


def default_dir() -> str | None:
    """The cache directory used when none is configured (None: switched off by the environment)."""
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if not value or value.lower() in OFF else value
    return str(cache_dir.path("xla"))


def enable(setting: str = "") -> str | None:
    """Points JAX's persistent compilation cache at `setting`'s directory (see the module docstring); returns it, or
    None when the cache is off."""
    import jax

    setting = (setting or "").strip()
    if setting.lower() in OFF:
        path = None
    else:
        path = setting or default_dir()
    if path is not None and "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # the cache only saves time: run without it rather than warn at every compile
            log.warning("persistent compilation cache off: cannot create %s (%s)", path, e.strerror or e)
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    log.debug("persistent compilation cache: %s", path)
    return path
