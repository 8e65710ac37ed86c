"""`clipjax.load`: one entry point for OpenAI, open_clip and Hugging Face weights (and clipjax training workdirs).

Formats, recognised from the path:
- a Hugging Face `CLIPModel` directory (config.json + model.safetensors): config read from it;
- a clipjax training workdir (config.json + checkpoints/): the latest checkpoint;
- an open_clip state dict (.safetensors/.bin/.pt/.pth) with `config` = an open_clip model name or JSON path/dict,
  or a directory holding `model.safetensors` + `open_clip_config.json` (what `clipjax.export --format open_clip`
  and `clipjax.finetune` write);
- an OpenAI checkpoint .pt (TorchScript archive or state dict): config inferred from the tensors (QuickGELU).
`.pt`/`.bin` files are read without torch and without executing pickled code.

Every path may also be in an object store (gs://, s3://, through `etils.epath`; `pip install 'clipjax[gcs]'`): a
remote weight file is downloaded to a temporary file and read from there (messages name the remote path), a remote
workdir's checkpoints are read by orbax in place. A store that cannot be reached raises `clipjax.paths.StorageError`
(an OSError) naming the path.

Weights that cannot be read (random bytes, a truncated or empty file, a directory of neither layout, a config
that is not JSON) raise `WeightsError`, a ValueError whose one-line message names the file; a `.pt` whose pickle
could run code or allocate far more than its size raises `torch_pickle.UnsafeCheckpointError` (also a ValueError).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from clipjax import paths
from clipjax.interop import names
from clipjax.interop.hf import config_from_hf
from clipjax.interop.openai import infer_config
from clipjax.models.clip import CLIP
from clipjax.models.config import CLIPConfig
from clipjax.models.layers import stack_layers, unstack_layers
from clipjax.models.specs import get_model_config


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit their architecture (the message names the file)."""


