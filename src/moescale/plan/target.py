"""Simulated devices of a platform, for the compiler of that platform: a TPU slice's
compile-only devices from libtpu (`jax.experimental.topologies`, no TPU needed), XLA:GPU's
from the CUDA plugin given a description of the GPU (moescale.plan.gpu_target, no GPU
needed), or this host's CPU devices (`--xla_force_host_platform_device_count`).
"""

from __future__ import annotations

import os

from moescale.plan.platforms import Platform

# libtpu asks the machine's metadata server which TPU it is on, and says on stderr that it
# could not tell; a compile-only topology needs none of it. Set before libtpu loads.
_LIBTPU_ENV = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_WORKER_HOSTNAMES': 'localhost',
               'TPU_WORKER_ID': '0'}


class Unavailable(RuntimeError):
  """This machine cannot provide the platform's compiler or devices; says what would."""


def cpu_flag(devices: int) -> str:
  return f'--xla_force_host_platform_device_count={devices}'


def devices(platform: Platform, count: int) -> list:
  """`count` devices of `platform` to compile for; `Unavailable` saying what to install or set
  when this machine cannot provide them."""
  import jax
  if platform.compiler == 'cpu':
    have = jax.devices('cpu')
    if len(have) < count:
      raise Unavailable(
          f'a cpu plan of {count} devices needs {count} CPU devices, and JAX started with '
          f'{len(have)}: set XLA_FLAGS={cpu_flag(count)} before JAX starts (the `moescale '
          'plan` command does so itself when it starts JAX)')
    return list(have[:count])
  from jax.experimental import topologies
  if platform.compiler == 'tpu':
    for key, value in _LIBTPU_ENV.items():
      os.environ.setdefault(key, value)
    # Accelerator types count TensorCores: 2 a chip on v4 / v5p ('v5p-8' is 4 chips).
    kind = {'v4': f'v4-{2 * count}', 'v5p': f'v5p-{2 * count}', 'v5e': f'v5litepod-{count}'}
    os.environ.setdefault('TPU_ACCELERATOR_TYPE',
                          kind.get(platform.generation, f'{platform.generation}-{count}'))
    name = platform.topology(count)
    try:
      return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
    except RuntimeError as e:
      if 'not installed' in str(e):
        raise Unavailable(
            f'a {platform.name} plan compiles with the TPU compiler, libtpu, which is not '
            "installed here: pip install 'moescale[plan]' (libtpu; no TPU is needed)") from None
      if 'lockfile' in str(e):
        # libtpu serves one process a machine; its advice to delete the lock is for a crashed
        # holder, and would let two processes share it.
        raise Unavailable(
            'libtpu is in use by another process on this machine (its lock /tmp/'
            'libtpu_lockfile is held): TPU plans run one at a time; wait for the other to '
            'finish') from None
      raise Unavailable(f'libtpu could not make the TPU topology {name!r}: {e}') from None
  return _gpu_devices(platform, count, topologies)


def topology_name(platform: Platform, count: int) -> str | None:
  """The slice a plan compiles for: a TPU topology ('v5p:8x8x8'), GPU nodes of 8
  ('1x64x8': one partition of 64 nodes of 8 GPUs), or None for this host's CPU."""
  if platform.compiler == 'tpu':
    return platform.topology(count)
  if platform.compiler == 'cuda':
    if count > 8 and count % 8:
      raise ValueError(f'{count} {platform.name} GPUs do not fill nodes of 8; plan 1, 2, 4, 8 '
                       'or a multiple of 8')
    per_node = min(count, 8)
    return f'1x{count // per_node}x{per_node}'
  return None


def _gpu_devices(platform: Platform, count: int, topologies) -> list:
  """`count` compile-only GPUs in nodes of 8, described to XLA:GPU by moescale.plan.gpu_target:
  the CUDA plugin compiles for them with no GPU present."""
  from moescale.plan import gpu_target
  name = topology_name(platform, count)
  try:
    topology = topologies.get_topology_desc(
        platform='cuda', topology_name=name, topology=name,
        target_config=gpu_target.target_config(platform))
  except (NotImplementedError, RuntimeError) as e:
    raise Unavailable(
        f'a {platform.name} plan compiles with XLA:GPU, which needs the CUDA plugin '
        f"(pip install 'moescale[plan-gpu]'; no GPU is needed): {str(e).splitlines()[0]}. "
        'Without it, plan for a TPU, or pass --platform cpu with this GPU\'s figures '
        "(--device_memory_gib, --peak_tflops, --link_gbytes) for XLA:CPU's program "
        'instead') from None
  return list(topology.devices)
