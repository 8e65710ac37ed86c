"""Bad input to a training run, through the CLI (`python -m clipjax.main`): config, data, weights and the checkpoint
directory. Each case must end in one `error: ...` line with exit status 2 (or, for data, skip and count), naming what
was wrong, before anything expensive runs, and lose nothing already on disk. Helpers and the shared set-up are in
tests/test_reliability.py; each test names the row of docs/reliability.md it checks.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import time
import zipfile

import numpy as np
import pytest

from test_reliability import (ROOT, STEPS, TINY, Setup, assert_user_error, copy_run, encode, losses, reference_run,
                              restore_newest, rows, setup_for, steps_on_disk, tail, write_dataset)


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    return setup_for(tmp_path_factory.getbasetemp())


# ============================================================================================ data

def _odd_images() -> dict[str, bytes]:
    """Encoded images in modes other than 8-bit RGB: all decode to RGB for training."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return {"cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"), "ycbcr.jpg": encode(rgb.convert("YCbCr"), "JPEG"),
            "i16.png": encode(Image.fromarray(rng.integers(0, 65535, (20, 24), dtype=np.uint16)), "PNG"),
            "palette-transparent.png": encode(rgb.convert("P"), "PNG", transparency=0),
            "la.png": encode(rgb.convert("LA"), "PNG"), "1bit.png": encode(rgb.convert("1"), "PNG"),
            "float.tiff": encode(Image.fromarray(rng.standard_normal((20, 24)).astype(np.float32)), "TIFF"),
            "lab.tiff": encode(rgb.convert("LAB"), "TIFF")}


