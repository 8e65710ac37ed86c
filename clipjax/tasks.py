"""The trainer's tasks (`config.task`): what differs between contrastive pretraining and classifier fine-tuning,
in one object each, so that the trainer (`clipjax.train`) and the step it builds (`clipjax.build`) read the task's
answers instead of branching on its name:

    fields, labels      the batch's fields and ranks; whether the training data is read with labels
    check(config)       names checked before anything is built (the loss)
    step_options        the loss of `clipjax.step.train_step` (the contrastive loss, or the head's cross-entropy)
    frozen(params, …)   parameter prefixes the task keeps as loaded, besides `config.frozen`
    from_config         the task of a run (classify: class names, prompts and eval batches) and `num_classes`
    start_variables     the weights a fresh run starts from (classify: plus the zero-shot head)
    evaluate            the task's own eval scores (`evaluates`, `evaluates_at_start`)
    write_outputs       the files of a finished run (`writes_outputs`)
    shown               the metrics of the progress line

`task_class(config)` is the class of `config.task`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from clipjax import paths
from clipjax.classifier import Head, eval_batches, head_metrics, reads_training_records, save_finetuned, zeroshot_head
from clipjax.config_checks import TASKS, _from_config
from clipjax.interop.load import Pretrained
from clipjax.losses import get_loss
from clipjax.step import (
    CLASSIFY_FIELDS,
    CONTRASTIVE_FIELDS,
    HEAD,
    classify_grads,
    clip_variables,
    contrastive_grads,
)

log = logging.getLogger(__name__)


class ContrastiveTask:
    """CLIP / SigLIP / LiT pretraining: the towers' embeddings under the global-batch contrastive loss
    (`config.loss`). No eval of its own (`config.evals` run for every task) and no files beyond the workdir's."""

    name: ClassVar[str] = "contrastive"
    fields: ClassVar[dict[str, int]] = CONTRASTIVE_FIELDS
    shown: ClassVar[tuple[str, ...]] = ("loss", "temperature")
    labels: ClassVar[bool] = False  # the training data's batches: images and captions
    evaluates_at_start: ClassVar[bool] = False
    writes_outputs: ClassVar[bool] = False
    num_classes: ClassVar[int] = 0
    evaluates: ClassVar[bool] = False

    @staticmethod
    def check(config: ml_collections.ConfigDict) -> None:
        _from_config("config.loss", get_loss, config.loss)  # bad names fail before anything compiles

    @staticmethod
    def step_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
        """`clipjax.step.train_step`'s gradient: the configured contrastive loss over the global batch."""
        return dict(grads=contrastive_grads(get_loss(config.loss)))

    @staticmethod
    def frozen(params: Any, frozen: tuple[str, ...]) -> tuple[str, ...]:
        return ()

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, cfg: Any) -> ContrastiveTask:
        return cls()

    def start_variables(self, variables: Any, pretrained: Pretrained | None, cfg: Any) -> Any:
        return variables

    def evaluate(self, cfg: Any, state: Any) -> dict[str, float]:
        return {}

    def write_outputs(self, workdir: paths.Path, cfg: Any, state: Any, config: ml_collections.ConfigDict) -> None:
        pass


