"""The files besides the weights that make a Hugging Face CLIP directory complete (config, tokenizer, processor).

`transformers.CLIPModel.from_pretrained(DIR)` reads `config.json`; `CLIPProcessor.from_pretrained(DIR)` reads the
tokenizer files (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`) and
`preprocessor_config.json`. The tokenizer files are derived from clipjax's own BPE merges
(`clipjax/data/bpe_simple_vocab_16e6.txt.gz`) in the layout transformers' `CLIPTokenizer` expects: the same 49 408
ids, the two special tokens under transformers' names `<|startoftext|>` / `<|endoftext|>`. Up to and including the
end token the ids equal `clipjax.tokenize`; padding differs: transformers pads with `<|endoftext|>` (49407), clipjax
with 0. Both give the same embeddings: the text tower pools at the first end token and the causal mask hides what
follows it. (Padding with `!`, id 0, is not an option: transformers would then split every "!" out of the text.)

One difference remains in text cleaning: transformers' CLIPTokenizer normalises with NFC, whitespace collapsing and
lowercasing only, while clipjax (like OpenAI and open_clip) also applies ftfy's mojibake repair and unescapes HTML
entities; strings that those change (e.g. "&amp;") can get other ids in transformers.
"""

from __future__ import annotations

import json
from typing import Any

from clipjax.interop.hf import config_to_hf
from clipjax.models.config import CLIPConfig

CLIP_VOCAB_SIZE = 49408
HF_BOS, HF_EOS = "<|startoftext|>", "<|endoftext|>"
HF_PAD = HF_EOS  # as OpenAI's own transformers repos; "!" (id 0) would be split out of text as a special token
_HF_SPECIAL_NAMES = {"<start_of_text>": HF_BOS, "<end_of_text>": HF_EOS}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def hf_config(cfg: CLIPConfig) -> dict[str, Any]:
    """`config.json` of a transformers CLIPModel (ViT towers only; SigLIP's logit bias has no CLIPModel slot)."""
    if cfg.init_logit_bias is not None:
        raise ValueError("the model has a SigLIP logit_bias, which transformers' CLIPModel cannot hold; "
                         "export it in open_clip format")
    out = config_to_hf(cfg)
    out.pop("torch_dtype", None)  # transformers >= 4.56 reads "dtype"
    out["dtype"] = "float32"
    t = out["text_config"]
    if uses_clip_bpe(cfg):  # ids of the exported tokenizer
        t.update(bos_token_id=CLIP_VOCAB_SIZE - 2, pad_token_id=CLIP_VOCAB_SIZE - 1)
    else:  # another vocabulary: its special ids are unknown (pooling is set by eos_token_id alone)
        t.update(bos_token_id=None, pad_token_id=None)
    return out


def uses_clip_bpe(cfg: CLIPConfig) -> bool:
    """Whether the text tower's vocabulary is CLIP's BPE (the only tokenizer the HF directory can describe)."""
    return cfg.text.vocab_size == CLIP_VOCAB_SIZE and cfg.text.eot_token_id in (None, CLIP_VOCAB_SIZE - 1)


def tokenizer_files(context_length: int) -> dict[str, str]:
    """File name → text of the transformers CLIPTokenizer files for clipjax's BPE."""
    from clipjax.data.tokenizer import ClipTokenizer

    tok = ClipTokenizer()
    vocab = {_HF_SPECIAL_NAMES.get(token, token): i for token, i in tok.encoder.items()}  # 49 408 entries
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
               "special": True}
    config = {
        "tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
        "model_max_length": context_length, "bos_token": HF_BOS, "eos_token": HF_EOS, "unk_token": HF_EOS,
        "pad_token": HF_PAD, "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(vocab[name]): {**special, "content": name} for name in (HF_BOS, HF_EOS)},
    }
    specials_map = {"bos_token": HF_BOS, "eos_token": HF_EOS, "unk_token": HF_EOS, "pad_token": HF_PAD}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(specials_map, indent=2),
    }


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """`preprocessor_config.json`: clipjax's eval transform (bicubic shortest side, center crop, OpenAI mean/std)."""
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size}, "resample": _BICUBIC,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
    }
