"""The devices a plan targets: memory, peak compute and link bandwidth per device, and which
XLA compiler builds their programs.

Figures per chip from the vendors' public specifications (each overridable on the command
line: `moescale plan --device_memory_gib / --peak_tflops / --link_gbytes`):

  platform  compiler  memory     peak bf16     link (per device, one direction)  source
  tpu_v4    tpu       32 GiB     275 TFLOP/s   ICI 150 GB/s                       [v4]
  tpu_v5e   tpu       16 GB      197 TFLOP/s   ICI 200 GB/s (400 bidirectional)   [v5e]
  tpu_v5p   tpu       95 GiB     459 TFLOP/s   ICI 600 GB/s (1200 bidirectional)  [v5p]
  tpu_v6e   tpu       32 GB      918 TFLOP/s   ICI 400 GB/s (800 bidirectional)   [v6e]
  a100      cuda      80 GB      312 TFLOP/s   NVLink 300 GB/s (600 bidirectional) [A100]
  h100      cuda      80 GB      989 TFLOP/s   NVLink 450 GB/s (900 bidirectional) [H100]
  h200      cuda      141 GB     989 TFLOP/s   NVLink 450 GB/s (900 bidirectional) [H200]
  cpu       cpu       (--device_memory_gib)  (--peak_tflops)  (--link_gbytes)     this host

  [v4]  cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2; ICI: Jouppi et al. 2023
        (TPU v4, ISCA), 6 links per chip; 150 GB/s one way is the figure used here.
  [v5e] cloud.google.com/tpu/docs/v5e: 197 TFLOPs, 16 GB HBM2, ICI 400 GBps bidirectional.
  [v5p] cloud.google.com/tpu/docs/v5p: 459 TFLOPs, 95 GiB HBM2e, ICI 1200 GBps bidirectional.
  [v6e] cloud.google.com/tpu/docs/v6e: 918 TFLOPs, 32 GB HBM, ICI 800 GBps bidirectional.
  [A100] NVIDIA A100 datasheet (SXM 80GB): 312 TFLOPS bf16 dense, NVLink 600 GB/s.
  [H100] NVIDIA H100 datasheet (SXM): 989 TFLOPS bf16 dense, 80 GB HBM3, NVLink 900 GB/s.
  [H200] NVIDIA H200 datasheet (SXM): 989 TFLOPS bf16 dense, 141 GB HBM3e, NVLink 900 GB/s.

Link bandwidth is what one device can send while a collective runs; GPU figures hold inside
one NVLink domain (8 GPUs a node): across nodes, InfiniBand is about 50 GB/s a GPU (400 Gb/s
NICs), and a plan over more than one node should pass --link_gbytes 50.

TPU topologies (`topology`): v4 and v5p are 3-D tori of 4-chip hosts ('v5p:4x4x4' = 64 chips),
v5e and v6e 2-D tori of at most 256 chips ('v5e:16x16').
"""

from __future__ import annotations

import dataclasses
import math

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Platform:
  name: str
  compiler: str            # 'tpu' (libtpu), 'cuda' (XLA:GPU), 'cpu' (this host's XLA:CPU)
  memory_bytes: float | None
  peak_flops: float | None     # per device per second, bf16 dense
  link_bytes: float | None     # per device per second, one direction
  generation: str | None = None  # the TPU topology prefix ('v5p')
  dims: int = 3                # TPU torus dimensions

  def with_overrides(self, memory_gib=None, peak_tflops=None, link_gbytes=None) -> Platform:
    """This platform with the given figures replaced (GiB, TFLOP/s, GB/s)."""
    return dataclasses.replace(
        self, memory_bytes=self.memory_bytes if memory_gib is None else memory_gib * GIB,
        peak_flops=self.peak_flops if peak_tflops is None else peak_tflops * 1e12,
        link_bytes=self.link_bytes if link_gbytes is None else link_gbytes * 1e9)

  def topology(self, devices: int) -> str:
    """The TPU topology name of `devices` chips ('v5p:8x8x8' for 512); a ValueError naming the
    valid counts otherwise."""
    if self.compiler != 'tpu':
      raise ValueError(f'{self.name} has no TPU topology')
    shape = _torus(devices, self.dims)
    if shape is None:
      valid = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
               if _torus(n, self.dims)]
      raise ValueError(f'{devices} {self.name} chips make no {self.dims}-D TPU topology; valid '
                       f'counts include {valid}')
    return f"{self.generation}:{'x'.join(map(str, shape))}"


def _torus(n: int, dims: int) -> tuple[int, ...] | None:
  """The most cubic shape of n chips in `dims` dimensions, sides powers of 2 in ascending order
  with any 1 last: the slice shapes the TPU docs list (2x2x1, 2x2x2, 2x4x4, 4x4x4, 4x4x8, ...;
  1x1, 2x2, 2x4, 4x4, ..., 16x16)."""
  if n < 1 or n & (n - 1):
    return None
  k = int(math.log2(n))
  sides = sorted(2 ** (k // dims + (i < k % dims)) for i in range(dims))
  return tuple([s for s in sides if s > 1] + [s for s in sides if s == 1])


PLATFORMS = {p.name: p for p in (
    Platform('tpu_v4', 'tpu', 32 * GIB, 275e12, 150e9, 'v4', 3),
    Platform('tpu_v5e', 'tpu', 16e9, 197e12, 200e9, 'v5e', 2),
    Platform('tpu_v5p', 'tpu', 95 * GIB, 459e12, 600e9, 'v5p', 3),
    Platform('tpu_v6e', 'tpu', 32e9, 918e12, 400e9, 'v6e', 2),
    Platform('a100', 'cuda', 80e9, 312e12, 300e9),
    Platform('h100', 'cuda', 80e9, 989e12, 450e9),
    Platform('h200', 'cuda', 141e9, 989e12, 450e9),
    Platform('cpu', 'cpu', None, None, None),
)}


def platform(name: str) -> Platform:
  """The platform by name; a ValueError naming the valid ones otherwise."""
  if name not in PLATFORMS:
    raise ValueError(f'--platform={name!r} is not a known platform; valid: {list(PLATFORMS)}')
  return PLATFORMS[name]
