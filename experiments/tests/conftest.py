"""The benchmark harness's own tests (`python -m pytest experiments/tests`; not part of the product suite, whose
testpaths are tests/). The benchmark scripts import each other as top-level modules, as they do when run."""
import pathlib
import sys

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1]
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
