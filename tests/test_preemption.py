"""Preemption as it happens: a real `kill -9` and a real SIGTERM sent to `moescale train` in a
subprocess (the tiny run on the embedded corpus, a checkpoint every 2 steps), then the same
command again. The resumed run logs exactly the losses of an uninterrupted one; SIGTERM saves
at the current step and exits 0; a second run on a MODEL_DIR in use is refused."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moescale.train import guard

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
FLAGS = ['--gin_file=runs/tiny.gin', f'--gin.TRAIN_STEPS={STEPS}', '--gin.LOG_PERIOD=1',
         '--gin.CHECKPOINT_PERIOD=2', '--gin.NUM_LAYERS=2', '--gin.BATCH_SIZE=4',
         "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", '--gin.EVAL_STEPS=1',
         '--gin.PARALLEL_MICROBATCHES=1', '--gin.NUM_DEVICES=1',
         "--gin_bindings=seqio_data.eval_splits = ('validation',)",
         '--gin_bindings=TrainConfig.tensorboard = False']


def _command(model_dir):
  return [sys.executable, '-m', 'moescale.train', *FLAGS, f"--gin.MODEL_DIR='{model_dir}'"]


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''   # one CPU device: this test is about processes, not meshes
  return env


def _run(model_dir):
  return subprocess.run(_command(model_dir), capture_output=True, text=True, env=_env(),
                        cwd=REPO, timeout=300)


def _losses(model_dir) -> dict[int, float]:
  """Step -> logged training loss, the last record of a step (a resumed run logs again the
  steps after its checkpoint)."""
  out = {}
  for line in open(os.path.join(model_dir, 'metrics.jsonl')):
    r = json.loads(line)
    if 'loss' in r:
      out[r['step']] = r['loss']
  return out


def _start_and_interrupt(model_dir, sig, after_step):
  """Starts a run and sends `sig` once it has logged `after_step`; returns (the process, its
  stdout, its stderr)."""
  proc = subprocess.Popen(_command(model_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_env(), cwd=REPO)
  metrics = pathlib.Path(model_dir) / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and max(_losses(model_dir), default=0) >= after_step:
      proc.send_signal(sig)
      break
    time.sleep(0.05)
  out, err = proc.communicate(timeout=240)
  return proc, out, err


def _assert_resumes_to(reference, model_dir):
  """The same command again finishes the run, and every logged loss (the last of each step)
  equals the uninterrupted run's."""
  r = _run(model_dir)
  assert r.returncode == 0, r.stderr[-2000:]
  resumed = _losses(model_dir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in sorted(resumed)],
                                [reference[s] for s in sorted(reference)])


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  d = tmp_path_factory.mktemp('reference')
  r = _run(d)
  assert r.returncode == 0, r.stderr[-2000:]
  return _losses(d)


def test_kill_9_then_the_same_command_resumes_exactly(reference, tmp_path):
  d = tmp_path / 'killed'
  proc, _, _ = _start_and_interrupt(d, signal.SIGKILL, after_step=5)
  assert proc.returncode == -signal.SIGKILL
  first = _losses(d)
  assert 5 <= max(first) < STEPS          # it was killed mid-run
  _assert_resumes_to(reference, d)


def test_sigterm_saves_at_the_current_step_exits_0_and_resumes_exactly(reference, tmp_path):
  d = tmp_path / 'preempted'
  proc, out, err = _start_and_interrupt(d, signal.SIGTERM, after_step=3)
  assert proc.returncode == 0, err[-2000:]
  stopped = max(_losses(d))
  assert 3 <= stopped < STEPS
  steps = sorted(int(p.name) for p in (d / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == stopped                      # saved where it stopped, not at a period
  assert 'preempted' in out and 'preemption notice' in err
  _assert_resumes_to(reference, d)


def test_a_second_run_on_a_model_dir_in_use_is_refused(tmp_path):
  with guard.RunLock(str(tmp_path)):
    r = _run(tmp_path)
  assert r.returncode == 2
  assert f'{tmp_path} is in use by pid {os.getpid()}' in r.stderr and 'Traceback' not in r.stderr
  assert not (tmp_path / 'metrics.jsonl').exists() and not (tmp_path / 'checkpoints').exists()
  with guard.RunLock(str(tmp_path)):   # released at exit: taken again
    pass


def _with_file_size_limit(command, kib):
  """`command` run with files larger than `kib` KiB failing to write (EFBIG), as on a full
  disk; SIGXFSZ ignored so the write fails instead of killing the process. A shell sets both
  before it execs: a preexec_fn would run Python in a fork of this threaded (JAX) process."""
  return ['bash', '-c', f'ulimit -f {kib} && trap "" XFSZ && exec "$0" "$@"', *command]


def test_a_failed_save_ends_the_run_with_one_paragraph_and_the_run_resumes(reference, tmp_path):
  """The tiny run's checkpoint holds a ~1.5 MB array file: under a 512 kB limit on file size
  its step-4 save fails in orbax's background threads, as on a full disk (there, before
  moescale.quiet, 566 lines of orbax's tracebacks)."""
  d = tmp_path / 'full'
  first = subprocess.run(_command(d) + ['--gin.TRAIN_STEPS=2'], capture_output=True,
                         text=True, env=_env(), cwd=REPO, timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  failed = subprocess.run(_with_file_size_limit(_command(d), 512), capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=300)
  assert failed.returncode == 2, failed.stderr[-3000:]
  lines = [l for l in failed.stderr.replace('\r', '\n').splitlines()
           if l.strip() and not l.startswith('train:')]
  error = [l for l in lines if l.startswith('moescale train: error: writing checkpoint step 4')]
  assert len(error) == 1, failed.stderr[-3000:]
  assert 'File too large' in error[0] and '`ulimit -f`' in error[0], error[0]
  assert 'checkpoints [2] are intact' in error[0], error[0]
  # Nothing else: no traceback, no orbax ERROR records, no 'Event loop is closed'.
  assert all(l.startswith('INFO ') for l in lines if l not in error), lines
  assert _steps(d) == [2]
  _assert_resumes_to(reference, d)


def _steps(model_dir):
  return sorted(int(p.name) for p in (model_dir / 'checkpoints').iterdir() if p.name.isdigit())
