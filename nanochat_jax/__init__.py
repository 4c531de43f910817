# nanochat_jax: nanochat's pipeline in JAX.
