"""Run directories -> records, one per (run, evaluation domain): what `moescale speedup` reads.

    records = collect_runs(['runs/dense_s', 'runs/dense_m', 'runs/moe_s'])
    write_records(records, 'runs.csv')                       # moescale.analysis.records

Per run it reads its config.gin, its evaluation and its metrics.jsonl, and builds nothing but
the abstract model (`jax.eval_shape`: no weights, no checkpoint, no data, no TensorFlow).

The columns (`records.COLUMNS`):
  run            the run directory relative to the common parent of the collected ones
  family         config.json's meta.family (a study's run), else from the FFN layers: 'dense'
                 when every one is a plain DenseFFN, else the other layers' classes joined by
                 '+', Top-K activation as 'DenseFFN[topk=K]'
  config, seed   the configuration the run is one seed of (config.json's meta.config, a
                 study's '<size>/<family>' with seeds; else the run itself) and its seed
                 (TrainConfig.seed): `moescale.analysis.seeds` groups by them
  train_task     the seqio task it trained on (empty for synthetic data): a domain of that
                 task is in-domain
  domain         the evaluation task; a bare split ('validation') is the run's own task's and
                 is named 'task:split', so runs trained on different tasks never share a curve
  step, source   the evaluated step N; 'eval' (RUN_DIR/eval/perplexity_step<N>.json, written
                 by `moescale eval`) or 'metrics' (the evaluation logged in metrics.jsonl).
                 N is the latest step either has; at that step the file's domains win and the
                 logged ones fill in the rest
  params, active_params            `moescale.accounting`: all parameters / those a token uses
  ffn_params, ffn_active_params    the same, FFN sublayers only (every family's category)
  ffn_param_bytes                  the FFN weights held, at their storage dtype
  ffn_active_bytes                 the FFN weights one token reads (active x bytes per param)
  forward_flops_per_token, ffn_flops_per_token   forward FLOPs, all / FFN sublayers only
  train_flops_per_token, convention               training FLOPs per token under convention
  tokens         training tokens to step N: N x batch_size x sequence length (every position
                 of a packed row, as the trainer's own train_flops counts them)
  train_flops    tokens x train_flops_per_token
  step_seconds   the median logged seconds per step up to N (each log window's mean): the
                 median leaves out the windows that held compilation or a periodic evaluation
  train_seconds  N x step_seconds: measured wall-clock of the training steps
  devices        --devices, else the mesh size the trainer logged, else the count the run's
                 mesh config pins, else 1 (with a warning)
  device_seconds train_seconds x devices
  loss, perplexity, bits_per_token, bits_per_byte, eval_tokens   the evaluation (loss in nats
                 per token); bits_per_byte empty where the source does not know bytes
  run_dir        the absolute path

Attention FLOPs count segment + Transformer-XL memory keys per query, as `moescale pairs` and
the study code do.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import statistics
from typing import Sequence

from moescale.analysis.records import COLUMNS

log = logging.getLogger(__name__)

EVAL_METRICS = {'eval_loss': 'loss', 'perplexity': 'perplexity',
                'bits_per_token': 'bits_per_token', 'bits_per_byte': 'bits_per_byte',
                'eval_tokens': 'eval_tokens'}
_EVAL_FILE = re.compile(r'perplexity_step(\d+)\.json$')


def collect_runs(run_dirs: Sequence[str], *, step: int | None = None,
                 convention: str = 'standard', devices: int | None = None) -> list[dict]:
  """Records of every run (see the module docstring), in the order given.

  step: the evaluated step of every run (None: each run's latest evaluation);
  convention: training FLOPs per token, one of moescale.accounting.CONVENTIONS;
  devices: the devices every run trained on (None: each run's config, else 1).
  """
  if not run_dirs:
    raise ValueError('no run directories given')
  dirs = [os.path.abspath(d) for d in run_dirs]
  if len(set(dirs)) != len(dirs):
    raise ValueError(f'a run directory is given twice: {list(run_dirs)}')
  names = run_names(dirs)
  out = []
  for d in dirs:
    out += collect_run(d, names[d], step=step, convention=convention, devices=devices)
  return out


def run_names(dirs: Sequence[str]) -> dict[str, str]:
  """{absolute dir: name}: each path relative to the common parent ('small/dense' for a
  study's root/small/dense), the base name for a single run."""
  parent = os.path.dirname(dirs[0]) if len(dirs) == 1 else os.path.commonpath(dirs)
  return {d: (os.path.relpath(d, parent) if d != parent else os.path.basename(d)) for d in dirs}


def collect_run(run_dir: str, name: str, *, step: int | None = None,
                convention: str = 'standard', devices: int | None = None) -> list[dict]:
  """The records of one run directory, one per evaluated domain."""
  metrics = read_metrics(run_dir)
  n, domains = evaluation(run_dir, metrics, step)
  counts = count_run(run_dir, convention)
  task, per_step, pinned, config = (counts.pop(k) for k in ('task', 'tokens_per_step', 'devices',
                                                            'config'))
  if devices is None:  # what the trainer logged, else what the config pins
    devices = next((r['devices'] for r in reversed(metrics) if r.get('devices')), pinned)
  if devices is None:
    log.warning('%s: its mesh config does not pin the device count: device_seconds counts 1 '
                'device (pass --devices N)', run_dir)
    devices = 1
  seconds = median_step_seconds(metrics, n)
  base = {'run': name, 'config': config or name, 'train_task': task, 'step': n, **counts,
          'tokens': n * per_step,
          'train_flops': n * per_step * counts['train_flops_per_token'],
          'step_seconds': seconds, 'train_seconds': None if seconds is None else n * seconds,
          'devices': devices,
          'device_seconds': None if seconds is None else n * seconds * devices,
          'run_dir': run_dir}
  by_domain = {}
  # The file's domains come after the logged ones: where 'validation' (logged) and
  # 'task:validation' (evaluated by name) are one domain, the file's result is kept.
  for domain, (source, values) in domains.items():
    domain = f'{task}:{domain}' if task and ':' not in domain else domain
    by_domain[domain] = {**base, 'domain': domain, 'source': source, **values}
  return [{k: r.get(k) for k in COLUMNS} for r in by_domain.values()]


def read_metrics(run_dir: str) -> list[dict]:
  """The records of RUN_DIR/metrics.jsonl; a clear error for a directory without one."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'{run_dir}: no such run directory')
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{run_dir} has no metrics.jsonl: not a trained run directory '
                            '(moescale train writes one as it trains)')
  out = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{i}: not a JSON object ({e.msg})') from None
  return out


def evaluation(run_dir: str, metrics: list[dict], step: int | None
               ) -> tuple[int, dict[str, tuple[str, dict]]]:
  """(N, {domain: (source, {column: value})}) at the evaluated step N (see the docstring)."""
  by_step: dict[int, dict[str, tuple[str, dict]]] = {}
  for record in metrics:
    for key in record:
      if key.endswith('/eval_loss'):
        domain = key[:-len('/eval_loss')]
        by_step.setdefault(int(record['step']), {})[domain] = ('metrics', _metric_values(
            {m: record.get(f'{domain}/{m}') for m in EVAL_METRICS}))
  for path in glob.glob(os.path.join(run_dir, 'eval', 'perplexity_step*.json')):
    match = _EVAL_FILE.search(path)
    with open(path) as f:
      try:
        results = json.load(f).get('results', {})
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not a JSON evaluation file ({e.msg}); rerun moescale '
                         'eval') from None
    for domain, values in results.items():
      by_step.setdefault(int(match.group(1)), {})[domain] = ('eval', _metric_values(values))
  if not by_step:
    raise ValueError(f'{run_dir} has no evaluation: neither eval/perplexity_step<N>.json nor '
                     'evaluation records in metrics.jsonl; run `moescale eval '
                     f'{run_dir}` first')
  if step is None:
    step = max(by_step)
  elif step not in by_step:
    raise ValueError(f'{run_dir} has no evaluation at step {step}; it has steps '
                     f'{sorted(by_step)}')
  return step, by_step[step]


def _metric_values(values: dict) -> dict:
  """{column: float or None}; the logged file writes a non-finite value as text ('inf')."""
  out = {}
  for key, column in EVAL_METRICS.items():
    v = values.get(key)
    out[column] = None if v is None else float(v)
  return out


def median_step_seconds(metrics: list[dict], step: int) -> float | None:
  """The median logged `step_time` of the log windows that end at or before `step`."""
  times = [float(r['step_time']) for r in metrics
           if 'step_time' in r and int(r['step']) <= step and math.isfinite(float(r['step_time']))]
  return statistics.median(times) if times else None


def count_run(run_dir: str, convention: str = 'standard') -> dict:
  """Family, counts, tokens per step, device count and task from RUN_DIR/config.gin."""
  import gin
  from moescale import accounting, gin_config
  if convention not in accounting.CONVENTIONS:
    raise ValueError(f'convention={convention!r}; valid: {list(accounting.CONVENTIONS)}')
  model_fn, cfg, _ = gin_config.parse_run(run_dir)
  segment, task, _ = gin_config.data_shape(run_dir)
  mem_len = int(gin.get_bindings('TransformerLM').get('mem_len') or 0)
  model = accounting.abstract_model(model_fn)
  c = accounting.count(model, segment + mem_len, segment)
  ffn_params, ffn_bytes = _ffn_param_tree(model)
  ffn_active = sum(layer['ffn_active_params'] for layer in c.layers)
  meta = _meta(run_dir)
  return {
      'family': meta.get('family') or family_of(model), 'config': meta.get('config'),
      'seed': int(cfg.seed),
      'params': c.total_params, 'active_params': c.active_params,
      'ffn_params': ffn_params, 'ffn_active_params': ffn_active,
      'ffn_param_bytes': ffn_bytes,
      'ffn_active_bytes': ffn_active * ffn_bytes / ffn_params if ffn_params else 0.0,
      'forward_flops_per_token': c.flops_per_token,
      'ffn_flops_per_token': float(sum(layer['ffn_flops'] for layer in c.layers)),
      'train_flops_per_token': c.train_flops_per_token[convention], 'convention': convention,
      'tokens_per_step': cfg.batch_size * segment, 'devices': _pinned_devices(cfg.mesh),
      'task': task,
  }


def _ffn_param_tree(model) -> tuple[int, int]:
  """(parameters, bytes) of every FFN sublayer: the parameter leaves under an 'ffn' path."""
  from flax import nnx
  params = nbytes = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if 'ffn' in (str(p) for p in path):
      value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
      params += math.prod(value.shape)
      nbytes += math.prod(value.shape) * value.dtype.itemsize
  return params, nbytes


def family_of(model) -> str:
  """'dense' when every FFN layer is a plain DenseFFN, else the other layers' kinds by '+'."""
  kinds = []
  for _, ffn in model.ffn_layers():
    kind = type(ffn).__name__
    if kind == 'DenseFFN' and getattr(ffn, 'topk_activation', None):
      kind = f'DenseFFN[topk={ffn.topk_activation}]'
    if kind != 'DenseFFN' and kind not in kinds:
      kinds.append(kind)
  return '+'.join(kinds) or 'dense'


def _meta(run_dir: str) -> dict:
  """config.json's meta (a study's run), else {}."""
  path = os.path.join(run_dir, 'config.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f).get('meta') or {}


def _pinned_devices(mesh) -> int | None:
  """The devices a MeshConfig uses when it says so: num_devices, or every axis given."""
  if mesh.num_devices is not None:
    return int(mesh.num_devices)
  axes = (mesh.data, mesh.fsdp, mesh.expert, mesh.tensor)
  return math.prod(axes) if all(a > 0 for a in axes) else None