@dataclasses.dataclass
class ClassifyTask:
    """Fine-tuning the image tower under a linear head on unit-norm features (`clipjax.classifier.Head`), started as
    the zero-shot classifier of the dataset's class names: the class names and prompts that build the head, the eval
    batches, and the files written at the end (see `clipjax.finetune`)."""

    name: ClassVar[str] = "classify"
    fields: ClassVar[dict[str, int]] = CLASSIFY_FIELDS
    shown: ClassVar[tuple[str, ...]] = ("loss", "accuracy")
    labels: ClassVar[bool] = True  # the training data's batches: images and labels, no captions
    evaluates_at_start: ClassVar[bool] = True  # the zero-shot head's scores are the row of step 0
    writes_outputs: ClassVar[bool] = True
    classnames: list[str]
    templates: list[str]
    tokenizer: str | None
    init_from: str
    batches: Any  # eval batches, or None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, cfg: Any) -> ClassifyTask:
        from clipjax.data import sources
        from clipjax.evaluate.templates import get_templates
        from clipjax.evaluate.zeroshot import default_templates

        d = config.data
        if not config.init_from:
            raise ValueError("config.init_from is required when classifying: the weights to fine-tune (anything "
                             "clipjax.load accepts)")
        classnames = sources.get_classnames(d.train)
        templates = get_templates(d.templates or default_templates(d.train))
        batches = None
        if d.eval and reads_training_records(d.train, d.train_split, d.eval, d.eval_split):
            log.warning("config.data.eval=%r reads the training images (%s): eval/top1 and the other eval/ metrics "
                        "are training accuracy, not held-out accuracy; give held-out images with "
                        "--config.data.eval=SPEC (e.g. another ImageFolder)", d.eval,
                        "an ImageFolder has a single split" if sources.is_image_folder(d.train)
                        else f"the same split {d.eval_split!r}")
        if d.eval:
            batches = eval_batches(d.eval, d.eval_split, cfg.vision.image_size, d.eval_batch_size,
                                   d.max_eval_examples or None)
        return cls(list(classnames), list(templates), d.tokenizer or None, str(config.init_from), batches)

    @staticmethod
    def check(config: ml_collections.ConfigDict) -> None:
        """Nothing to check before the model is built (`from_config` reads the data)."""

    @staticmethod
    def step_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
        """`clipjax.step.train_step`'s gradient: the head's cross-entropy."""
        return dict(grads=classify_grads(float(config.label_smoothing)))

    @staticmethod
    def frozen(params: Any, frozen: tuple[str, ...]) -> tuple[str, ...]:
        """Everything of the CLIP but its image tower is kept as loaded (the text tower and temperature only built
        the head's starting point)."""
        return tuple(k for k in sorted(params) if k not in ("visual", HEAD) and k not in frozen)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def evaluates(self) -> bool:
        return self.batches is not None

    def start_variables(self, variables: dict, pretrained: Pretrained, cfg: Any) -> dict:
        """The weights a fresh run starts from: the loaded ones and the zero-shot head."""
        return self.with_zeroshot_head(variables, pretrained, cfg)

    def with_zeroshot_head(self, variables: dict, pretrained: Pretrained, cfg: Any) -> dict:
        """`variables` (the weights to start from) plus the zero-shot head of `pretrained` for the class names."""
        head = zeroshot_head(pretrained, self.classnames, self.templates, self.tokenizer)
        log.info("zero-shot head: %d classes × %d templates", len(self.classnames), len(self.templates))
        return {**variables, "params": {**variables["params"], "head": head.params()}}

    def evaluate(self, cfg: Any, state: Any) -> dict[str, float]:
        """The head's metrics on the eval split: {"eval/top1", "eval/top5", ...}."""
        head = jax.device_get(state.params["head"])
        m = head_metrics(cfg, clip_variables(state.params, state.batch_stats), head["kernel"], head["bias"],
                         self.batches)
        return {f"eval/{k}": float(v) for k, v in m.items()}

    def write_outputs(self, workdir: paths.Path, cfg: Any, state: Any, config: ml_collections.ConfigDict) -> None:
        """The fine-tuned model, head and classifier metadata in `workdir` (see `clipjax.finetune`)."""
        params = _host(state.params)
        variables = clip_variables(params, _host(state.batch_stats))
        if jax.process_index() != 0:
            return
        head = Head(np.asarray(params["head"]["kernel"]), np.asarray(params["head"]["bias"]))
        model = Pretrained(cfg, variables, str(workdir))
        classifier = {"classnames": self.classnames, "templates": self.templates, "tokenizer": self.tokenizer,
                      "init_from": self.init_from}
        save_finetuned(workdir, model, head, classifier, replace=True)
        log.info("fine-tuned model, head and classifier written to %s (clipjax.finetune.load_finetuned)", workdir)


def _host(tree: Any) -> Any:
    """A (possibly multi-process sharded) tree as host NumPy arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def task_class(config: ml_collections.ConfigDict) -> type[ContrastiveTask] | type[ClassifyTask]:
    """The task class of `config.task` (a checked config: the name is one of `clipjax.config_checks.TASKS`)."""
    return _CLASSES[config.task]


_CLASSES = {cls.name: cls for cls in (ContrastiveTask, ClassifyTask)}
assert tuple(_CLASSES) == TASKS
