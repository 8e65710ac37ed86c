"""notebooks/finetune.ipynb runs end to end (on CPU, with the tiny Hugging Face fixture model and a small build of
the scenes dataset): zero-shot, fine-tuning, WiSE-FT, export. Needs nbclient, nbformat and ipykernel (dev extra)."""

import json
import pathlib

import numpy as np
import pytest

import clipjax
from clipjax import finetune
from clipjax.data import scenes

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "finetune.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in code) == 1


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    import nbclient  # dev extra
    import nbformat

    data = scenes.build_scenes(tmp_path / "scenes", num_train=64, num_test=32, num_heldout=32, image_size=32,
                               workers=0, progress=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = {
        "MODEL": str(ROOT / "tests" / "fixtures" / "hf_clip"),
        "DATA": f"dir:{data}",
        "TEMPLATES": ["a photo of a {}.", "a {} on a plain background."],
        "TOKENIZER": "folded",  # the fixture's vocabulary is not CLIP's
        "STEPS": 4, "BATCH_SIZE": 16, "LR": 1e-3, "EVAL_EXAMPLES": 32, "ALPHAS": [0.0, 0.5, 1.0],
        "WORKDIR": str(tmp_path / "work"),
    }
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    # the tests' "folded" tokenizer, registered in the notebook's kernel
    source += f"\nimport sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nimport folded_tokenizer"
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "zero-shot top-1 on heldout" in text and "test top-1 of the head" in text
    work = tmp_path / "work"
    model, head, meta = finetune.load_finetuned(work / "wise_ft_0.5")
    assert head.kernel.shape == (32, len(scenes.CLASSNAMES)) and meta["wise_ft"]["alpha"] == 0.5
    # the exported Hugging Face directory holds exactly the WiSE-FT weights
    exported = clipjax.load(work / "hf")
    for a, b in zip(*(sorted(_leaves(m.variables).items()) for m in (exported, model))):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1], err_msg=a[0])
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 1


def _leaves(tree):
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
