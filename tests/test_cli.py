"""The command line and the gin edge: installed entry point, no TensorFlow where no data is
read, t5x-style flags, clear errors, and every shipped gin file parses and builds."""

import json
import pathlib
import subprocess
import sys

import gin
import pytest
from flax import nnx

from moescale import accounting, gin_config
from moescale.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN = REPO / 'gin'
BIN = pathlib.Path(sys.executable).parent


def _run(*args, check=True):
  r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
  if check and r.returncode != 0:
    raise AssertionError(f'{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}')
  return r


def test_installed_entry_point_help_does_not_import_tensorflow():
  # The console script exists only if the package was installed (a missing install fails).
  r = _run(str(BIN / 'moescale'), '--help')
  for cmd in ('train', 'count', 'bench', 'vocab', 'demo'):
    assert cmd in r.stdout
  code = ('import sys, moescale, moescale.cli, moescale.layers, moescale.model, '
          'moescale.train.trainer, moescale.accounting; '
          "moescale.cli.main(['--help']); "
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
          'assert not bad, bad')
  _run(sys.executable, '-c', code)


def test_count_json_matches_python_and_imports_no_tensorflow():
  code = ("import sys, json, io, contextlib; from moescale.cli import main; f = io.StringIO()\n"
          "with contextlib.redirect_stdout(f): rc = main(['count', '--gin_file=runs/tiny.gin', "
          "'--json'])\n"
          "assert rc == 0; assert 'tensorflow' not in sys.modules; print(f.getvalue())")
  out = json.loads(_run(sys.executable, '-c', code).stdout)
  for key in ('total_params', 'active_params', 'flops_per_token', 'train_flops_per_token'):
    assert key in out
  gin_config.parse(['runs/tiny.gin'], ["MODEL_DIR = '/tmp/unused'"])
  model = accounting.abstract_model(gin_config.query('MODEL'))
  real = sum(v.get_value().size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert out['total_params'] == real
  assert out['active_params'] < out['total_params']  # top-2 of 8 experts in every other layer


def test_split_gin_flags_t5x_style():
  files, bindings, paths, rest = gin_config.split_gin_flags(
      ['--gin_file=a.gin', '--gin_file', 'b.gin', "--gin.MODEL_DIR='x'",
       '--gin_bindings=A.b = 1', '--gin_search_paths=p1,p2', '--other'])
  assert files == ['a.gin', 'b.gin']
  assert bindings == ["MODEL_DIR = 'x'", 'A.b = 1']
  assert paths == ['p1', 'p2'] and rest == ['--other']


def test_required_macros_are_enforced(capsys):
  with pytest.raises(ValueError, match='MODEL_DIR'):
    gin_config.parse(['runs/tiny.gin'], [])
  rc = main(['train', '--gin_file=runs/tiny.gin'])
  assert rc == 2 and 'MODEL_DIR' in capsys.readouterr().err


def test_python_dash_m_moescale_train_is_the_train_command():
  r = _run(sys.executable, '-m', 'moescale.train', check=False)
  assert r.returncode == 2 and '--gin_file is required' in r.stderr
  r = _run(sys.executable, '-m', 'moescale.train', '--gin_file=runs/tiny.gin', check=False)
  assert r.returncode == 2 and 'MODEL_DIR' in r.stderr and 'Traceback' not in r.stderr


def test_gin_typo_gives_a_clear_one_line_error(capsys):
  rc = main(['count', '--gin_file=runs/tiny.gin', '--gin_bindings=TopKMoE.num_expertz = 3'])
  err = capsys.readouterr().err
  assert rc == 2 and 'num_expertz' in err and 'Traceback' not in err


def test_missing_gin_file_names_the_file(capsys):
  rc = main(['count', '--gin_file=runs/no_such_file.gin'])
  err = capsys.readouterr().err
  assert rc == 2 and 'no_such_file.gin' in err


def test_impossible_config_names_the_value(capsys):
  rc = main(['count', '--gin_file=runs/tiny.gin', '--gin.TOP_K=9'])
  err = capsys.readouterr().err
  assert rc == 2 and 'top_k=9' in err and 'num_experts=8' in err


def _gin_sets():
  """Every shipped gin file, as a parseable set: fragments (ffn/, sizes/) get a model."""
  sets = []
  for path in sorted(GIN.rglob('*.gin')):
    rel = str(path.relative_to(GIN))
    if rel == 'runs/pretrain.gin':
      sets.append(['models/decoder.gin', 'ffn/dense.gin', rel])
    elif rel.startswith(('ffn/', 'sizes/')):
      sets.append(['models/decoder.gin', rel] if rel.startswith('ffn/')
                  else ['models/decoder.gin', 'ffn/dense.gin', rel])
    else:
      sets.append([rel])
  return sets


@pytest.mark.parametrize('files', _gin_sets(), ids=lambda f: f[-1])
def test_every_shipped_gin_file_parses_and_builds_abstractly(files):
  required = ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'x'",
              "TASK_FEATURE_LENGTHS = {'targets': 64}", 'TRAIN_STEPS = 1']
  gin_config.parse(files, required)
  model_fn = gin_config.query('MODEL')
  if model_fn is None:
    pytest.skip('binds no MODEL (pair files are checked by the pairs tests)')
  model = accounting.abstract_model(model_fn)
  assert accounting.count(model, 64).total_params > 0


def test_bench_quick_runs_from_the_command_line_without_tensorflow():
  # The sigma and pkm sections run in-process in test_bench_sigma / test_bench_pkm; here the
  # command line, the JSON, and the two sections no other test runs (72 s with all four).
  code = ("import sys, json, io, contextlib; from moescale.cli import main; f = io.StringIO()\n"
          "with contextlib.redirect_stdout(f): rc = main(['bench', '--quick', '--json', "
          "'--sections', 'moe,train'])\n"
          "assert rc == 0, rc; assert 'tensorflow' not in sys.modules and 'gin' not in "
          "sys.modules; print(f.getvalue())")
  out = _run(sys.executable, '-c', code).stdout
  records = json.loads(out[out.index('['):])
  names = {(r['name'], r['backend']) for r in records}
  assert {('moe_top2', 'fused'), ('moe_top2', 'fused@capacity'), ('moe_top2', 'blocked'),
          ('dense_ffn', 'DenseFFN'), ('peak_matmul', 'fp32_square'), ('train_step', 'dense'),
          ('train_step', 'topk_moe')} <= names
  assert all(r['ratio'] is None or r['ratio'] > 0 for r in records)
  for r in records:
    if r['name'] == 'train_step':
      # MFU against a square matmul timed in the same rounds: a step cannot run its matmuls
      # much faster than the machine's best one, and it must hold at least its own state.
      assert 0 < r['mfu'] < 1.5, r
      assert r['peak_memory_bytes'] is None or r['peak_memory_bytes'] >= r['state_bytes'], r
