"""Where metrics go: MODEL_DIR/metrics.jsonl (one JSON object per logged step), TensorBoard
event files (clu's metric writers), and a progress bar (tqdm) with loss, tokens/s and ETA.

Only process 0 writes; other processes get a writer that drops everything, so a multi-host
run has one metrics file and one event stream.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


def _jsonable(v: Any):
  v = np.asarray(v)
  if v.ndim == 0:
    f = float(v)
    return f if math.isfinite(f) else str(f)
  return [_jsonable(x) for x in v]


class MetricsWriter:
  def __init__(self, model_dir: str, total_steps: int, start_step: int = 0,
               tensorboard: bool = True, progress: bool = True):
    self.active = jax.process_index() == 0
    self.path = os.path.join(model_dir, 'metrics.jsonl')
    self._tb = None
    self._bar = None
    if not self.active:
      return
    os.makedirs(model_dir, exist_ok=True)
    if tensorboard:
      from clu import metric_writers  # imports TensorFlow's summary ops: only when training
      self._tb = metric_writers.create_default_writer(
          os.path.join(model_dir, 'tensorboard'), just_logging=False, asynchronous=True)
    if progress:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       mininterval=1.0, desc='train')

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = '') -> None:
    if not self.active:
      return
    record = {'step': int(step), **{prefix + k: _jsonable(v) for k, v in scalars.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      flat = {prefix + k: float(np.asarray(v)) for k, v in scalars.items()
              if np.asarray(v).ndim == 0}
      self._tb.write_scalars(step, flat)
      for k, v in scalars.items():
        if np.asarray(v).ndim == 1:  # e.g. expert usage: one histogram per layer
          self._tb.write_histograms(step, {prefix + k: np.asarray(v)})

  def progress(self, step: int, loss: float | None = None, tokens_per_second: float | None = None):
    if self._bar is None:
      return
    self._bar.n = step
    post = {}
    if loss is not None:
      post['loss'] = f'{loss:.3f}'
    if tokens_per_second is not None:
      post['tok/s'] = f'{tokens_per_second:,.0f}'
    self._bar.set_postfix(post, refresh=False)
    self._bar.refresh()

  def close(self) -> None:
    """Ends the bar's line (so an error printed next starts on its own) and flushes the event
    files. Idempotent: the trainer closes on every way out."""
    bar, tb, self._bar, self._tb = self._bar, self._tb, None, None
    if bar is not None:
      bar.close()
    if tb is not None:
      tb.flush()
      tb.close()


def read_metrics(model_dir: str) -> list[dict]:
  """All records of MODEL_DIR/metrics.jsonl (the analysis code's entry point)."""
  path = os.path.join(model_dir, 'metrics.jsonl')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_peak_flops(dtype='float32') -> float:
  """The MFU denominator of a whole run: the measured per-device peak times the devices that
  do separate work. On CPU every device of a process (`--xla_force_host_platform_device_count`
  fakes several) shares the same cores, and the measured matmul already uses them all: the
  factor there is the number of processes, not of devices (8 fake devices on 2 cores would
  otherwise read an MFU 8x too small)."""
  return measure_peak_flops(dtype) * working_devices()


def working_devices(mesh=None) -> int:
  """Devices that do separate work: the mesh's (all devices without one), except on CPU,
  where the fake devices of a process share its cores and the process is the unit (see
  `run_peak_flops`). Device-seconds are step time x this."""
  if jax.default_backend() == 'cpu':
    return jax.process_count()
  return mesh.size if mesh is not None else jax.device_count()


def measure_peak_flops(dtype='float32', size: int = 1024, repeats: int = 5) -> float:
  """Peak matmul FLOP/s of this machine, measured now (the MFU denominator): the median of
  `repeats` square matmuls, after a warm-up compile."""
  import jax.numpy as jnp
  a = jnp.ones((size, size), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * size ** 3 / float(np.median(times))