def _mixed_dataset(directory: pathlib.Path) -> tuple[pathlib.Path, int]:
    """40 records: good PNGs, odd modes, 3 undecodable images, 3 without a usable caption. Returns (dir, bad)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    good = [encode(Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), "PNG") for _ in range(26)]
    recs = [(img, [f"a photo number {i}"]) for i, img in enumerate(good)]
    recs += [(img, [f"an odd {name}"]) for name, img in _odd_images().items()]
    recs += [(b"not an image", ["garbage"]), (good[0][:60], ["truncated"]), (b"", ["empty file"])]
    recs += [(good[1], [""]), (good[2], []), (good[3], ["   "])]
    return write_dataset(directory, recs), 6


def test_odd_image_modes_decode_and_broken_records_are_skipped(tmp_path):
    """Row "bad records": the pipeline trains on images of any PIL mode and skips (and counts) undecodable images
    and records without a caption."""
    from clipjax.data.pipeline import make_train_iterator
    from clipjax.data.preprocess import train_transform
    from clipjax.data.tokenizer import get_tokenizer

    for name, data in _odd_images().items():
        image = train_transform(data, 16, np.random.default_rng(0), scale=(0.9, 1.0))
        assert image.shape == (16, 16, 3) and np.isfinite(image).all(), name
    directory, bad = _mixed_dataset(tmp_path / "mixed")  # 40 records, 34 usable
    it = make_train_iterator(f"dir:{directory}", global_batch_size=34, image_size=16, context_length=8,
                             tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1)
    batches = [next(it), next(it)]  # 68 rows: all of epoch 0 and part of epoch 1
    it.close()
    assert all(b["image"].shape == (34, 16, 16, 3) and np.isfinite(b["image"]).all() for b in batches)
    assert it.skipped == it.get_state()["sample"] - 68
    # every bad record of epoch 0 was skipped, and nothing else (skipping the 8 odd images too would need > 80 slots)
    assert bad <= it.skipped <= 2 * bad


def test_a_mix_of_record_datasets_counts_its_skips_by_source_and_resumes_them(tmp_path):
    """Row "bad records": a mix of two ArrayRecord datasets with broken records keeps, per source, the count of its
    skipped slots (checked against the loader run on every slot the iterator drew), through a resume, and reads a
    state saved before per-source counts were kept."""
    from clipjax.data import core
    from clipjax.data.pipeline import make_train_iterator
    from clipjax.data.tokenizer import get_tokenizer

    a, _ = _mixed_dataset(tmp_path / "a")
    b = write_dataset(tmp_path / "b", [(_odd_images()["la.png"] if i % 4 else b"broken", [f"b {i}"])
                                       for i in range(30)])  # every 4th record undecodable
    mix = {f"dir:{a}": 0.5, f"dir:{b}": 0.5}

    def iterator():
        return make_train_iterator(mix, global_batch_size=16, image_size=16, context_length=8,
                                   tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1)

    it = iterator()
    next(it)
    saved = it.get_state()
    next(it)
    skipped_after_two = it.skipped
    for _ in range(2):
        next(it)
    it.close()
    state = it.get_state()
    by_source = it.skipped_by_source
    assert list(by_source) == list(mix) and min(by_source.values()) > 0
    assert sum(by_source.values()) == it.skipped == state["sample"] - 4 * 16
    recount = dict.fromkeys(mix, 0)  # the loader itself on every slot drawn
    slots = it._slots({"sample": 0, "counts": [0, 0]})
    for _ in range(state["sample"]):
        slot = next(slots)
        try:
            it.loader(slot)
        except core.BadRecord:
            recount[list(mix)[slot.source]] += 1
    assert recount == by_source
    resumed = iterator()
    resumed.set_state(saved)
    for _ in range(3):
        next(resumed)
    resumed.close()
    assert resumed.get_state() == state and resumed.skipped_by_source == by_source
    old = {k: v for k, v in saved.items() if k != "skipped_by_source"}  # a state saved by an earlier clipjax
    resumed = iterator()
    resumed.set_state(old)
    next(resumed)
    resumed.close()
    assert resumed.skipped == skipped_after_two  # the total carries on; the per-source counts restart at 0
    assert sum(resumed.skipped_by_source.values()) == skipped_after_two - saved["skipped"]
    with pytest.raises(ValueError, match="inconsistent data iterator state"):
        iterator().set_state({**saved, "skipped_by_source": [saved["skipped"] + 1, 0]})


@pytest.mark.slow
def test_skipped_records_reach_metrics(setup, tmp_path):
    """Row "bad records", end to end: a run on a dataset with broken records trains, logs each skip, and
    metrics.jsonl's data_skipped equals the count of an independent iterator over the same slots."""
    from clipjax.data.pipeline import make_train_iterator
    from clipjax.data.tokenizer import get_tokenizer

    directory, _ = _mixed_dataset(tmp_path / "mixed")
    workdir = tmp_path / "run"
    out = setup.run(workdir, f"--config.model.name={setup.tiny_bpe}", f"--config.data.train=dir:{directory}")
    assert out.returncode == 0, tail(out)
    assert "skipping record" in out.stderr and "cannot decode image" in out.stderr
    assert "no non-empty caption" in out.stderr
    it = make_train_iterator(f"dir:{directory}", global_batch_size=8, image_size=16, context_length=8,
                             tokenizer=get_tokenizer(), seed=0, process_index=0, process_count=1)
    expected = []
    for _ in range(STEPS):
        next(it)
        expected.append(it.skipped)
    it.close()
    got = {r["step"]: r["data_skipped"] for r in rows(workdir)}
    assert [got[s] for s in range(1, STEPS + 1)] == expected and expected[-1] > 0
    assert all(np.isfinite(r["loss"]) for r in rows(workdir))


def test_unknown_config_key_is_one_line_with_suggestion(setup, tmp_path):
    """Row "bad config": an unknown key fails before anything runs, with close matches."""
    out = setup.run(tmp_path / "run", "--config.total_stepz=3")
    assert_user_error(out, "unknown config key 'total_stepz'", "did you mean total_steps")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,needles", [
    ("--config.model.name=ViT-Q-99", ("config.model: unknown model 'ViT-Q-99'",)),
    ("--config.loss=cosine", ("config.loss: unknown loss 'cosine'", "siglip")),
    ("--config.mesh.tensor=3", ("config.mesh: ", "not divisible by 3")),
    ("--config.batch_size=6", ("config.batch_size=6 must be divisible",)),
    ("--config.model.dtype=float8", ("config.model: dtype='float8': valid compute dtypes are",)),  # was a traceback
    (("--config.data.tokenizer=sentencepiece:/nonexistent.model", "--config.data.train=scenes"),  # a traceback
     ("config.data.tokenizer='sentencepiece:/nonexistent.model'", "not found")),
])
def test_bad_config_values_are_one_line(setup, tmp_path, override, needles):
    """Row "bad config": values that cannot run fail in one line naming the key, before anything compiles."""
    out = setup.run(tmp_path / "run", *((override,) if isinstance(override, str) else override))
    assert_user_error(out, *needles)
    assert "parameters:" not in out.stderr


