"""Test set-up: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f
) + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No Google endpoint is ever reached from the tests (tests/gcs_emulator.py serves gs://). gcsfs and google-auth read
# these once, when first imported, which in a test process may be before the emulator's environment is set: set them
# for the whole session, or a later gs:// test waits on the metadata server and the storage-layout API.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

import pathlib  # noqa: E402
import signal  # noqa: E402

# A test run started in the background of a script (`pytest &`) inherits SIGINT ignored, and so would every process
# the tests start: Python then never raises KeyboardInterrupt and the trainer keeps ignoring SIGINT (the shell's
# intent, which clipjax honours). The tests model a user at a terminal, where Ctrl-C reaches the process: restore it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


# A three-class ImageFolder of flat colour images, shared by the evaluation tests.
COLOURS = {"red_ball": (220, 30, 30), "green_leaf": (30, 190, 40), "blue_sky": (40, 60, 230)}


def colour_folder(root: pathlib.Path, colours: dict = COLOURS, per_class: int = 2) -> pathlib.Path:
    """ROOT/CLASS/i.png: noisy flat-colour 48×40 PNGs, the same every time."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, rgb in colours.items():
        (root / name).mkdir()
        for i in range(per_class):
            px = np.clip(np.array(rgb) + rng.integers(-40, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def fixtures_dir():
    return FIXTURES


import folded_tokenizer  # noqa: E402,F401  (registers the tests' "folded" tokenizer)