@dataclasses.dataclass
class Pretrained:
    """A CLIP model with its weights: encode images and texts like open_clip's `encode_*(normalize=False)`."""

    config: CLIPConfig
    variables: dict[str, Any]  # {"params": …, ["batch_stats": …]}
    source: str = ""

    @property
    def module(self) -> CLIP:
        return CLIP(self.config)

    @property
    def params(self) -> dict[str, Any]:
        return self.variables["params"]

    @property
    def logit_scale(self) -> float:
        return float(self.params["logit_scale"])

    @functools.cached_property
    def _encode_image(self) -> Callable:
        return jax.jit(lambda v, x: self.module.apply(v, x, method=CLIP.encode_image))

    @functools.cached_property
    def _encode_text(self) -> Callable:
        return jax.jit(lambda v, t: self.module.apply(v, t, method=CLIP.encode_text))

    def encode_image(self, images: Any) -> jax.Array:
        """images: float32 [N, H, W, 3], already preprocessed → unnormalised features [N, E]."""
        return self._encode_image(self.variables, jnp.asarray(images, jnp.float32))

    def encode_text(self, tokens: Any) -> jax.Array:
        """tokens: int32 [N, L] → unnormalised features [N, E]."""
        return self._encode_text(self.variables, jnp.asarray(tokens, jnp.int32))

    def preprocess(self, image: Any) -> np.ndarray:
        from clipjax.data.preprocess import preprocess

        return preprocess(image, image_size=self.config.vision.image_size)

    def tokenize(self, texts: str | list[str]) -> np.ndarray:
        from clipjax.data.tokenizer import tokenize

        return tokenize(texts, context_length=self.config.text.context_length)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Flat name → array dict from .safetensors, or (torch-free, no code execution) .pt/.pth/.bin; a remote file
    through a temporary local copy."""
    if paths.is_remote(path):
        return _read_remote_state_dict(os.fspath(path))
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise WeightsError(f"{path}: empty file, not a weight file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith((".pt", ".pth", ".bin")):
        from clipjax.interop.torch_pickle import load_torch_file

        return load_torch_file(path)
    raise WeightsError(f"{path}: unsupported weight file (expected .safetensors, .pt, .pth or .bin)")


def _read_remote_state_dict(path: str) -> dict[str, np.ndarray]:
    """`read_state_dict` of a remote file: downloaded, then read; its errors name `path`, not the local copy."""
    with paths.local_copy(path) as local:
        try:
            return read_state_dict(local)
        except ValueError as e:  # WeightsError, UnsafeCheckpointError: the same type, about the remote path
            raise _renamed(e, str(local), path) from None


def _renamed(e: ValueError, local: str, remote: str) -> ValueError:
    """`e` with `local` replaced by `remote` in its message (same type when it takes one message)."""
    message = str(e).replace(local, remote)
    try:
        return type(e)(message)
    except TypeError:
        return WeightsError(message)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file; a file that is not one (random bytes, truncated) is a WeightsError."""
    from safetensors import SafetensorError, safe_open

    try:
        try:
            with safe_open(path, framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (TypeError, ValueError):  # e.g. bfloat16, which numpy lacks: read through JAX
            with safe_open(path, framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    except SafetensorError as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None


def variables_from_state(state: dict[str, np.ndarray], cfg: CLIPConfig, source: str) -> dict[str, Any]:
    """Convert a torch-named state dict (OpenAI/open_clip or HF names) into checked clipjax variables."""
    if any(k.startswith("text_model.") for k in state):
        rules, ignored = names.hf_rules(cfg), names.HF_IGNORED
    else:
        rules, ignored = names.openai_rules(cfg), names.OPENAI_IGNORED
    try:
        variables = names.import_state(state, rules, ignored, source)
    except (IndexError, TypeError, ValueError) as e:  # a tensor of the wrong rank or size for its rule
        if str(e).startswith(source):
            raise
        raise WeightsError(f"{source}: tensors do not fit the architecture ({e})") from None
    check_shapes(variables, cfg, source)
    if cfg.scan_layers:
        variables = stack_layers(variables)
    return jax.tree.map(jnp.asarray, variables)


def expected_shapes(cfg: CLIPConfig) -> dict[str, Any]:
    """Shapes of the unscanned variables of `cfg`, without allocating anything."""
    import flax.linen as nn

    c = cfg.replace(scan_layers=False, remat="none")
    s = c.vision.image_size
    shapes = jax.eval_shape(CLIP(c).init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                            jnp.zeros((1, c.text.context_length), jnp.int32))
    return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(shapes))


def check_shapes(variables: dict[str, Any], cfg: CLIPConfig, source: str) -> None:
    want = dict(_flatten(expected_shapes(cfg)))
    got = {k: tuple(np.shape(v)) for k, v in _flatten(variables)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise WeightsError(f"{source}: variables do not match the architecture: missing {missing[:4]}, "
                           f"unexpected {extra[:4]}")
    for k in sorted(want):
        if want[k] != got[k]:
            raise WeightsError(f"{source}: tensor for {k} has shape {got[k]}, the config expects {want[k]} "
                               f"(wrong config for these weights?)")


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else k
        out += _flatten(v, key) if isinstance(v, dict) else [(key, v)]
    return out


def _resolve_config(config: Any) -> CLIPConfig:
    if isinstance(config, (str, os.PathLike)) and paths.is_remote(config):  # an open_clip JSON file in a store
        config = _read_json(paths.as_path(config))
    return get_model_config(config)


def _read_json(path: paths.Path) -> Any:
    """The JSON value of `path`; unreadable text or invalid JSON is a WeightsError naming the file."""
    try:
        if paths.is_remote(path):
            return json.loads(paths.read_text(path))
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not a JSON file ({e})") from None


def _hf_config(hf: dict[str, Any], path: paths.Path) -> CLIPConfig:
    """The CLIPConfig of a Hugging Face config.json; fields of the wrong type are a WeightsError naming it."""
    try:
        return config_from_hf(hf, str(path))
    except (TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise WeightsError(f"{path}: not a Hugging Face CLIPConfig ({type(e).__name__}: {e})") from None


def _infer_config(state: dict[str, np.ndarray], source: str) -> CLIPConfig:
    """The OpenAI architecture of `state`; tensors of impossible ranks are a WeightsError naming `source`."""
    try:
        return infer_config(state, source)
    except (IndexError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        if isinstance(e, ValueError) and str(e).startswith(source):
            raise
        raise WeightsError(f"{source}: tensor shapes are not those of an OpenAI/open_clip CLIP ({e}); pass config= "
                           f"for other layouts") from None


def load_workdir(workdir: str | os.PathLike) -> Pretrained:
    """A `Pretrained` from a clipjax training workdir: its config.json and its newest checkpoint's weights."""
    from clipjax.checkpoint import Checkpointer  # late: orbax is only needed for workdirs

    workdir = paths.as_path(workdir)
    config = _read_json(workdir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_config"), dict):
        raise WeightsError(f"{workdir}/config.json has no 'model_config': not a clipjax training workdir")
    try:
        cfg = CLIPConfig.from_dict(config["model_config"])
    except (TypeError, KeyError) as e:
        raise WeightsError(f"{workdir}/config.json: bad 'model_config' ({e})") from None
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    try:
        restored = ckpt.restore()
    finally:
        ckpt.close()
    if restored is None:
        raise WeightsError(f"{workdir}: no checkpoint in {workdir / 'checkpoints'}")
    step, state, _ = restored
    # the CLIP's own parameters: a fine-tuning run's classification head ("head") is read by clipjax.finetune
    variables = {"params": {k: v for k, v in state["params"].items() if k != "head"}}
    if state.get("batch_stats"):
        variables["batch_stats"] = state["batch_stats"]
    variables = jax.tree.map(jnp.asarray, variables)
    if cfg.scan_layers:
        variables = unstack_layers(variables)
    return Pretrained(cfg.replace(scan_layers=False, remat="none"), variables, f"{workdir}@{step}")


def load(path: str | os.PathLike, config: str | os.PathLike | dict | CLIPConfig | None = None) -> Pretrained:
    """Load CLIP weights from any supported source (see the module docstring)."""
    p = paths.as_path(path)
    if not paths.exists(p):
        raise FileNotFoundError(f"{p}: no such file or directory")
    if paths.is_dir(p):
        if paths.is_dir(p / "checkpoints"):  # training workdir
            return load_workdir(p)
        if paths.is_file(p / "open_clip_config.json") and paths.is_file(p / "model.safetensors"):
            # open_clip layout: weights + model-config JSON side by side (also what clipjax.finetune writes)
            cfg = _resolve_config(config if config is not None else p / "open_clip_config.json")
            state = read_state_dict(p / "model.safetensors")
            return Pretrained(cfg, variables_from_state(state, cfg, str(p)), str(p))
        cfg_file = p / "config.json"
        weights = p / "model.safetensors"
        if not paths.is_file(cfg_file) or not paths.is_file(weights):
            raise WeightsError(f"{p}: a directory must be a Hugging Face CLIPModel (config.json + model.safetensors), "
                               f"an open_clip export (open_clip_config.json + model.safetensors) or a clipjax "
                               f"workdir (checkpoints/)")
        hf = _read_json(cfg_file)
        if not isinstance(hf, dict):
            raise WeightsError(f"{cfg_file}: expected a JSON object (a Hugging Face CLIPConfig)")
        cfg = _resolve_config(config) if config is not None else _hf_config(hf, cfg_file)
        state = read_state_dict(weights)
        return Pretrained(cfg, variables_from_state(state, cfg, str(weights)), str(p))
    state = read_state_dict(p)
    if config is None:
        if p.suffix == ".safetensors":
            raise ValueError(f"{p}: an open_clip state dict needs config= (a model name such as 'ViT-B-32' or the "
                             f"path of its model-config JSON)")
        cfg = _infer_config(state, str(p))
    else:
        cfg = _resolve_config(config)
    return Pretrained(cfg, variables_from_state(state, cfg, str(p)), str(p))
