"""The evaluators' image encoder takes uint8 pixels and normalises them on the device exactly as the host does."""

import jax
import jax.numpy as jnp
import numpy as np

from clipjax.data.preprocess import normalize
from clipjax.evaluate.features import Encoder
from clipjax.models import CLIP, CLIPConfig, TextConfig, VisionConfig

TINY = CLIPConfig(embed_dim=16, vision=VisionConfig(image_size=16, layers=1, width=32, patch_size=8, head_width=16),
                  text=TextConfig(context_length=8, vocab_size=64, width=32, heads=2, layers=1))


def test_uint8_images_give_the_features_of_host_normalised_images():
    variables = CLIP(TINY).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    enc = Encoder(TINY)
    on_device = enc.images(variables, pixels)
    on_host = enc.images(variables, normalize(pixels))
    np.testing.assert_allclose(on_device, on_host, atol=1e-6)
    assert not np.allclose(on_device, enc.images(variables, pixels.astype(np.float32)))  # floats are not pixels
