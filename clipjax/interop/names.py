"""Weight-name and layout maps between clipjax and PyTorch CLIP checkpoints (OpenAI / open_clip, Hugging Face).

One table of rules per architecture serves both directions: each `Rule` names the source tensors, the clipjax
variable they become, and the two layout transforms. Import consumes every source tensor or fails naming it; export
is the exact inverse (bit-identical round trip).

PyTorch layouts: Linear weight [out, in]; Conv2d [out, in, kh, kw]; MultiheadAttention in_proj_weight [3·D, D].
clipjax (Flax): Dense kernel [in, out]; Conv kernel [kh, kw, in, out]; fused QKV [D, 3, H, K]; out [H, K, D].
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from clipjax.models.config import CLIPConfig

Array = np.ndarray
Path = tuple[str, ...]  # ("params", "visual", "conv1", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    target: Path
    to_jax: Callable[..., Array]
    to_torch: Callable[[Array], tuple[Array, ...]]


def _same(key: str, target: Path) -> Rule:
    return Rule((key,), target, lambda a: a, lambda a: (a,))


def _linear(key: str, target: Path) -> Rule:  # [out, in] ↔ [in, out]
    return Rule((key,), target, lambda w: w.T, lambda k: (k.T,))


def _conv(key: str, target: Path) -> Rule:  # [O, I, kh, kw] ↔ [kh, kw, I, O]
    return Rule((key,), target, lambda w: w.transpose(2, 3, 1, 0), lambda k: (k.transpose(3, 2, 0, 1),))


def _scalar(key: str, target: Path) -> Rule:
    return Rule((key,), target, lambda a: np.asarray(a).reshape(()), lambda a: (np.asarray(a).reshape(()),))


def _fused_qkv(key_w: str, key_b: str, prefix: Path, heads: int) -> list[Rule]:
    def w_in(w):  # [3D, D] → [D, 3, H, K]
        d = w.shape[1]
        return w.reshape(3, heads, d // heads, d).transpose(3, 0, 1, 2)

    def w_out(k):
        d = k.shape[0]
        return (k.transpose(1, 2, 3, 0).reshape(3 * d, d),)

    return [Rule((key_w,), prefix + ("qkv_kernel",), w_in, w_out),
            Rule((key_b,), prefix + ("qkv_bias",), lambda b: b.reshape(3, heads, -1), lambda b: (b.reshape(-1),))]


def _split_qkv(keys_w: Sequence[str], keys_b: Sequence[str], prefix: Path, heads: int) -> list[Rule]:
    """Hugging Face's separate q/k/v Linear layers ↔ the fused QKV kernel."""

    def w_in(q, k, v):  # 3 × [D, D] (out, in) → [D, 3, H, K]
        d = q.shape[1]
        return np.stack([q, k, v]).reshape(3, heads, d // heads, d).transpose(3, 0, 1, 2)

    def w_out(kern):
        d = kern.shape[0]
        w = kern.transpose(1, 2, 3, 0).reshape(3, d, d)
        return w[0], w[1], w[2]

    def b_in(q, k, v):
        return np.stack([q, k, v]).reshape(3, heads, -1)

    def b_out(b):
        b = b.reshape(3, -1)
        return b[0], b[1], b[2]

    return [Rule(tuple(keys_w), prefix + ("qkv_kernel",), w_in, w_out),
            Rule(tuple(keys_b), prefix + ("qkv_bias",), b_in, b_out)]


def _attn_out(key_w: str, key_b: str, prefix: Path, heads: int) -> list[Rule]:
    def w_in(w):  # [D, D] (out, in) → [H, K, D]
        return w.T.reshape(heads, w.shape[1] // heads, w.shape[0])

    def w_out(k):
        h, kk, d = k.shape
        return (k.reshape(h * kk, d).T,)

    return [Rule((key_w,), prefix + ("out_kernel",), w_in, w_out), _same(key_b, prefix + ("out_bias",))]


def _ln(src: str, target: Path, weight: str = "weight") -> list[Rule]:
    return [_same(f"{src}.{weight}", target + ("scale",)), _same(f"{src}.bias", target + ("bias",))]


def _bn(src: str, target: tuple[str, ...]) -> list[Rule]:
    return [_same(f"{src}.weight", ("params",) + target + ("scale",)),
            _same(f"{src}.bias", ("params",) + target + ("bias",)),
            _same(f"{src}.running_mean", ("batch_stats",) + target + ("mean",)),
            _same(f"{src}.running_var", ("batch_stats",) + target + ("var",))]


# ---- OpenAI / open_clip names (open_clip's CLIP class keeps OpenAI's state-dict names) ---------------------------

def _openai_block(src: str, dst: Path, heads: int) -> list[Rule]:
    return [
        *_ln(f"{src}.ln_1", dst + ("ln_1",)),
        *_fused_qkv(f"{src}.attn.in_proj_weight", f"{src}.attn.in_proj_bias", dst + ("attn",), heads),
        *_attn_out(f"{src}.attn.out_proj.weight", f"{src}.attn.out_proj.bias", dst + ("attn",), heads),
        *_ln(f"{src}.ln_2", dst + ("ln_2",)),
        _linear(f"{src}.mlp.c_fc.weight", dst + ("mlp", "c_fc", "kernel")),
        _same(f"{src}.mlp.c_fc.bias", dst + ("mlp", "c_fc", "bias")),
        _linear(f"{src}.mlp.c_proj.weight", dst + ("mlp", "c_proj", "kernel")),
        _same(f"{src}.mlp.c_proj.bias", dst + ("mlp", "c_proj", "bias")),
    ]


def _openai_text(cfg: CLIPConfig) -> list[Rule]:
    t, p = cfg.text, ("params", "text")
    rules = [_same("token_embedding.weight", p + ("token_embedding", "embedding")),
             _same("positional_embedding", p + ("positional_embedding",)),
             *_ln("ln_final", p + ("ln_final",)),
             _same("text_projection", p + ("text_projection", "kernel"))]
    for i in range(t.layers):
        rules += _openai_block(f"transformer.resblocks.{i}", p + ("transformer", f"resblocks_{i}"), t.heads)
    return rules


def _openai_vit(cfg: CLIPConfig) -> list[Rule]:
    v, p = cfg.vision, ("params", "visual")
    rules = [_conv("visual.conv1.weight", p + ("conv1", "kernel")),
             _same("visual.class_embedding", p + ("class_embedding",)),
             _same("visual.positional_embedding", p + ("positional_embedding",)),
             *_ln("visual.ln_pre", p + ("ln_pre",)),
             *_ln("visual.ln_post", p + ("ln_post",)),
             _same("visual.proj", p + ("proj", "kernel"))]
    for i in range(v.layers):
        rules += _openai_block(f"visual.transformer.resblocks.{i}", p + ("transformer", f"resblocks_{i}"), v.heads)
    return rules


def _openai_resnet(cfg: CLIPConfig) -> list[Rule]:
    v = cfg.vision
    rules: list[Rule] = []
    for j in (1, 2, 3):
        rules += [_conv(f"visual.conv{j}.weight", ("params", "visual", f"conv{j}", "kernel")),
                  *_bn(f"visual.bn{j}", ("visual", f"bn{j}"))]
    width = v.width
    inplanes = width
    for stage, depth in enumerate(v.layers):
        planes = width * 2 ** stage
        for i in range(depth):
            src, dst = f"visual.layer{stage + 1}.{i}", ("visual", f"layer{stage + 1}_{i}")
            for j in (1, 2, 3):
                rules += [_conv(f"{src}.conv{j}.weight", ("params",) + dst + (f"conv{j}", "kernel")),
                          *_bn(f"{src}.bn{j}", dst + (f"bn{j}",))]
            stride = 2 if (stage > 0 and i == 0) else 1
            if stride > 1 or inplanes != planes * 4:
                # open_clip: downsample = Sequential("-1": AvgPool2d, "0": conv, "1": bn)
                rules += [_conv(f"{src}.downsample.0.weight", ("params",) + dst + ("downsample_conv", "kernel")),
                          *_bn(f"{src}.downsample.1", dst + ("downsample_bn",))]
            inplanes = planes * 4
    heads, p = v.heads, ("params", "visual", "attnpool")
    rules.append(_same("visual.attnpool.positional_embedding", p + ("positional_embedding",)))
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += [Rule((f"visual.attnpool.{name}.weight",), p + (name, "kernel"),
                       lambda w: w.T.reshape(w.shape[1], heads, -1), lambda k: (k.reshape(k.shape[0], -1).T,)),
                  Rule((f"visual.attnpool.{name}.bias",), p + (name, "bias"),
                       lambda b: b.reshape(heads, -1), lambda b: (b.reshape(-1),))]
    rules += [_linear("visual.attnpool.c_proj.weight", p + ("c_proj", "kernel")),
              _same("visual.attnpool.c_proj.bias", p + ("c_proj", "bias"))]
    return rules


def openai_rules(cfg: CLIPConfig) -> list[Rule]:
    """Rules for OpenAI `.pt` and open_clip state dicts (same names)."""
    vision = _openai_resnet(cfg) if cfg.vision.is_resnet else _openai_vit(cfg)
    extra = [_scalar("logit_bias", ("params", "logit_bias"))] if cfg.init_logit_bias is not None else []
    return vision + _openai_text(cfg) + [_scalar("logit_scale", ("params", "logit_scale"))] + extra


OPENAI_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")


# ---- Hugging Face transformers CLIPModel ----------------------------------------------------------------------

def _hf_block(src: str, dst: Path, heads: int) -> list[Rule]:
    a = f"{src}.self_attn"
    return [
        *_ln(f"{src}.layer_norm1", dst + ("ln_1",)),
        *_split_qkv([f"{a}.{n}_proj.weight" for n in "qkv"], [f"{a}.{n}_proj.bias" for n in "qkv"],
                    dst + ("attn",), heads),
        *_attn_out(f"{a}.out_proj.weight", f"{a}.out_proj.bias", dst + ("attn",), heads),
        *_ln(f"{src}.layer_norm2", dst + ("ln_2",)),
        _linear(f"{src}.mlp.fc1.weight", dst + ("mlp", "c_fc", "kernel")),
        _same(f"{src}.mlp.fc1.bias", dst + ("mlp", "c_fc", "bias")),
        _linear(f"{src}.mlp.fc2.weight", dst + ("mlp", "c_proj", "kernel")),
        _same(f"{src}.mlp.fc2.bias", dst + ("mlp", "c_proj", "bias")),
    ]


def hf_rules(cfg: CLIPConfig) -> list[Rule]:
    """Rules for a transformers `CLIPModel` state dict (ViT image towers only: HF has no ResNet CLIP)."""
    if cfg.vision.is_resnet:
        raise ValueError("Hugging Face transformers has no ResNet CLIP; use the open_clip format for ResNet models")
    t, v = cfg.text, cfg.vision
    pt, pv = ("params", "text"), ("params", "visual")
    rules = [
        _same("text_model.embeddings.token_embedding.weight", pt + ("token_embedding", "embedding")),
        _same("text_model.embeddings.position_embedding.weight", pt + ("positional_embedding",)),
        *_ln("text_model.final_layer_norm", pt + ("ln_final",)),
        _linear("text_projection.weight", pt + ("text_projection", "kernel")),
        _conv("vision_model.embeddings.patch_embedding.weight", pv + ("conv1", "kernel")),
        _same("vision_model.embeddings.class_embedding", pv + ("class_embedding",)),
        _same("vision_model.embeddings.position_embedding.weight", pv + ("positional_embedding",)),
        *_ln("vision_model.pre_layrnorm", pv + ("ln_pre",)),
        *_ln("vision_model.post_layernorm", pv + ("ln_post",)),
        _linear("visual_projection.weight", pv + ("proj", "kernel")),
        _scalar("logit_scale", ("params", "logit_scale")),
    ]
    for i in range(t.layers):
        rules += _hf_block(f"text_model.encoder.layers.{i}", pt + ("transformer", f"resblocks_{i}"), t.heads)
    for i in range(v.layers):
        rules += _hf_block(f"vision_model.encoder.layers.{i}", pv + ("transformer", f"resblocks_{i}"), v.heads)
    return rules


HF_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


# ---- applying rules ---------------------------------------------------------------------------------------------

def _ignorable(key: str, ignored: Sequence[str]) -> bool:
    return key in ignored or key.endswith("num_batches_tracked") or key.endswith(".attn_mask")


def import_state(state: dict[str, Array], rules: list[Rule], ignored: Sequence[str], source: str) -> dict:
    """Apply `rules` to a flat torch-named state dict → nested clipjax variables {"params": …, ["batch_stats": …]}.

    Every tensor must be used: missing and unexpected keys raise, naming them.
    """
    needed = {k for r in rules for k in r.sources}
    missing = sorted(needed - set(state))
    unexpected = sorted(k for k in set(state) - needed if not _ignorable(k, ignored))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:4]}")
        raise ValueError(f"{source}: weights do not match the architecture: {'; '.join(parts)} "
                         f"(wrong config for these weights?)")
    out: dict = {}
    for r in rules:
        value = r.to_jax(*[np.asarray(state[k], dtype=np.float32) for k in r.sources])
        node = out
        for part in r.target[:-1]:
            node = node.setdefault(part, {})
        node[r.target[-1]] = np.array(value, dtype=np.float32, order="C")
    return out


def export_state(variables: dict, rules: list[Rule]) -> dict[str, Array]:
    """Inverse of `import_state`: nested clipjax variables → flat torch-named state dict."""
    out: dict[str, Array] = {}
    for r in rules:
        node = variables
        for part in r.target:
            node = node[part]
        for key, value in zip(r.sources, r.to_torch(np.asarray(node))):
            out[key] = np.array(value, order="C")
    return out
