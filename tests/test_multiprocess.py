"""Two processes on localhost (jax.distributed, gloo CPU collectives) train and checkpoint;
the result equals one process on one device with the same global batch and seed: losses,
logged gradient norms and parameters after plain SGD (see multiprocess_worker.py)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

WORKER = str(pathlib.Path(__file__).with_name('multiprocess_worker.py'))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(pid, nproc, port, model_dir, out, devices):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  cmd = [sys.executable, WORKER, str(pid), str(nproc), str(port), str(model_dir), str(out),
         str(devices)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait(procs):
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


def test_two_processes_equal_one(tmp_path):
  port = _free_port()
  # All three at once: each is mostly single-threaded compiling, and this test tends to run
  # last, when the other test worker's core is idle.
  procs = [_spawn(i, 2, port, tmp_path / 'multi', tmp_path / f'multi{i}.json', 2)
           for i in range(2)]
  procs.append(_spawn(0, 1, 0, tmp_path / 'single', tmp_path / 'single.json', 1))
  _wait(procs)
  multi = [json.loads((tmp_path / f'multi{i}.json').read_text()) for i in range(2)]
  single = json.loads((tmp_path / 'single.json').read_text())
  assert multi[0]['process_count'] == 2 and multi[0]['devices'] == 4
  assert single['devices'] == 1 and multi[0]['final_step'] == single['final_step'] == 4
  np.testing.assert_allclose(multi[0]['loss'], single['loss'], rtol=1e-5)
  np.testing.assert_allclose(multi[0]['eval'], single['eval'], rtol=1e-5)
  for k, v in single['params'].items():
    np.testing.assert_allclose(multi[0]['params'][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(multi[1]['params'][k], v, rtol=1e-4, atol=1e-6, err_msg=k)
  # One metrics file (process 0 writes), and the checkpoints of steps 2 and 4.
  records = [json.loads(l) for l in
             (tmp_path / 'multi' / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train] == [2, 4]
  single_train = [json.loads(l) for l in
                  (tmp_path / 'single' / 'metrics.jsonl').read_text().splitlines()]
  single_train = [r for r in single_train if 'loss' in r]
  for key in ('grad_norm', 'total_loss', 'loss'):
    np.testing.assert_allclose([r[key] for r in train], [r[key] for r in single_train],
                               rtol=1e-5, err_msg=key)
  steps = sorted(int(p.name) for p in (tmp_path / 'multi' / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [2, 4]
