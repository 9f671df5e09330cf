"""Two processes on localhost (jax.distributed, gloo CPU collectives) train and checkpoint;
the result equals one process on one device with the same global batch and seed: losses,
logged gradient norms and parameters after plain SGD (see multiprocess_worker.py). Two
processes evaluating a run (moescale.evaluate) get the numbers one process gets. Two processes
training on a seqio mixture stop and resume to the losses of an uninterrupted run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = str(pathlib.Path(__file__).with_name('multiprocess_worker.py'))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(pid, nproc, port, model_dir, out, devices, mode='train'):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  cmd = [sys.executable, WORKER, str(pid), str(nproc), str(port), str(model_dir), str(out),
         str(devices), mode]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait(procs):
  try:
    for p in procs:
      out, _ = p.communicate(timeout=600)
      assert p.returncode == 0, out[-3000:]
  finally:  # a failed process leaves its peers waiting for it: end them
    for p in procs:
      if p.poll() is None:
        p.kill()


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


def test_two_processes_evaluate_as_one(tmp_path):
  """Multiple-choice scores (two batches, the second padded) and perplexity by domain of one
  checkpoint: 2 processes x 2 devices (data and expert parallel) equal 1 process on 1 device;
  each process passes only its own rows of every batch, and process 0 alone writes results."""
  run_dir, port = tmp_path / 'run', _free_port()
  # All three at once: the one-process worker trains the run, the others start up meanwhile.
  _wait([_spawn(0, 1, 0, run_dir, tmp_path / 'single.json', 1, 'evaluate')]
        + [_spawn(i, 2, port, run_dir, tmp_path / f'multi{i}.json', 2, 'evaluate')
           for i in range(2)])
  single = json.loads((tmp_path / 'single.json').read_text())
  multi = [json.loads((tmp_path / f'multi{i}.json').read_text()) for i in range(2)]
  assert single['devices'] == 1 and multi[0]['devices'] == 4
  for m in multi:
    assert m['process_count'] == 2 and m['step'] == single['step'] == 2
    assert m['scores']['truncated'] == single['scores']['truncated']
    assert sum(single['scores']['truncated']) == 1
    for norm in ('sum', 'per_token', 'per_byte'):
      np.testing.assert_allclose(m['scores'][norm], single['scores'][norm], rtol=1e-5,
                                 err_msg=norm)
    assert set(m['perplexity']) == {'validation', 'moescale_kjv:validation'}
    for task, want in single['perplexity'].items():
      assert m['perplexity'][task]['eval_tokens'] == want['eval_tokens']
      for metric, value in want.items():
        assert m['perplexity'][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    assert 'batch_size=3 must divide by the 2 processes' in m['bad_batch']
  saved = json.loads(pathlib.Path(multi[0]['saved']).read_text())
  assert saved['results'] == multi[0]['perplexity'] and saved['step'] == 2
  assert sorted(os.listdir(run_dir / 'eval')) == ['perplexity_1p_step2.json',
                                                  'perplexity_2p_step2.json']


def test_two_processes_resume_a_mixture_run_exactly(tmp_path):
  """Each process reads its own share of every task of the mixture; the checkpoint's data
  position (written by process 0) is one both processes resume from."""
  port = _free_port()
  _wait([_spawn(i, 2, port, tmp_path, tmp_path / f'p{i}.json', 2, 'resume') for i in range(2)])
  out = json.loads((tmp_path / 'p0.json').read_text())
  assert out['process_count'] == 2 and out['devices'] == 4
  assert sorted(out['straight']) == sorted(out['resumed']) == ['1', '2', '3', '4']
  assert out['resumed'] == out['straight']
  position = out['position']
  assert position['mixture_steps'] == 2 and position['num_shards'] == 2
  assert [t for t, _ in position['tasks']] == ['moescale_sotu', 'test_mp_numbers']
