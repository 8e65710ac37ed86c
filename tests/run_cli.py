"""Runs a clipjax command-line module with the tests' tokenizers registered (the "folded" tokenizer of the tiny
test models): `python tests/run_cli.py clipjax.main --config=...` is `python -m clipjax.main --config=...`."""

import runpy
import sys

import folded_tokenizer  # noqa: F401  (registers "folded")

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
