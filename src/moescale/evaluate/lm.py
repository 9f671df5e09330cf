"""Perplexity of a checkpoint on evaluation tasks (domains), over whole splits by default.

    results = perplexity(load_run('runs/tiny'), ['validation', 'moescale_kjv:validation'])
    results['moescale_kjv:validation']['perplexity']

A task is 'split' of the run's own task or 'task:split' of another registered seqio task
(the embedded corpus: moescale_sotu in-domain, moescale_kjv and moescale_pydoc out-of-domain;
a user's text files: `moescale.data.tasks.register_text_task`). Each gets the loss in nats per
token, perplexity, bits per token, bits per byte (= bits per character on byte-level data)
and the number of tokens scored. A Transformer-XL model reads each split as contiguous
streams with `mem_len` tokens of memory (default: what the run evaluates with).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from moescale import sharding as shd
from moescale.evaluate.run import Run, barrier, writes_files
from moescale.train import trainer

METRICS = ('eval_loss', 'perplexity', 'bits_per_token', 'bits_per_byte', 'eval_tokens')


def perplexity(run: Run, tasks: Sequence[str] | None = None, *, max_batches: int | None = None,
               batch_size: int | None = None, mem_len: int | None = None,
               progress: bool = False) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} for each task (None: the run's own evaluation splits).

  max_batches: at most this many batches per task (None: the whole split); batch_size: rows
  per batch (None: the run's evaluation batch); mem_len: Transformer-XL memory in tokens (None:
  the run's eval_mem_len, else its model's). Multi-process: each process reads its block of
  every batch, as in training; the results are the same on every process and as one process
  gets (batch_size must divide by the processes)."""
  cfg = dataclasses.replace(run.config, eval_steps=max_batches,
                            eval_batch_size=batch_size or run.config.eval_batch_size,
                            eval_mem_len=run.config.eval_mem_len if mem_len is None else mem_len)
  # The trainer's evaluation gives each process batch_size // processes rows (a remainder is
  # dropped, silently changing the batches) and assumes the mesh assembles the processes'
  # blocks in order: checked here, with an error that says what to change.
  shd.host_rows(run.mesh, cfg.eval_batch_size or cfg.batch_size)
  data = run.data
  if tasks:
    data.eval_splits = tuple(tasks)
  eval_fn, memory = trainer.make_eval_fn(run.built.graphdef, run.built.state_sh, run.mesh, cfg,
                                         run.built.memory)
  with shd.use_mesh(run.mesh, cfg.rules):
    flat = trainer.evaluate(eval_fn, run.state, data, cfg, run.mesh, memory, progress=progress)
  out: dict[str, dict[str, float]] = {}
  for key, value in flat.items():
    task, metric = key.rsplit('/', 1)
    out.setdefault(task, {})[metric] = float(value)
  missing = [t for t in getattr(data, 'eval_splits', out) if t not in out]
  if missing:
    raise ValueError(f'{missing}: no tokens to score (an empty split, or max_batches=0)')
  return out


def register_text_domain(run: Run, name: str, files) -> str:
  """Registers text files (paths or globs; a document per paragraph) as seqio task `name`,
  tokenized with the run's vocabulary, and returns its evaluation task 'name:validation'."""
  from moescale.data import tasks as tasks_lib
  tasks_lib.register_text_task(name, None, list(files), run.data.vocabulary_spec)
  return f'{name}:validation'


def save(run: Run, name: str, results: dict) -> str:
  """Merges `results` into RUN_DIR/eval/<name>_step<step>.json (this checkpoint's file only);
  written to a temporary file first, so an interrupted write leaves the old file whole.
  Multi-process: process 0 writes, and every process returns once the file is there."""
  path = run.output_path(name)
  if writes_files():
    _merge_into(path, run, results)
  barrier(f'moescale.evaluate.save:{path}')
  return path


def _merge_into(path: str, run: Run, results: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  merged = {**old, 'run_dir': run.run_dir, 'step': run.step,
            'results': {**old.get('results', {}), **results}}
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(merged, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def table(results: dict[str, dict[str, float]]) -> str:
  """The results as a text table, one row per task."""
  head = ['task', 'loss', 'ppl', 'bits/token', 'bits/byte', 'tokens']
  rows = [[t, f'{r["eval_loss"]:.4f}', f'{r["perplexity"]:.3f}', f'{r["bits_per_token"]:.4f}',
           f'{r["bits_per_byte"]:.4f}' if 'bits_per_byte' in r else '-',
           f'{int(r["eval_tokens"]):,}'] for t, r in results.items()]
  return text_table(head, rows)


def text_table(head, rows) -> str:
  """Columns padded to their widest cell: the first (names) left-aligned, the rest (figures)
  right-aligned."""
  widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
  fmt = lambda row: '  '.join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                              for i, (x, w) in enumerate(zip(row, widths)))
  return '\n'.join([fmt(head)] + [fmt(r) for r in rows])
