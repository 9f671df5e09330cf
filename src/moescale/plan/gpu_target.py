"""What XLA:GPU needs to know of a GPU to compile for it without one: a GpuTargetConfigProto.

XLA:GPU compiles for the device it finds, or, with no device, for a target description passed
to the CUDA plugin's topology (`target_config`, text format of stream_executor's
GpuTargetConfigProto): the compute capability picks the instructions and kernels, the SM count,
shared memory and registers size the launch grids and fusions, the memory size bounds the
scheduler. `moescale plan --platform h100` builds that description here from the published
figures of each GPU, so no GPU (and no file from elsewhere) is needed.

Figures (SXM parts; CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability", for the per-SM and per-block limits of compute capability 8.0 and 9.0):

  gpu    cc   SMs  FP32/SM  shared/SM   shared/block  L2      memory BW    boost   source
  a100   8.0  108  64       164 KiB     163 KiB       40 MiB  2,039 GB/s   1.41 GHz [A100]
  h100   9.0  132  128      228 KiB     227 KiB       50 MiB  3,350 GB/s   1.98 GHz [H100]
  h200   9.0  132  128      228 KiB     227 KiB       50 MiB  4,800 GB/s   1.98 GHz [H200]

  both: 2,048 threads and 65,536 registers an SM, 1,024 threads and 65,536 registers a block,
  48 KiB of shared memory a block without opting in, warps of 32.

  [A100] NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), table 3; A100 datasheet
         (80GB SXM: 2,039 GB/s).
  [H100] NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), table 3; H100 datasheet
         (SXM: 3.35 TB/s).
  [H200] NVIDIA H200 datasheet: the H100's GH100 die with 141 GB of HBM3e at 4.8 TB/s.

The device memory given to the compiler is the platform's (`--device_memory_gib` included), so
the compiler's scheduler and the plan's fits / does not fit use one figure.
"""

from __future__ import annotations

import dataclasses

from moescale.plan.platforms import Platform

KIB, MIB = 2 ** 10, 2 ** 20


@dataclasses.dataclass(frozen=True)
class GpuFacts:
  name: str                   # what XLA calls the device ('NVIDIA H100 80GB HBM3')
  compute_capability: tuple[int, int]
  sms: int
  fp32_per_sm: int
  shared_per_sm: int          # bytes
  shared_per_block_optin: int
  l2_bytes: int
  memory_bandwidth: float     # bytes / s
  clock_ghz: float


GPUS = {
    'a100': GpuFacts('NVIDIA A100-SXM4-80GB', (8, 0), 108, 64, 164 * KIB, 163 * KIB, 40 * MIB,
                     2039e9, 1.41),
    'h100': GpuFacts('NVIDIA H100 80GB HBM3', (9, 0), 132, 128, 228 * KIB, 227 * KIB, 50 * MIB,
                     3350e9, 1.98),
    'h200': GpuFacts('NVIDIA H200', (9, 0), 132, 128, 228 * KIB, 227 * KIB, 50 * MIB,
                     4800e9, 1.98),
}


def target_config(platform: Platform) -> str:
  """The GpuTargetConfigProto (text format) of `platform`, for the CUDA plugin's topology."""
  if platform.name not in GPUS:
    raise ValueError(f'no GPU description for {platform.name!r}; known: {list(GPUS)}')
  gpu = GPUS[platform.name]
  major, minor = gpu.compute_capability
  fields = {
      'threads_per_block_limit': 1024, 'threads_per_warp': 32,
      'shared_memory_per_block': 48 * KIB, 'shared_memory_per_core': gpu.shared_per_sm,
      'threads_per_core_limit': 2048, 'core_count': gpu.sms, 'fpus_per_core': gpu.fp32_per_sm,
      'block_dim_limit_x': 2 ** 31 - 1, 'block_dim_limit_y': 65535,
      'block_dim_limit_z': 65535, 'memory_bandwidth': int(gpu.memory_bandwidth),
      'l2_cache_size': gpu.l2_bytes, 'clock_rate_ghz': gpu.clock_ghz,
      'device_memory_size': int(platform.memory_bytes),
      'shared_memory_per_block_optin': gpu.shared_per_block_optin,
      'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
  }
  body = '\n'.join(f'  {k}: {v}' for k, v in fields.items())
  return (f'gpu_device_info {{\n{body}\n'
          f'  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n'
          f'platform_name: "CUDA"\n'
          f'dnn_version_info {{ major: 9 minor: 8 }}\n'
          f'device_description_str: "{gpu.name}"\n')
