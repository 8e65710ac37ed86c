"""Fine-tuning a CLIP image tower as a classifier: the head, its zero-shot start, its evaluation and its files.

Training is a task of the one trainer (`clipjax.train`, `config.task = "classify"`), with its checkpoints, exact
resume, preemption handling and sharding:

    python -m clipjax.main --config=configs/finetune.py:init_from=PATH --workdir=DIR [--config.key=value ...]

(`python -m clipjax.finetune` is the same command.) Model: logits = normalize(image_tower(x)) @ kernel + bias
[B, K]. The head starts as the zero-shot classifier: kernel = exp(logit_scale) · W, where W [E, K] holds the class
names × prompt templates embedded by the text tower (normalised, averaged over templates, renormalised:
`clipjax.evaluate.zeroshot.build_classifier`), and bias = 0, so before the first step the classifier predicts exactly
what zero-shot CLIP predicts. The image tower and the head train (`config.frozen = ("visual",)` trains the head only);
the text tower and logit_scale are kept as loaded.

Data (`config.data.train` / `config.data.eval`): a labelled dataset spec of `clipjax.data.sources` ("scenes",
"dir:PATH" from `clipjax.data.ingest`, a prepared TFDS name, or an ImageFolder path: one subfolder per class).
Labels index the dataset's class names (all classes of the dataset, whatever the split). An ImageFolder has a single
split: as `config.data.eval` beside the same folder as `config.data.train` (configs/finetune.py's `data=FOLDER` sets
both) it evaluates the training images, and the run warns that `eval/top1` is then training accuracy; give held-out
images with `--config.data.eval=OTHER_FOLDER`.

The workdir receives, besides the trainer's config.json, metrics.jsonl and checkpoints/, when the run completes:
    model.safetensors        the CLIP, image tower fine-tuned, as an open_clip state dict (`clipjax.export`)
    open_clip_config.json    its open_clip model config: clipjax.load(DIR/model.safetensors, DIR/open_clip_config.json)
    head.safetensors         the classification head {"kernel" [E, K], "bias" [K]}
    classifier.json          {"classnames", "templates", "tokenizer", "init_from"}: what the head classifies
metrics.jsonl holds loss, accuracy, lr, and the head's accuracy on the eval split (`eval/top1`, ...) at step 0 (the
zero-shot classifier), every `eval_every` steps and at the end. `load_finetuned(DIR)` returns (model, head,
classifier metadata); open_clip and `python -m clipjax.export` read the weights as they are.
`python -m clipjax.wise_ft` interpolates such a directory with the zero-shot weights.

Letters: B batch, S image side, E embed dim, K classes.
"""

from __future__ import annotations

import os

import ml_collections

# The head, its evaluation and its files (clipjax/classifier.py) and the trainer's task (clipjax/tasks.py), importable
# from here as before
from clipjax.classifier import (CLASSIFIER_FILE, HEAD_FILE, OPEN_CLIP_CONFIG, WEIGHTS, Head,  # noqa: F401
                                check_new_dir, eval_batches, evaluate_head, head_metrics, load_finetuned, load_head,
                                reads_training_records, save_finetuned, save_head, zeroshot_head)
from clipjax.step import head_logits  # noqa: F401  (re-exported: the head's function lives with the update step)
from clipjax.tasks import ClassifyTask  # noqa: F401


# ============================================================================================ entry points

def default_config() -> ml_collections.ConfigDict:
    """configs/finetune.py's config (the WiSE-FT recipe), for use from Python."""
    from clipjax.configs import finetune as recipe

    return recipe.get_config()


def finetune(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Fine-tune `config.init_from` on `config.data.train` with the trainer (`config.task` is set to "classify");
    writes the workdir (see the module docstring) and returns the last metrics."""
    from clipjax.train import train

    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    config.task = "classify"
    return train(config, os.fspath(workdir))


if __name__ == "__main__":
    from clipjax.main import run

    run()