def test_bad_config_argument_is_one_line(setup, tmp_path):
    """Row "bad config": an unknown `file.py:arg` names the valid ones."""
    args = setup.args(tmp_path / "run")
    args[3] = f"--config={ROOT / 'configs' / 'vit_b32.py'}:runlokal"
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=setup.env(), cwd=ROOT)
    assert_user_error(out, "config argument 'runlokal' unknown", "runlocal")


@pytest.mark.parametrize("spec,needle", [("dir:{tmp}/missing", "does not exist"), ("dir:{tmp}/empty", "is empty"),
                                         ("no_such_tfds_dataset", "unknown dataset spec")])
def test_missing_or_empty_dataset_is_one_line(setup, tmp_path, spec, needle):
    """Row "bad config": a dataset that is missing, empty or unknown fails fast, naming the spec."""
    from clipjax.data import records as rec

    empty = tmp_path / "empty"
    empty.mkdir()
    with rec.ShardWriter(empty / rec.shard_filename("empty", "train", 0, 1), rec.image_text_features()):
        pass
    rec.write_metadata(empty, "empty", rec.image_text_features(), {"train": [0]})
    spec = spec.format(tmp=tmp_path)
    out = setup.run(tmp_path / "run", f"--config.data.train={spec}", f"--config.model.name={setup.tiny_bpe}")
    assert_user_error(out, repr(spec), needle)


@pytest.mark.slow
def test_resuming_on_another_dataset_is_one_line_that_says_how_to_start_from_these_weights(setup, tmp_path):
    """Row "bad config": the workdir's saved input position belongs to another dataset; the error names both and
    the way to train these weights on the new data (a new workdir with init_from), and nothing is lost."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [encode(Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), "PNG") for _ in range(16)]
    first = write_dataset(tmp_path / "first", [(img, [f"first {i}"]) for i, img in enumerate(images)])
    other = write_dataset(tmp_path / "other", [(img, [f"other {i}"]) for i, img in enumerate(images)])
    workdir = tmp_path / "run"
    model = f"--config.model.name={setup.tiny_bpe}"
    assert setup.run(workdir, model, f"--config.data.train=dir:{first}", "--config.total_steps=2").returncode == 0
    before = steps_on_disk(workdir)
    out = setup.run(workdir, model, f"--config.data.train=dir:{other}")
    line = assert_user_error(out, "data.train", f"dir:{first}", f"dir:{other}")
    assert line.endswith(f"start a new workdir with --config.init_from={workdir}")
    assert steps_on_disk(workdir) == before
    fresh = setup.run(tmp_path / "fresh", model, f"--config.data.train=dir:{other}", f"--config.init_from={workdir}")
    assert fresh.returncode == 0, tail(fresh)


def _export_safetensors(path: pathlib.Path, model: dict) -> pathlib.Path:
    """Random weights of `model` in open_clip's safetensors layout."""
    import jax
    from safetensors.numpy import save_file

    from clipjax.interop.names import export_state, openai_rules
    from clipjax.models import CLIP
    from clipjax.models.specs import get_model_config

    cfg = get_model_config(model)
    s = cfg.vision.image_size
    variables = CLIP(cfg).init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.float32),
                               np.zeros((1, cfg.text.context_length), np.int32))
    import flax.linen as nn

    state = export_state(nn.meta.unbox(variables), openai_rules(cfg))
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}, str(path))
    return path


WIDER = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48}}


def test_weights_of_another_architecture_name_the_tensor(setup, tmp_path):
    """Row "bad weights": `config.init_from` with weights of another architecture fails in one line naming the
    tensor and both shapes."""
    weights = _export_safetensors(tmp_path / "wider.safetensors", WIDER)
    out = setup.run(tmp_path / "run", f"--config.init_from={weights}")
    line = assert_user_error(out, "config.init_from", str(weights), "has shape", "the config expects")
    assert re.search(r"tensor for params/visual/\S+ has shape \([^)]*48[^)]*\)", line), line


def test_weights_of_another_architecture_through_load(tmp_path):
    """Row "bad weights", library: `clipjax.load` with the wrong config names the tensor and shapes."""
    import clipjax

    weights = _export_safetensors(tmp_path / "wider.safetensors", WIDER)
    with pytest.raises(ValueError, match=r"tensor for params/visual/\S+ has shape .*the config expects"):
        clipjax.load(weights, config=TINY)
    assert clipjax.load(weights, config=WIDER).config.vision.width == 48  # and the right config loads


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _booby_trapped_pt(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    import pickle

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"visual.proj": _Payload(os.system, f"touch {marker}")}))
        zf.writestr("archive/byteorder", "little")
    return path


