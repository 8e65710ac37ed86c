"""Export clipjax weights to Hugging Face transformers and open_clip.

    python -m clipjax.export --model PATH [--config NAME_OR_JSON] --format hf|open_clip --out DIR [--name NAME]

`--model`/`--config` take what `clipjax.load(path, config)` takes: OpenAI / open_clip / Hugging Face weights or a
clipjax training (or fine-tuning) workdir.

- `hf`: DIR holds `config.json` + `model.safetensors` (transformers' tensor names and layouts) and, when the text
  tower uses CLIP's BPE vocabulary, the tokenizer and image-processor files, so that
  `transformers.CLIPModel.from_pretrained(DIR)` and `CLIPProcessor.from_pretrained(DIR)` work offline.
  transformers has no ResNet CLIP: ResNet models export in open_clip format only.
- `open_clip`: DIR holds `model.safetensors` (open_clip's state-dict names, BatchNorm running statistics and
  `num_batches_tracked` for ResNets) and `NAME.json`, the open_clip model config:
  `open_clip.add_model_config("DIR/NAME.json"); open_clip.create_model("NAME", pretrained="DIR/model.safetensors")`.

Weights are written in float32; exporting imported weights reproduces the source tensors exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def _save_safetensors(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    # {"format": "pt"}: transformers refuses safetensors files without it
    save_file({k: np.array(v, order="C") for k, v in state.items()}, os.fspath(path), metadata={"format": "pt"})


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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


def export_hf(model: Pretrained, out: str | os.PathLike) -> pathlib.Path:
    """Write a transformers CLIPModel directory (weights, config, tokenizer and processor files) to `out`."""
    cfg = model.config
    if cfg.vision.is_resnet:
        raise ValueError("Hugging Face transformers has no ResNet CLIP; export this model with --format open_clip")
    config = hf_files.hf_config(cfg)
    state = hf_state_dict(model)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_safetensors(state, out / WEIGHTS)
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", hf_files.preprocessor_config(cfg.vision.image_size))
    if hf_files.uses_clip_bpe(cfg):
        for name, text in hf_files.tokenizer_files(cfg.text.context_length).items():
            (out / name).write_text(text, encoding="utf-8")
    else:
        log.warning("no tokenizer files written to %s: the text vocabulary (%d ids) is not CLIP's BPE (%d)", out,
                    cfg.text.vocab_size, hf_files.CLIP_VOCAB_SIZE)
    return out


def export_open_clip(model: Pretrained, out: str | os.PathLike, name: str = "clipjax-model") -> pathlib.Path:
    """Write `out/model.safetensors` (open_clip state dict) and `out/NAME.json` (its open_clip model config)."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipjax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="weights or workdir, anything clipjax.load accepts")
    parser.add_argument("--config", default=None, help="model name, open_clip JSON file or JSON string")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default="clipjax-model", help="open_clip model name (config file stem)")
    args = parser.parse_args(argv)
    try:
        model = load(args.model, _config_arg(args.config))
        if args.format == "hf":
            out = export_hf(model, args.out)
            print(f"wrote {out}: transformers.CLIPModel.from_pretrained({str(out)!r})")
        else:
            out = export_open_clip(model, args.out, args.name)
            print(f"wrote {out}: open_clip.add_model_config({str(out / (args.name + '.json'))!r}); "
                  f"open_clip.create_model({args.name!r}, pretrained={str(out / WEIGHTS)!r})")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
