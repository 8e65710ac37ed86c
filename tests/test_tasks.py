"""The trainer's tasks (clipjax/tasks.py): what contrastive pretraining and classifier fine-tuning answer the trainer,
and the training data a classifier refuses."""

import pytest

from clipjax.build import frozen_prefixes, make_train_mesh
from clipjax.config_checks import TASKS, ConfigError, check_config
from clipjax.configs.common import base_config
from clipjax.models.specs import get_model_config
from clipjax.step import batch_fields
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
    assert ContrastiveTask.fields == batch_fields("contrastive") and ClassifyTask.fields == batch_fields("classify")
    assert not ContrastiveTask.labels and ClassifyTask.labels


def test_classifying_trains_the_image_tower_and_the_head_only():
    assert frozen_prefixes(_config("contrastive"), PARAMS) == ("token_embedding",)
    assert frozen_prefixes(_config("classify"), PARAMS) == ("token_embedding", "logit_scale", "text")
    assert ContrastiveTask.step_options(_config("contrastive"))["loss_fn"] is not None
    assert ClassifyTask.step_options(_config("classify")) == {"loss_fn": None, "task": "classify"}


@pytest.mark.parametrize("data, message", [
    ({"train": "synthetic"}, "config.data.train='synthetic' has no labels: classifying needs a labelled dataset"),
    ({"train": "scenes", "mix": (("scenes", 1.0), ("dir:/nowhere", 1.0))},
     r"config.data.mix: classifying reads one labelled dataset \(config.data.train\)"),
])
def test_a_classifier_refuses_data_without_labels(data, message):
    config = _config("classify", **data)
    with pytest.raises(ConfigError, match=message):
        make_data(config, get_model_config("ViT-T-demo"), 0, make_train_mesh(config))
