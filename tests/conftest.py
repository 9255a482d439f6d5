"""Test setup: 8 fake CPU devices for the sharding tests (must happen before any JAX backend starts)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
