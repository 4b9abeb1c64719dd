"""Test-session setup: 8 simulated CPU devices, so data parallelism is exercised for real."""

import os
import tempfile

# Must happen before JAX is imported anywhere. The cheaper CPU code generation
# roughly halves XLA compile times; tests run few steps, so they come out ahead.
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=8 '
  '--xla_backend_optimization_level=0 '
  '--xla_llvm_disable_expensive_passes=true',
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# XLA's CPU compiler takes tens of seconds per NFNet train step; tests (and the
# CLI subprocesses they start, which inherit this) share compiled programs.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'nfnet_jax_test_xla_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')
# The fused CPU optimizer step's library (nfnet_jax/fused_sgd.py) is built once per run
# into a temporary cache shared by the workers and subprocesses, not the user's.
os.environ.setdefault(
  'NFNET_JAX_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'nfnet_jax_test_native_cache')
)
