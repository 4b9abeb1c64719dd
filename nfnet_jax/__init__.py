"""nfnet_jax: NFNets in JAX/Haiku."""
