"""Runs on cloud storage, read locally: `stage_runs` copies gs://... (any path etils.epath
opens) run directories into a local cache once, so that evaluation, collect and report read
them as ordinary directories. Local paths pass through untouched.

    dirs = stage_runs(['gs://bucket/study'], '/tmp/moescale_runs')    # in a notebook

A study root (with the study.json `ScalingStudy.write` leaves) stands for all of its runs, in
its order; any other directory that is not itself a run stands for the runs found below it
(the runs a scheduler's jobs wrote under one root).
A copy is complete or absent: files land in a temporary directory renamed into place at the
end, so an interrupted copy is redone rather than read half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence


def is_remote(path: str) -> bool:
  return '://' in str(path)


def stage_runs(paths: Sequence[str], cache_dir: str, *, refresh: bool = False,
               checkpoints: bool = True) -> list[str]:
  """Local run directories for `paths` (run directories or study roots, local or remote).

  refresh: copy a remote run again even where the cache has it. checkpoints: also copy
  checkpoints/ (what evaluating a checkpoint needs; `collect` and `report` do not)."""
  out = []
  for path in paths:
    local = stage(path, cache_dir, refresh=refresh, checkpoints=checkpoints)
    study = os.path.join(local, 'study.json')
    if os.path.isfile(study):
      with open(study) as f:
        out += [os.path.join(local, r['name']) for r in json.load(f).get('runs', [])]
    elif is_run(local) or not (found := runs_under(local)):
      out.append(local)   # a run, or nothing to find: collect names what is missing
    else:
      out += found
  return out


def is_run(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ('config.gin', 'metrics.jsonl'))


def runs_under(root: str) -> list[str]:
  """The run directories below root (those with a config.gin or metrics.jsonl, as every
  trained run has), sorted; not descending into a run (its checkpoints, eval)."""
  found = []
  for here, dirs, _ in os.walk(root):
    if here != root and is_run(here):
      found.append(here)
      dirs[:] = []
    dirs.sort()
  return sorted(found)


def stage(path: str, cache_dir: str, *, refresh: bool = False, checkpoints: bool = True) -> str:
  """The local directory for one path: itself when local, else a copy under cache_dir."""
  if not is_remote(path):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'{path}: no such run directory')
    return os.path.abspath(path)
  dest = os.path.join(cache_dir, path.split('://', 1)[1].strip('/'))
  if os.path.isdir(dest) and not refresh:
    return dest
  copy_tree(open_remote(path), dest, checkpoints=checkpoints)
  return dest


def open_remote(path: str):
  """The epath.Path of a remote directory; a clear error where there is none."""
  from etils import epath
  src = epath.Path(path)
  if not src.is_dir():
    raise FileNotFoundError(f'{path}: no such directory on its storage')
  return src


def copy_tree(src, dest: str, *, checkpoints: bool = True) -> str:
  """Copies the directory `src` (an epath.Path or a local path) to dest, atomically."""
  from etils import epath
  src = epath.Path(src)
  tmp = dest + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  # A walk of iterdir() calls: epath refuses a recursive glob on cloud storage (one listing
  # per directory is what a copy needs anyway).
  todo = [(src, tmp)]
  while todo:
    here, target = todo.pop()
    os.makedirs(target, exist_ok=True)
    for item in here.iterdir():
      if here == src and item.name == 'checkpoints' and not checkpoints:
        continue
      if item.is_dir():
        todo.append((item, os.path.join(target, item.name)))
      else:
        with open(os.path.join(target, item.name), 'wb') as f:
          f.write(item.read_bytes())
  shutil.rmtree(dest, ignore_errors=True)
  os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
  os.rename(tmp, dest)
  return dest
