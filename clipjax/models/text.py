"""Causal text tower as in OpenAI CLIP: token + position embeddings → causal blocks → ln_final → EOT token → proj.

Letters: B batch, L tokens (≤ context length), D width, E embed dim, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipjax.models.config import TextConfig
from clipjax.models.layers import LayerNorm, Transformer, constrain, logical, openai_block_stds


def eot_positions(tokens: jax.Array, eot_token_id: int | None) -> jax.Array:
    """Index of the end-of-text token per row: argmax of the ids (OpenAI) or the first match of `eot_token_id`."""
    if eot_token_id is None:
        return jnp.argmax(tokens, axis=-1)  # [B]
    return jnp.argmax(tokens == eot_token_id, axis=-1)  # [B]


class TextTransformer(nn.Module):
    cfg: TextConfig
    embed_dim: int
    quick_gelu: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.cfg
        b, length = tokens.shape
        if length > c.context_length:
            raise ValueError(f"text tower takes at most {c.context_length} tokens, got {length}")
        x = nn.Embed(c.vocab_size, c.width, dtype=self.dtype,
                     embedding_init=logical(nn.initializers.normal(0.02), "vocab", "embed"),
                     name="token_embedding")(constrain(tokens, "batch", "length"))  # [B, L, D]
        pos = self.param("positional_embedding", logical(nn.initializers.normal(0.01), None, "embed"),
                         (c.context_length, c.width))
        x = x + pos[:length].astype(self.dtype)
        x = constrain(x, "batch", "length", "act_embed")
        x = Transformer(c.layers, c.heads, c.mlp_ratio, self.quick_gelu, causal=True, dtype=self.dtype,
                        remat=self.remat, scan=self.scan, stds=openai_block_stds(c.width, c.layers),
                        name="transformer")(x)  # [B, L, D]
        x = LayerNorm(name="ln_final")(x)
        x = constrain(x[jnp.arange(b), eot_positions(tokens, c.eot_token_id)], "batch", "act_embed")  # [B, D]
        x = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                     kernel_init=logical(nn.initializers.normal(c.width ** -0.5), "embed", "joint"),
                     name="text_projection")(x)  # [B, E]
        return constrain(x, "batch", None)
