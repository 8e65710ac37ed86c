"""Prompt templates and class names for zero-shot classification, kept as data.

`zero_shot_metadata.json` (next to this module) holds:

    imagenet   OpenAI's 80 ImageNet templates and their curated 1000 ImageNet class names
    simple     the 7-template subset open_clip calls SIMPLE_IMAGENET_TEMPLATES
    cifar10    CIFAR-10 class names and templates (18)
    cifar100   CIFAR-100 class names and templates (18)
    scenes     templates for the embedded ``scenes`` dataset, written for clipjax in the phrasings of its
               captions (its class names come from the dataset itself)

Sources (MIT License, Copyright (c) 2021 OpenAI; open_clip: MIT License, Copyright (c) 2012-2021 Gabriel
Ilharco, Mitchell Wortsman, Nicholas Carlini, Rohan Taori, Achal Dave, Vaishaal Shankar, John Miller, Hongseok
Namkoong, Hannaneh Hajishirzi, Ali Farhadi, Ludwig Schmidt): the ImageNet templates and class names and the simple
set are copied from ``open_clip/zero_shot_metadata.py`` of open_clip_torch 3.3.0 (identical to the lists in
openai/CLIP ``notebooks/Prompt_Engineering_for_ImageNet.ipynb``); the CIFAR lists from openai/CLIP
``data/prompts.md`` (commit d05afc4).

A template is a string with one ``{}`` that receives the class name. Besides the names above, `get_templates`
accepts ``"single"`` (``"a photo of a {}."``, the paper's baseline prompt), a file with one template per line, or a
literal template containing ``{}``; `get_classnames` accepts a dataset name above or a file with one name per line.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Sequence

_METADATA = pathlib.Path(__file__).with_name("zero_shot_metadata.json")
SINGLE_TEMPLATE = "a photo of a {}."


@functools.lru_cache(maxsize=1)
def metadata() -> dict[str, dict[str, list[str]]]:
    """The shipped template sets and class-name lists: {name: {"templates": [...], ["classnames": [...]]}}."""
    with open(_METADATA, encoding="utf-8") as f:
        return json.load(f)


def template_sets() -> list[str]:
    """Names accepted by `get_templates` besides files and literal templates."""
    return sorted([k for k, v in metadata().items() if "templates" in v] + ["single"])


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {os.fspath(path)} is empty")
    return lines


def check_templates(templates: Sequence[str], source: str = "templates") -> list[str]:
    """Every template must be a string with exactly one ``{}``."""
    out = list(templates)
    if not out:
        raise ValueError(f"{source}: no templates")
    for i, t in enumerate(out):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ValueError(f"{source}: template {i} {t!r} must contain exactly one '{{}}'")
    return out


def get_templates(spec: str | Sequence[str]) -> list[str]:
    """Templates from a set name (`template_sets()`), a file (one per line, ``#`` comments), a literal template
    containing ``{}``, or a list of templates."""
    if not isinstance(spec, str):
        return check_templates(spec)
    if spec == "single":
        return [SINGLE_TEMPLATE]
    entry = metadata().get(spec)
    if entry is not None and "templates" in entry:
        return list(entry["templates"])
    if os.path.isfile(spec):
        return check_templates(_read_lines(spec, "templates"), spec)
    if "{}" in spec:
        return check_templates([spec])
    raise ValueError(f"unknown templates {spec!r}: not a file, not a template with '{{}}', nor one of "
                     f"{template_sets()}")


def get_classnames(spec: str | Sequence[str]) -> list[str]:
    """Class names from a dataset name with a shipped list (imagenet, cifar10, cifar100) or a file, one per line."""
    if not isinstance(spec, str):
        return list(spec)
    entry = metadata().get(spec)
    if entry is not None and "classnames" in entry:
        return list(entry["classnames"])
    if os.path.isfile(spec):
        return _read_lines(spec, "class names")
    known = sorted(k for k, v in metadata().items() if "classnames" in v)
    raise ValueError(f"unknown class names {spec!r}: not a file nor one of {known}")


def fill(templates: Sequence[str], classnames: Sequence[str]) -> list[str]:
    """All prompts, class-major: prompt ``c * T + t`` is template ``t`` filled with class ``c``."""
    return [t.format(c) for c in classnames for t in templates]
