"""clipjax: CLIP in JAX/Flax."""
