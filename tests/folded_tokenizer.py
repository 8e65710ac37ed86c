"""The "folded" tokenizer of the tests: CLIP BPE ids folded into the tiny vocabulary of the test models, registered
with `clipjax.data.tokenizer.register_tokenizer` when this module is imported (tests/conftest.py imports it; CLI runs
in a subprocess go through tests/run_cli.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipjax.data.tokenizer import ClipTokenizer, default_tokenizer, register_tokenizer


class FoldedTokenizer:
    """CLIP BPE ids folded into a smaller vocabulary (for tiny test models whose vocabulary is not CLIP's).

    Start/end of text become ``vocab - 2`` / ``vocab - 1`` (the end token stays the row maximum, so argmax pooling
    still finds it); every other id ``i`` becomes ``1 + (i - 1) mod (vocab - 3)``. Meaningless as language, but
    deterministic: it lets any model be evaluated end to end without its own tokenizer.
    """

    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 4:
            raise ValueError(f"FoldedTokenizer needs a vocabulary of at least 4 ids, got {vocab_size}")
        self.base: ClipTokenizer = default_tokenizer()
        self.vocab_size, self.context_length = vocab_size, context_length

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> np.ndarray:
        ids = self.base(list(texts), context_length or self.context_length).astype(np.int64)  # [N, L]
        v = self.vocab_size
        out = np.where(ids > 0, 1 + (ids - 1) % (v - 3), 0)
        out = np.where(ids == self.base.sot_token_id, v - 2, out)
        out = np.where(ids == self.base.eot_token_id, v - 1, out)
        return out.astype(np.int32)  # [N, L]


register_tokenizer("folded", FoldedTokenizer)
