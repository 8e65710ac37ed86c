"""Export clipjax weights to Hugging Face transformers and open_clip.

    python -m clipjax.export --model PATH [--config NAME_OR_JSON] --format hf|open_clip --out DIR [--name NAME]

`--model`/`--config` take what `clipjax.load(path, config)` takes: OpenAI / open_clip / Hugging Face weights or a
clipjax training (or fine-tuning) workdir.

- `hf`: DIR holds `config.json` + `model.safetensors` (transformers' tensor names and layouts) and, when the text
  tower uses CLIP's BPE vocabulary, the tokenizer and image-processor files, so that
  `transformers.CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)` work offline.
  It needs a ViT image tower: transformers' CLIPModel cannot represent a ModifiedResNet (e.g. the demo model,
  OpenAI's RN50), so ResNet models export in open_clip format only.
- `open_clip`: DIR holds `model.safetensors` (open_clip's state-dict names, BatchNorm running statistics and
  `num_batches_tracked` for ResNets) and `NAME.json`, the open_clip model config:
  `open_clip.add_model_config("DIR/NAME.json"); open_clip.create_model("NAME", pretrained="DIR/model.safetensors")`.

Weights are written in float32; exporting imported weights reproduces the source tensors exactly.

DIR must be new or empty: a non-empty DIR is refused unless `--force` (then the exported files in it are
replaced, each written to a temporary file first, and other files are left alone). A clipjax training workdir
(`checkpoints/`, or `config.json` + `metrics.jsonl`), the model being exported and an existing file are refused
even with `--force`. Bad input prints one line `error: ...` on stderr and exits with status 2.

DIR (and --model) may be in an object store (`gs://BUCKET/DIR`, `s3://...`; `pip install 'clipjax[gcs]'`): the
files are written to a local temporary directory and uploaded one by one, each as one object.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import stat
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import cli, paths
from clipjax.interop import export_hf as hf_files
from clipjax.interop import names
from clipjax.interop.load import Pretrained, load
from clipjax.models.config import CLIPConfig
from clipjax.models.layers import unstack_layers

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
FORMATS = ("hf", "open_clip")


def numpy_variables(model: Pretrained) -> dict[str, Any]:
    """The model's variables as host arrays (floating point ones in float32), one entry per layer (unscanned)."""
    variables = jax.device_get(model.variables)
    if model.config.scan_layers:
        variables = unstack_layers(variables)
    return jax.tree.map(lambda x: np.asarray(x, np.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                        else np.asarray(x), variables)


def _temporary(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _save_safetensors(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """Write `state` to `path` through a temporary file (a failed write leaves any previous file intact)."""
    # {"format": "pt"}: transformers refuses safetensors files without it
    save_safetensors(state, path, metadata={"format": "pt"})


def save_safetensors(state: dict[str, np.ndarray], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """`state` as the safetensors file `path`, through a temporary file renamed over it (a failed write leaves any
    previous file intact), with the permissions of any new file (the umask's): safetensors itself creates its files
    readable by their owner only."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb"):  # a file made the usual way, for its mode
            pass
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        save_file({k: np.array(v, order="C") for k, v in state.items()}, os.fspath(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    paths.write_text(path, json.dumps(obj, indent=2) + "\n")


def is_training_workdir(path: paths.Path) -> bool:
    """Whether `path` is a clipjax training workdir (checkpoints/, or config.json next to metrics.jsonl)."""
    return (path / "checkpoints").is_dir() or ((path / "config.json").is_file() and (path / "metrics.jsonl").is_file())


def check_out_dir(out: str | os.PathLike, model: str | os.PathLike | None = None, force: bool = False) -> None:
    """Refuse an output directory whose files an export would clobber (see the module docstring)."""
    out = paths.as_path(out)
    with paths.storage_errors(out):
        _check_out_dir(out, model, force)


def _check_out_dir(out: paths.Path, model: str | os.PathLike | None, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a directory (new or empty)")
    if not out.exists():
        return
    if is_training_workdir(out):
        raise ValueError(f"--out {out} is a clipjax training workdir (exporting would overwrite its config.json); "
                         f"choose another directory")
    if model is not None and _holds(out, model):
        raise ValueError(f"--out {out} holds the model being exported ({model}); choose another directory")
    present = sorted(p.name for p in out.iterdir())
    if present and not force:
        raise ValueError(f"--out {out} is not empty (it holds {present[0]!r}{' and more' if len(present) > 1 else ''})"
                         f"; choose a new directory or pass --force to replace the exported files in it")


def _holds(out: paths.Path, model: str | os.PathLike) -> bool:
    """Whether directory `out` is `model` or holds it (object-store paths are compared as written)."""
    if paths.is_remote(out) or paths.is_remote(model):
        o, m = str(out).rstrip("/"), str(paths.as_path(model)).rstrip("/")
        return m == o or m.startswith(o + "/")
    src = pathlib.Path(model).resolve()
    return src == out.resolve() or out.resolve() in src.parents


def _export_remote(export, model: Pretrained, out: str | os.PathLike, *args: Any,
                   stale: tuple[str, ...] = ()) -> paths.Path:
    """`export(model, DIR, *args)` into a temporary local DIR whose files are then uploaded to the object-store
    directory `out`, each as one object; the files named in `stale` that this export did not write (a previous
    export's) are deleted from `out`."""
    out = paths.as_path(out)
    with tempfile.TemporaryDirectory(prefix="clipjax-export-") as tmp:
        export(model, tmp, *args)
        written = paths.upload_dir(pathlib.Path(tmp), out)
    for name in sorted(set(stale) - set(written)):
        with paths.storage_errors(out / name, "delete"):
            (out / name).unlink(missing_ok=True)
    log.info("uploaded %s to %s", ", ".join(written), out)
    return out


def _resnet_for_hf(model: Pretrained) -> str:
    return (f"{model.source or 'the model'}: --format hf needs a ViT image tower, and this model's image tower is a "
            f"ModifiedResNet, which Hugging Face's CLIPModel cannot represent; use --format open_clip")


def hf_state_dict(model: Pretrained) -> dict[str, np.ndarray]:
    """transformers `CLIPModel` state dict (names and layouts) of a ViT model."""
    return names.export_state(numpy_variables(model), names.hf_rules(model.config))


def open_clip_state_dict(model: Pretrained) -> dict[str, np.ndarray]:
    """open_clip `CLIP` state dict (= OpenAI names); ResNets include BatchNorm `num_batches_tracked` (0)."""
    cfg = model.config
    _check_open_clip_pooling(cfg)
    state = names.export_state(numpy_variables(model), names.openai_rules(cfg))
    for key in [k for k in state if k.endswith(".running_mean")]:
        # torch BatchNorm's batch counter: part of its state dict, unused with a momentum (open_clip's BatchNorms)
        state[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def _check_open_clip_pooling(cfg: CLIPConfig) -> None:
    eot = cfg.text.eot_token_id  # open_clip pools at argmax(ids): the same when EOT is the largest id
    if eot is not None and eot != cfg.text.vocab_size - 1:
        raise ValueError(f"the text tower pools at token id {eot}, not at the largest id {cfg.text.vocab_size - 1}: "
                         f"open_clip's argmax pooling would differ")


def export_hf(model: Pretrained, out: str | os.PathLike) -> paths.Path:
    """Write a transformers CLIPModel directory (weights, config, tokenizer and processor files) to `out`."""
    cfg = model.config
    if cfg.vision.is_resnet:
        raise ValueError(_resnet_for_hf(model))
    if paths.is_remote(out):
        return _export_remote(export_hf, model, out, stale=tuple(hf_files.TOKENIZER_FILES))
    config = hf_files.hf_config(cfg)
    state = hf_state_dict(model)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out / WEIGHTS)
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", hf_files.preprocessor_config(cfg.vision.image_size))
    if hf_files.uses_clip_bpe(cfg):
        for name, text in hf_files.tokenizer_files(cfg.text.context_length).items():
            paths.write_text(out / name, text)
    else:
        for name in hf_files.TOKENIZER_FILES:  # a previous export's tokenizer would not match this model
            (out / name).unlink(missing_ok=True)
        log.warning("no tokenizer files written to %s: the text vocabulary (%d ids) is not CLIP's BPE (%d)", out,
                    cfg.text.vocab_size, hf_files.CLIP_VOCAB_SIZE)
    return out


def check_model_name(name: str) -> str:
    """`name` if it can be an open_clip model name and the stem of the file NAME.json; else a ValueError."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+@-]*", name or ""):
        raise ValueError(f"open_clip model name {name!r}: use letters, digits and . _ - + @, starting with a letter or "
                         f"digit (it names the file NAME.json)")
    return name


def export_open_clip(model: Pretrained, out: str | os.PathLike, name: str = "clipjax-model") -> paths.Path:
    """Write `out/model.safetensors` (open_clip state dict) and `out/NAME.json` (its open_clip model config)."""
    check_model_name(name)
    if paths.is_remote(out):
        return _export_remote(export_open_clip, model, out, name)
    state = open_clip_state_dict(model)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out / WEIGHTS)
    _write_json(out / f"{name}.json", model.config.to_open_clip())
    return out


def _config_arg(value: str | None) -> Any:
    if value and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config: not valid JSON ({e.msg} at character {e.pos})") from None
    return value


def _parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m clipjax.export", description=__doc__)
    parser.add_argument("--model", required=True, help="weights or workdir, anything clipjax.load accepts")
    parser.add_argument("--config", default=None, help="model name, open_clip JSON file or JSON string")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf (transformers CLIPModel: ViT image towers only) or open_clip (any model)")
    parser.add_argument("--out", required=True, help="output directory (new or empty unless --force)")
    parser.add_argument("--name", default="clipjax-model", help="open_clip model name (config file stem)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, replacing the exported files (never a training workdir)")
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse `argv` and export; bad input raises (ValueError, OSError)."""
    args = _parser().parse_args(argv)
    if args.format == "open_clip":
        check_model_name(args.name)
    check_out_dir(args.out, args.model, args.force)
    model = load(args.model, _config_arg(args.config))
    if args.format == "hf":
        out = export_hf(model, args.out)
        print(f"wrote {out}: transformers.CLIPModel.from_pretrained({str(out)!r})")
    else:
        out = export_open_clip(model, args.out, args.name)
        print(f"wrote {out}: open_clip.add_model_config({str(out / (args.name + '.json'))!r}); "
              f"open_clip.create_model({args.name!r}, pretrained={str(out / WEIGHTS)!r})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: 0, or 2 after one `error: ...` line for bad input."""
    return cli.run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
