"""OpenAI's nine named architectures match open_clip's parameter and BatchNorm-statistic counts exactly.

The reference counts come from building each model with the real open_clip (tests/fixtures/param_counts.json,
written by tests/fixtures/make_param_counts.py); ours are counted from the variable shapes of
`clipjax.get_model_config(name)` without allocating anything. Needs no torch; a missing fixture fails.
"""
import json
import math
import pathlib

import pytest

import clipjax
from clipjax.interop.load import expected_shapes

COUNTS = pathlib.Path(__file__).parent / "fixtures" / "param_counts.json"
OPENAI_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def reference_counts() -> dict[str, dict[str, int]]:
    assert COUNTS.is_file(), f"missing fixture {COUNTS}; regenerate with tests/fixtures/make_param_counts.py"
    return json.loads(COUNTS.read_text())["models"]


def num_elements(shapes: dict | tuple) -> int:
    """Total elements of a nested dict whose leaves are shape tuples (() is a scalar: 1 element)."""
    if isinstance(shapes, tuple):
        return math.prod(shapes)
    return sum(num_elements(v) for v in shapes.values())


def test_reference_covers_the_nine_openai_models():
    assert sorted(reference_counts()) == sorted(OPENAI_MODELS)


@pytest.mark.parametrize("name", OPENAI_MODELS)
def test_counts_match_open_clip(name):
    ref = reference_counts()[name]
    shapes = expected_shapes(clipjax.get_model_config(name))
    params, stats = shapes["params"], shapes.get("batch_stats", {})
    ours = {
        "params": num_elements(params),
        "visual_params": num_elements(params["visual"]),
        "batchnorm_stat_elements": num_elements(stats),
    }
    theirs = {k: ref[k] for k in ours}
    assert ours == theirs, f"{name}: clipjax {ours} vs open_clip {theirs}"
    assert ("batch_stats" in shapes) == name.startswith("RN"), f"{name}: batch_stats only for ResNets"
