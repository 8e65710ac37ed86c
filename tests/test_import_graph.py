"""The layers of the trainer, read from the package's sources with ``ast`` (the graph of every import, at the top of
a module or inside a function: tests/test_data_layers.py): fine-tuning, the trainer and its parts import each other
in one direction only, no module of the package is over 600 lines, a config error is one class wherever it is
imported from, and the recipes' shared defaults import both as ``clipjax.configs.common`` and as ``common``."""

import importlib.util
import pathlib
import subprocess
import sys

from test_data_layers import MAX_LINES, PACKAGE, _circles, _graph

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the trainer and the modules it is made of, fine-tuning and the command line
TRAINER = ("clipjax.train", "clipjax.build", "clipjax.config_checks", "clipjax.tasks", "clipjax.classifier",
           "clipjax.workdir", "clipjax.interop.init_from", "clipjax.step", "clipjax.finetune", "clipjax.main")


def test_the_trainer_and_fine_tuning_are_in_no_import_circle():
    graph = _graph()
    assert set(TRAINER) <= set(graph)
    assert [sorted(c) for c in _circles(graph) if c & set(TRAINER) - {"clipjax.train", "clipjax.main"}] == []


def test_the_trainer_s_parts_do_not_import_the_trainer():
    graph = _graph()
    parts = ("clipjax.build", "clipjax.config_checks", "clipjax.tasks", "clipjax.classifier", "clipjax.workdir",
             "clipjax.interop.init_from", "clipjax.step")
    assert {p: sorted(w for w in graph[p] if w in ("clipjax.train", "clipjax.finetune", "clipjax.main"))
            for p in parts} == {p: [] for p in parts}


def test_no_module_of_clipjax_is_over_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_a_config_error_is_one_class():
    from clipjax import aot, build, config_checks, train, workdir
    from clipjax.interop import init_from

    assert train.ConfigError is config_checks.ConfigError is build.ConfigError is workdir.ConfigError
    assert init_from.ConfigError is config_checks.ConfigError and issubclass(aot.AotError, Exception)
    assert train.check_config is config_checks.check_config


def test_the_shared_defaults_import_as_a_package_module_and_beside_the_recipes():
    from clipjax.config_checks import check_config
    from clipjax.configs.common import base_config

    check_config(base_config())
    spec = importlib.util.spec_from_file_location("_recipe", ROOT / "configs" / "vit_b32.py")  # `from common import`
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    assert check_config(recipe.get_config()).model.name == "ViT-B-32"
    # a fresh interpreter: the recipes' own import of `common` (configs/ on sys.path) needs no clipjax module
    code = ("import sys; sys.path.insert(0, 'configs'); import common; common.base_config(); "
            "print(sorted(m for m in sys.modules if m.startswith('clipjax')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
