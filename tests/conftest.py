"""Test-session set-up: 8 fake CPU devices, so sharded code paths run on a laptop.

This must run before anything imports jax, which is why it lives in conftest.py.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hermetic tests: no persistent compilation cache unless a test turns it on (tests/test_common.py
# does, in child processes); stages started by tests inherit this too.
os.environ.setdefault("NANOCHAT_JAX_COMPILE_CACHE", "0")
