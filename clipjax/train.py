"""The one trainer: contrastive pretraining (CLIP / SigLIP, LiT) and classifier fine-tuning. Reads top to bottom:

    data → train (set-up, checkpoint & resume) → loop (step → log → eval → checkpoint) → evals

What it uses, one module each:
    clipjax.config_checks   the config's checks (`check_config`, `ConfigError`) and what may change on resume
    clipjax.build           what the config builds: model config, optimizer, mesh, phases, the jitted step, the
                            per-host training data
    clipjax.step            the train state and the update step
    clipjax.interop.init_from   the `config.init_from` weights, checked against the model
    clipjax.tasks           the task of `config.task`:
        "contrastive"  the towers' embeddings under the global-batch contrastive loss (`config.loss`)
        "classify"     the image tower under a linear head on unit-norm features, started as the zero-shot classifier
                       of the dataset's class names (WiSE-FT / FLYP recipe; `clipjax.classifier` holds the head and
                       its files)
    clipjax.workdir         config.json and its history, the resume checks, metrics rows, curves.png
Both tasks share the train state, the sharded step, checkpoints, exact resume, preemption handling and the loop.

`train` is importable (and `make_train_state` / `train_step` from `clipjax.step`); `python -m clipjax.main` calls it.
Every key read here has its default in configs/common.py `base_config` (the one place defaults live).
Letters: N global batch, B per-device batch, A accumulation steps, E embed dim, K classes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import time
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from clipjax import paths
from clipjax import sharding as shd
from clipjax.build import (_phase_config, _warn_small_dataset, frozen_prefixes, jit_train_step,  # noqa: F401
                           make_data, make_phases, make_train_mesh, make_tx, model_config)
from clipjax.checkpoint import Checkpointer, check_writable
from clipjax.config_checks import ConfigError, _from_config, check_config  # noqa: F401
from clipjax.interop.init_from import init_variables_from, load_pretrained
from clipjax.losses import get_loss  # noqa: F401
from clipjax.metrics import MetricWriter, Progress, final_line, train_flops_per_step
from clipjax.models.clip import CLIP
from clipjax.models.config import CLIPConfig
from clipjax.plot import CURVES
from clipjax import workdir_lock
from clipjax.optim import make_schedule
from clipjax.phases import Phase, PhasedData
from clipjax.run_control import COUNTERS, Preemption, StepCounters, sum_over_processes
from clipjax.step import (TrainState, abstract_with_shardings, clip_variables, make_train_state,  # noqa: F401
                          train_step)
from clipjax.tasks import task_class
from clipjax.workdir import (check_same_model, check_workdir, close_all, keep_damaged_config, truncate_metrics,
                             write_config, write_curves, write_metrics)

log = logging.getLogger(__name__)


# ============================================================================================ data

def to_global(batch: dict[str, Any], mesh: Mesh, fields: Any = ("image", "text", "stop")) -> dict[str, jax.Array]:
    """Per-host slices of `fields` → global arrays sharded over the batch axes (arrays already global, as the
    synthetic source makes them on the devices, are kept as they are)."""
    return {k: v if isinstance(v, jax.Array) else
            jax.make_array_from_process_local_data(shd.batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items() if k in fields}


# ============================================================================================ train

def train(config: ml_collections.ConfigDict, workdir: str, compiled: str | None = None) -> dict[str, float]:
    """Train (resuming from `workdir` if it holds checkpoints). Returns the last logged metrics.

    `compiled`: a train step compiled ahead of time (`python -m clipjax.aot --save_executable=PATH`), run instead of
    compiling one; refused when it was made for other devices, another config or another jax / libtpu.

    SIGTERM/SIGINT end the run after the current step with a checkpoint of it; see docs/reliability.md.
    """
    preempt = Preemption()
    preempt.install(set_up=True)  # first: a signal in set-up ends the run at once, in compilation after a checkpoint
    try:
        with contextlib.ExitStack() as held:  # the workdir's lock, taken in _train, released on the way out
            return _train(config, paths.as_path(workdir), preempt, compiled, held)
    finally:
        preempt.uninstall()


def _train(config: ml_collections.ConfigDict, workdir_p: paths.Path, preempt: Preemption,
           compiled: str | None = None, held: contextlib.ExitStack | None = None) -> dict[str, float]:
    is_main = jax.process_index() == 0
    config = check_config(config)
    check_workdir(workdir_p)
    mesh = make_train_mesh(config)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    task_type = task_class(config)  # contrastive or classify: what differs between them (clipjax/tasks.py)
    task_type.check(config)  # bad names (the loss) fail before anything compiles
    if config.init_from:
        log.info("reading the weights of config.init_from=%s…", config.init_from)
    pretrained = load_pretrained(config)
    cfg = _from_config("config.model", model_config, config, pretrained)
    phases = make_phases(config, cfg)
    data = PhasedData(lambda p: _from_config("config.data", make_data, config, cfg, config.seed, mesh, p), phases)
    data.at(0)  # a bad data spec fails now, before the model is built
    _warn_small_dataset(data, config.batch_size)
    if held is not None:  # one run per workdir (a second one is refused, naming the first); after the config and
        held.enter_context(workdir_lock.held(workdir_p))  # data checks, so that a refused config writes nothing

    ckpt = writer = None
    try:
        check_writable(workdir_p / "checkpoints")  # fail now rather than at the first save
        model = CLIP(cfg)
        ckpt = Checkpointer(workdir_p / "checkpoints", keep=config.keep_checkpoints,
                            async_save=config.async_checkpoints)
        resuming = ckpt.latest_step() is not None
        if resuming:
            check_same_model(workdir_p, cfg, config)
        init_variables = init_variables_from(pretrained, config, cfg) if pretrained is not None else None
        task = _from_config("config.data", task_type.from_config, config, cfg)  # classify: class names, eval data
        if not resuming:  # classify: the head starts as the zero-shot classifier (a resumed run restores its own)
            init_variables = task.start_variables(init_variables, pretrained, cfg)
        log.info("initialising the parameters and optimizer state of %s…",
                 config.model.name or "the model of config.model.open_clip_config")
        state, state_shardings, tx = _from_config(
            "config", make_train_state, model, lambda p: _from_config("config.frozen", make_tx, config, p),
            config.seed, mesh, init_variables, tuple(config.reinit), task.num_classes)
        preempt.set_up_done()  # a signal from now on checkpoints the step in flight
        report = shd.sharded_fraction(state.params)
        log.info("parameters: %.1fM (%.0f%% of bytes sharded)", report.total_bytes / 4e6, 100 * report.fraction)
        step_fn = functools.partial(jit_train_step, model, tx, config, mesh, state_shardings,
                                    stop_flags=jax.process_count() > 1)
        if compiled:  # the first phase's step from a file (checked now, before anything is written)
            from clipjax import executable

            step_fn = executable.prebuilt(compiled, step_fn, config, cfg, mesh, state, phases[0])
        schedule = make_schedule(config.lr, config.warmup_steps, config.total_steps)

        # Resume order: 1. this workdir's newest readable checkpoint; 2. `init_from` weights; 3. from scratch.
        # Nothing in the workdir is rewritten before the resume succeeded.
        start = 0
        if resuming:
            log.info("restoring the newest checkpoint in %s…", workdir_p / "checkpoints")
        restored = ckpt.restore(abstract_with_shardings(state_shardings, state)) if resuming else None
        if restored is not None:
            start, state, data_state = restored
            data.at(start)
            if data_state:
                try:
                    data.set_state(data_state)
                except ValueError as e:  # another dataset, seed or host count than the run that saved it
                    raise ConfigError(f"config.data (the input position saved at step {start}): {e}; to train these "
                                      f"weights on other data, start a new workdir with "
                                      f"--config.init_from={workdir_p}") from e
            log.info("resumed from step %d in %s (%s)", start, ckpt.directory, ckpt.verified)
        if is_main:
            keep_damaged_config(workdir_p)
            write_config(workdir_p, config, cfg, step=start)
        writer = MetricWriter(workdir_p, enabled=is_main)
        if is_main:
            truncate_metrics(writer, start)  # rows of steps that no checkpoint kept are written again
        last = _loop(config, cfg, mesh, state, step_fn, schedule, data, ckpt, writer, preempt, task)
    except BaseException:
        close_all(ckpt, writer, data, failing=True)
        raise
    close_all(ckpt, writer, data, failing=False)
    if is_main:
        files = ["checkpoints/", "metrics.jsonl", "tensorboard/", *([CURVES] if write_curves(workdir_p) else [])]
        log.info("%s", final_line(workdir_p, ckpt.latest_step(), config.total_steps, files, last))
    return last


COUNTER_LAG = 2  # the newest steps whose counters (non-finite updates, stop requests) are left unread
COUNTER_GROUP = 4  # counters are read this many steps at a time: the loop waits for the devices once per group


def _loop(config, cfg: CLIPConfig, mesh: Mesh, state: TrainState, make_step, schedule, data, ckpt: Checkpointer,
          writer: MetricWriter, preempt: Preemption, task: Any) -> dict[str, float]:
    """Steps from the state's step to `config.total_steps`; logs, evaluates and checkpoints on schedule.

    The loop stays ahead of the devices: each step is dispatched without waiting for the one before, the next batch
    is prepared while it runs, and nothing is read back but the steps' counters and the metrics of log steps. The
    counters are read `COUNTER_GROUP` steps at a time, `COUNTER_LAG` steps behind the newest (so 2 to 5 steps late),
    after one wait: the loop thread sleeps once per group, not once per step. A wait and its wake-up cost ~1 ms of
    CPU, which on a small host is taken from the step (experiments/RESULTS.md). Log, eval and checkpoint steps first
    read every pending counter, so a run that must stop (non-finite updates, a signal) never logs past, evaluates or
    checkpoints a bad state. With several processes every process reads the same steps at the same point, so all
    stop at the same step."""
    start = int(jax.device_get(state.step))
    is_main = jax.process_index() == 0
    evaluators = _make_evaluators(config, cfg)
    peak = float(config.peak_flops_per_device) * mesh.size
    progress = Progress(config.total_steps, start)
    counters = StepCounters(int(config.max_nonfinite_steps), ckpt)
    single = jax.process_count() == 1
    last: dict[str, float] = {}
    if task.evaluates_at_start and start == 0:  # classify: the zero-shot head before any step
        last = _run_evals({}, state, cfg, task)
        write_metrics(writer, 0, last)
    t_last, c_last, steps_since = time.perf_counter(), time.thread_time(), 0
    step, stop, fields = start, False, None
    step_fns: dict[Phase, Any] = {}  # one compiled step per phase (its image size, text length, patch dropout)
    unchecked: collections.deque = collections.deque()  # (step, metrics) whose counters were not read yet
    stop_arrays: dict[bool, jax.Array] = {}  # this process's stop flags on the devices (several processes)
    rows = config.batch_size // jax.process_count()  # this process's rows of a global batch
    if start < config.total_steps and is_main:
        log.info("compiling the train step (the first step includes it)…")
    while step < config.total_steps:
        phase = data.at(step)
        local = next(data)
        if phase not in step_fns:  # the batch's fields decide the compiled signature (synthetic data may add "nan")
            fields = {k: v.ndim for k, v in local.items() if k in (*task.fields, "nan")}
            step_fns[phase] = make_step(fields=fields, patch_dropout=phase.patch_dropout, make_batch=data.step_batch)
            phase_cfg, kept = _phase_config(cfg, phase)
            flops = train_flops_per_step(phase_cfg, config.batch_size, kept)
        step_fn = step_fns[phase]
        batch = to_global(local, mesh, fields)
        if not single:  # every process's stop flags travel with the batch
            requested = bool(preempt.requested)
            if requested not in stop_arrays:  # the flags change once at most: built once, not every step
                stop_arrays[requested] = to_global({"stop": preempt.flags(rows)}, mesh)["stop"]
            batch["stop"] = stop_arrays[requested]
        with jax.transfer_guard("disallow"):
            state, metrics = step_fn(state, batch)
        step += 1
        steps_since += 1
        unchecked.append((step, metrics))
        if len(unchecked) >= COUNTER_LAG + COUNTER_GROUP:  # one wait (the group's newest step), then no more
            jax.block_until_ready(unchecked[-1 - COUNTER_LAG][1][COUNTERS])
            while len(unchecked) > COUNTER_LAG:
                stop = counters.check(*unchecked.popleft()) or stop
        stop = stop or (single and preempt.requested)  # several processes stop only when all know (flags)
        log_now = step % config.log_every == 0 or step == config.total_steps or step == start + 1
        save = step % config.ckpt_every == 0 or step == config.total_steps or stop
        evaluate = step % config.eval_every == 0 or step == config.total_steps
        if save or log_now or evaluate:  # never log past, evaluate or checkpoint a run that must stop
            while unchecked:
                stop = counters.check(*unchecked.popleft()) or stop
            save = save or stop
        if log_now:
            m = {k: float(v) for k, v in jax.device_get(metrics).items() if k != COUNTERS}
            dt = (time.perf_counter() - t_last) / steps_since
            host = (time.thread_time() - c_last) / steps_since  # the loop thread's CPU time: dispatch, batches
            t_last, c_last, steps_since = time.perf_counter(), time.thread_time(), 0
            m.update(lr=float(schedule(step - 1)), step_time=dt, loop_cpu_time=host,
                     samples_per_sec=config.batch_size / dt,
                     tflops_per_device=flops / dt / mesh.size / 1e12)
            if peak:
                m["mfu"] = flops / dt / peak
            m["data_skipped"] = float(sum_over_processes(int(data.skipped)))
            for spec, n in data.skipped_by_source.items():  # a mix: which source skipped them
                m[f"data_skipped/{spec}"] = float(sum_over_processes(int(n)))
            write_metrics(writer, step, m)
            last = m
            if is_main:
                log.info(progress.line(step, {k: m[k] for k in (*task.shown, "samples_per_sec")}))
        counters.raise_if_failed()  # after logging the step that failed, before evaluating or checkpointing it
        t_pause, c_pause = time.perf_counter(), time.thread_time()
        if evaluate:
            results = _run_evals(evaluators, state, cfg, task)
            if results:
                write_metrics(writer, step, results)
                last.update(results)
        if save:
            ckpt.save(step, state, data.get_state(),
                      force=stop or step == config.total_steps)
        t_last += time.perf_counter() - t_pause  # step_time and samples_per_sec count training only
        c_last += time.thread_time() - c_pause
        if stop:
            log.warning("stopped at step %d after a signal, with a checkpoint; re-run the same command to resume",
                        step)
            break
    if task.writes_outputs and step == config.total_steps:  # classify: the model, head and classifier files
        ckpt.wait()
        task.write_outputs(writer.path.parent, cfg, state, config)
    return last


# ============================================================================================ evals

def _make_evaluators(config: ml_collections.ConfigDict, cfg: CLIPConfig) -> dict[str, Any]:
    if not config.evals:
        return {}
    from clipjax.evaluate.registry import make_evaluators

    return _from_config("config.evals", make_evaluators, config.evals, cfg)


def _run_evals(evaluators: dict[str, Any], state: TrainState, cfg: CLIPConfig,
               task: Any) -> dict[str, float]:
    variables = clip_variables(state.params, state.batch_stats)
    results: dict[str, float] = {}
    if task.evaluates:  # classify: the head on config.data.eval
        t0 = time.perf_counter()
        mine = task.evaluate(cfg, state)
        log.info("eval head (%.1f s): %s", time.perf_counter() - t0, {k: round(v, 4) for k, v in mine.items()})
        results.update(mine)
    for name, ev in evaluators.items():
        t0 = time.perf_counter()
        mine = {key: float(value) for key, value in ev.run(variables).items()}
        log.info("eval %s (%.1f s): %s", name, time.perf_counter() - t0, {k: round(v, 4) for k, v in mine.items()})
        results.update(mine)
    return results