def test_pickled_code_in_a_pt_file_is_refused_by_load(tmp_path):
    """Row "bad weights": a .pt whose pickle would run code is refused before anything runs."""
    import clipjax
    from clipjax.interop.torch_pickle import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    pt = _booby_trapped_pt(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refused global"):
        clipjax.load(pt)
    assert not marker.exists()


def test_pickled_code_in_init_from_is_refused_by_the_cli(setup, tmp_path):
    """Row "bad weights", end to end: `config.init_from` pointing at such a file is a one-line error."""
    marker = tmp_path / "pwned"
    pt = _booby_trapped_pt(tmp_path / "evil.pt", marker)
    out = setup.run(tmp_path / "run", f"--config.init_from={pt}")
    assert_user_error(out, "config.init_from", "refused global", "system")
    assert not marker.exists()


@pytest.mark.parametrize("name, data, needle", [
    ("random.safetensors", bytes(range(256)) * 2, "not a readable safetensors file"),
    ("empty.pt", b"", "empty file"),
])
def test_unreadable_init_from_is_one_line(setup, tmp_path, name, data, needle):
    """Row "bad weights": random bytes or an empty file as `config.init_from` (a traceback from the safetensors
    reader before) is a one-line error naming the file."""
    weights = tmp_path / name
    weights.write_bytes(data)
    out = setup.run(tmp_path / "run", f"--config.init_from={weights}")
    assert_user_error(out, "config.init_from", str(weights), needle)


# ============================================================================================ checkpoint directory

def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def read_only(path: pathlib.Path):
    """`path` made unwritable: a read-only bind mount as root (root ignores permission bits), chmod otherwise."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if not _mount("--bind", str(path), str(path)):
        pytest.skip("needs a bind mount (root with CAP_SYS_ADMIN)")
    try:
        assert _mount("-o", "remount,bind,ro", str(path))
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextlib.contextmanager
def small_tmpfs(path: pathlib.Path, size: int):
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(directory: pathlib.Path) -> pathlib.Path:
    """Fill the file system of `directory` to the last byte with one file; returns it."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * block):
                    pass
    return filler


@pytest.mark.slow
def test_unwritable_checkpoint_directory_fails_fast_and_keeps_checkpoints(setup, tmp_path):
    """Row "checkpoint directory unwritable": one error line before any compilation; existing checkpoints intact."""
    workdir = copy_run(reference_run(setup), tmp_path / "run", keep_until=4)
    before = {p: p.read_bytes() for p in (workdir / "checkpoints").rglob("*") if p.is_file()}
    with read_only(workdir / "checkpoints"):
        out = setup.run(workdir)
    assert_user_error(out, "checkpoint directory", str(workdir / "checkpoints"), "not writable")
    assert "parameters:" not in out.stderr  # failed before initialising or compiling anything
    assert {p: p.read_bytes() for p in (workdir / "checkpoints").rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoints_and_resumes_exactly(setup, tmp_path):
    """Row "disk full": the disk fills up after the step-2 checkpoint; the next (async) write fails and stops the run
    with one error line naming that step; step 2 is kept; with space again, the run resumes from it on the
    uninterrupted trajectory."""
    ref = losses(reference_run(setup))
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    with small_tmpfs(checkpoints, size=16 << 20):
        with setup.start(workdir, "--config.data.synthetic_seconds_per_batch=0.3") as proc:
            deadline = time.monotonic() + 600
            while not (checkpoints / "2").is_dir() and proc.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            filler = _fill(checkpoints)
            rc, text = proc.finish()
        out = subprocess.CompletedProcess(proc.popen.args, rc, "", text)
        assert_user_error(out, "writing checkpoint step 4", "No space left on device", "steps on disk: [2]")
        assert steps_on_disk(workdir) == [2]
        assert restore_newest(workdir)[0] == 2
        filler.unlink()
        resumed = setup.run(workdir)
        assert resumed.returncode == 0, tail(resumed)
        assert "resumed from step 2 " in resumed.stderr
        assert steps_on_disk(workdir) == [2, 4, 6, 8]
    assert losses(workdir) == ref
