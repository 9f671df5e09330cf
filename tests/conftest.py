"""Test setup: 8 fake CPU devices (before jax is imported), fp32 matmuls, no TF noise."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
if '--xla_force_host_platform_device_count' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
# Tests check numbers, not speed: XLA's cheapest backend optimisation halves compile time here.
if '--xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402

# Exact fp32 matmuls so reference comparisons can use tight tolerances.
jax.config.update('jax_default_matmul_precision', 'highest')
