"""Curves of a training run as one PNG: loss, temperature, learning rate and evaluation results against the step.

    python -m clipjax.plot WORKDIR [--out PNG]

reads WORKDIR/metrics.jsonl (local or in an object store) and writes WORKDIR/curves.png, or PNG. The trainer writes
WORKDIR/curves.png itself at the end of a run when matplotlib is installed (`pip install 'clipjax[plot]'`).
Bad input (no metrics.jsonl, no rows, matplotlib missing) prints one line `error: ...` on stderr and exits with
status 2.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
import sys
import tempfile
from typing import Any

from clipjax import cli, paths

CURVES = "curves.png"
# Panels of training scalars: (title, keys drawn in it); a panel without data is left out.
TRAIN_PANELS = (("loss", ("loss",)), ("accuracy (training batches)", ("accuracy",)),
                ("temperature", ("temperature",)), ("learning rate", ("lr",)),
                ("gradient norm", ("grad_norm",)), ("samples/s", ("samples_per_sec",)))
NOT_EVAL = ("data_skipped",)  # training scalars with a "/" in their name


class MissingMatplotlib(ImportError):
    """matplotlib is not installed."""


def _figure_class():
    """matplotlib's Figure, drawn by its Agg canvas: a file only, and the process's backend (a notebook's inline
    figures, a user's window) is left as it is."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib("matplotlib is not installed: pip install matplotlib (or pip install "
                                "'clipjax[plot]')") from None
    logger = logging.getLogger("matplotlib")  # its INFO records (a font cache built) say nothing about the run
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    return Figure


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), float(r[key])) for r in rows
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def eval_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The evaluation metrics in `rows` (`<type>/<name>/<metric>`, `eval/<metric>`), in the order first seen."""
    keys: dict[str, None] = {}
    for r in rows:
        for k in r:
            if "/" in k and not k.startswith(NOT_EVAL):
                keys[k] = None
    return list(keys)


def _eval_panels(rows: list[dict[str, Any]]) -> list[tuple[str, tuple[str, ...]]]:
    """One panel per evaluation (`zeroshot/heldout`), holding its metrics."""
    groups: dict[str, list[str]] = {}
    for k in eval_keys(rows):
        groups.setdefault(k.rsplit("/", 1)[0], []).append(k)
    return [(title, tuple(keys)) for title, keys in groups.items()]


def render(rows: list[dict[str, Any]], out: str | os.PathLike, title: str = "") -> None:
    """The curves of `rows` (metrics.jsonl rows) as the PNG file `out` (local, or an object in a store)."""
    figure = _figure_class()
    panels = [(t, keys) for t, keys in (*TRAIN_PANELS, *_eval_panels(rows))
              if any(_series(rows, k)[0] for k in keys)]
    if not panels:
        raise ValueError("no numeric metrics to plot")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = figure(figsize=(4.2 * cols, 3.0 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, keys) in zip(axes.flat, panels):
        for k in keys:
            steps, values = _series(rows, k)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=k.rsplit("/", 1)[-1])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if name in ("learning rate",):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, out)


def _save(fig: Any, out: str | os.PathLike) -> None:
    """`fig` as a PNG at `out`, through a temporary file (a failed write leaves any previous file intact)."""
    with tempfile.TemporaryDirectory(prefix="clipjax-plot-") as tmp:
        local = pathlib.Path(tmp) / CURVES
        fig.savefig(local, format="png", dpi=100)
        paths.write_bytes(out, local.read_bytes())


def plot_workdir(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> paths.Path:
    """WORKDIR/metrics.jsonl drawn as `out` (default WORKDIR/curves.png); returns the PNG's path."""
    from clipjax.metrics import read_metrics

    workdir_p = paths.as_path(workdir)
    metrics = workdir_p / "metrics.jsonl"
    if not paths.exists(metrics):
        raise FileNotFoundError(f"{metrics}: no such file (WORKDIR is a training workdir, which holds "
                                f"metrics.jsonl)")
    try:
        rows = read_metrics(workdir_p)
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"{metrics}: not JSON lines ({e})") from None
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        raise ValueError(f"{metrics}: no rows yet (the first is written at the first logged step)")
    target = paths.as_path(out) if out is not None else workdir_p / CURVES
    render(rows, target, title=str(workdir))
    return target


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clipjax.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a training workdir (it holds metrics.jsonl)")
    p.add_argument("--out", default=None, help=f"the PNG to write (default WORKDIR/{CURVES})")
    return p


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.out is not None and (paths.as_path(args.out).suffix.lower() != ".png"):
        raise ValueError(f"--out {args.out}: give a file name ending in .png")
    out = plot_workdir(args.workdir, args.out)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(run, argv, user_errors=(ValueError, OSError, MissingMatplotlib))


if __name__ == "__main__":
    sys.exit(main())
