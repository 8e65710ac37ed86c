"""The trainer's tasks (clipjax/tasks.py): what contrastive pretraining and classifier fine-tuning answer the trainer,
and the training data a classifier refuses."""

import pytest

from clipjax.build import frozen_prefixes, make_train_mesh
from clipjax.config_checks import TASKS, ConfigError, check_config
from clipjax.configs.common import base_config
from clipjax.models.specs import get_model_config
from clipjax.step import CLASSIFY_FIELDS, CONTRASTIVE_FIELDS
from clipjax.tasks import ClassifyTask, ContrastiveTask, task_class
from clipjax.train import make_data

PARAMS = {"visual": {}, "text": {}, "logit_scale": 0.0, "head": {}}


def _config(task: str, **data):
    c = base_config()
    c.task, c.batch_size, c.frozen = task, 8, ("token_embedding",)
    c = check_config(c)
    for k, v in data.items():
        c.data[k] = v
    return c


def test_each_task_name_has_its_task():
    assert [task_class(_config(name)) for name in TASKS] == [ContrastiveTask, ClassifyTask]
    assert ContrastiveTask.fields == CONTRASTIVE_FIELDS and ClassifyTask.fields == CLASSIFY_FIELDS
    assert not ContrastiveTask.labels and ClassifyTask.labels


def test_classifying_trains_the_image_tower_and_the_head_only():
    assert frozen_prefixes(_config("contrastive"), PARAMS) == ("token_embedding",)
    assert frozen_prefixes(_config("classify"), PARAMS) == ("token_embedding", "logit_scale", "text")
    # each task gives the step its own gradient, and no other option
    assert list(ContrastiveTask.step_options(_config("contrastive"))) == ["grads"]
    assert list(ClassifyTask.step_options(_config("classify"))) == ["grads"]
    assert ContrastiveTask.step_options(_config("contrastive"))["grads"].__qualname__.startswith("contrastive_grads")
    assert ClassifyTask.step_options(_config("classify"))["grads"].__qualname__.startswith("classify_grads")


@pytest.mark.parametrize("data, message", [
    ({"train": "synthetic"}, "config.data.train='synthetic' has no labels: classifying needs a labelled dataset"),
    ({"train": "scenes", "mix": (("scenes", 1.0), ("dir:/nowhere", 1.0))},
     r"config.data.mix: classifying reads one labelled dataset \(config.data.train\)"),
])
def test_a_classifier_refuses_data_without_labels(data, message):
    config = _config("classify", **data)
    with pytest.raises(ConfigError, match=message):
        make_data(config, get_model_config("ViT-T-demo"), 0, make_train_mesh(config))
