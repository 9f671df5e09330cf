"""Bad input to the gin-configured commands: one paragraph naming the value and what is valid,
exit status 2, no traceback unless --debug, nothing written; and no library start-up noise."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from moescale import cli, gin_checks, quiet
from moescale.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent


def _error(capsys, *argv) -> str:
  """stderr of a command that must fail with status 2 and a one-paragraph message."""
  assert main(list(argv)) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'moescale {argv[0]}: error: '), err
  assert 'Traceback' not in err and 'In call to configurable' not in err and ' 0x' not in err
  return err


def test_mistyped_macro_is_refused_before_training_with_a_suggestion(capsys, tmp_path):
  model_dir = tmp_path / 'run'
  err = _error(capsys, 'train', '--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{model_dir}'",
               '--gin.TRAIN_STEPZ=5')
  assert 'TRAIN_STEPZ' in err and 'Did you mean TRAIN_STEPS?' in err
  assert not model_dir.exists()  # refused before run_training wrote config.gin


@pytest.mark.parametrize('bindings,expected', [
    (['--gin_bindings=MY_K = 3'], '`MY_K = 3` binds the macro MY_K, which no'),
    # Referenced only by a macro nothing uses: still changes nothing (reachability, not grep).
    (['--gin_bindings=MY_K = 3', '--gin_bindings=OTHER = %MY_K'],
     '`MY_K = 3` binds the macro MY_K, which no'),
    (['--gin.TopKMoE.top_k=%TOPK'],  # used but bound nowhere
     '`TopKMoE.top_k = %TOPK`: %TOPK is used but no gin file or binding sets it. Did you mean '
     'TOP_K?'),
])
def test_bindings_that_change_nothing_or_use_nothing_are_refused(capsys, bindings, expected):
  err = _error(capsys, 'count', '--gin_file=runs/tiny.gin', *bindings)
  assert expected in err, err


@pytest.mark.parametrize('files,bindings,context', [
    (['runs/tiny.gin'], ['--gin_bindings=MY_K = 3', '--gin_bindings=TOP_K = %MY_K'], 128),
    # TASK_FEATURE_LENGTHS: no file of this set refers to it, but `count` reads it by name.
    (['models/decoder.gin', 'ffn/dense.gin'], ["--gin.TASK_FEATURE_LENGTHS={'targets': 32}"], 32),
])
def test_bindings_used_through_a_macro_or_by_the_code_are_accepted(capsys, files, bindings,
                                                                   context):
  import json
  assert main(['count', '--json', *(f'--gin_file={f}' for f in files), *bindings]) == 0
  assert json.loads(capsys.readouterr().out)['context_length'] == context


@pytest.mark.parametrize('binding,expected', [
    ('--gin.TopKMoE.top_kk=2', "'top_kk'. Did you mean top_k?"),
    ('--gin.TopKMoEE.top_k=2', "'TopKMoEE'. Did you mean TopKMoE?"),
    ('--gin.TopKMoE.top_k=@TopKMoEx()', "'@TopKMoEx()'. Did you mean TopKMoE?"),
    # The usual new-user slip: an unquoted string.
    ('--gin.MODEL_DIR=/tmp/x', "cannot parse the gin binding `MODEL_DIR = /tmp/x`"),
])
def test_unknown_names_and_bad_values_name_the_close_valid_ones(capsys, binding, expected):
  err = _error(capsys, 'count', '--gin_file=runs/tiny.gin', binding)
  assert expected in err, err


@pytest.mark.parametrize('binding,expected', [
    ('--gin.TopKMoE.top_k=9', 'top_k=9 must be <= num_experts=8'),
    ('--gin.NUM_HEADS=5', 'd_model=128 is not divisible by num_heads=5'),
    ('--gin.EXPERT_SIZE=-3', 'expert_size=-3 must be > 0'),
    # A TypeError names no value: the message says which configurable got it.
    ("--gin.NUM_EXPERTS='8'", 'in TopKMoE: is one of its bound values of the wrong type?'),
    # The family swapped without its sizes: what is missing, not Python's TypeError.
    ('--gin_bindings=TransformerLM.sparse_ffn = @SigmaMoE',
     'SigmaMoE has no value for expert_size, num_experts, top_k: bind them'),
])
def test_impossible_sizes_are_the_constructors_own_line(capsys, binding, expected):
  err = _error(capsys, 'count', '--gin_file=runs/tiny.gin', binding)
  assert expected in err and len(err.strip().splitlines()) == 1, err


def test_run_training_wrapper_text_is_stripped(capsys, tmp_path):
  # Through run_training, as `train` calls it: gin appends a line per configurable passed
  # (TopKMoE, TransformerLM, run_training with its address). Synthetic data: no TensorFlow.
  err = _error(capsys, 'train', '--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{tmp_path}'",
               '--gin.TRAIN_STEPS=1', '--gin.TopKMoE.top_k=9',
               '--gin_bindings=run_training.data = @synthetic_data()')
  assert err == 'moescale train: error: top_k=9 must be <= num_experts=8\n'


def test_missing_gin_files_suggest_the_shipped_ones(capsys, tmp_path, caplog):
  err = _error(capsys, 'count', '--gin_file=tiny.gin')
  assert "'tiny.gin' not found" in err and 'Did you mean runs/tiny.gin or sizes/tiny.gin?' in err
  user = tmp_path / 'user.gin'
  user.write_text("include 'runs/tinyy.gin'\n")
  err = _error(capsys, 'count', f'--gin_file={user}')
  assert "'runs/tinyy.gin' not found" in err and 'Did you mean runs/tiny.gin' in err
  assert f'In file "{user}", line 1' in err
  # A relative include that gin finds under a later search path: no 'ERROR root: Path not
  # found' for each path it tried first (gin's resource reader logs one on the root logger).
  user.write_text("include 'runs/tiny.gin'\n")
  assert main(['count', f'--gin_file={user}']) == 0
  assert not [r for r in caplog.records if 'Path not found' in r.getMessage()]


def test_debug_anywhere_or_the_environment_shows_the_traceback(capsys, monkeypatch):
  bad = ['count', '--gin_file=runs/tiny.gin', '--gin.TRAIN_STEPZ=5']
  for argv in (['--debug', *bad], [*bad, '--debug']):
    with pytest.raises(gin_checks.ConfigError, match='TRAIN_STEPZ'):
      main(argv)
  monkeypatch.setenv('MOESCALE_DEBUG', '1')
  with pytest.raises(gin_checks.ConfigError):
    main(bad)
  monkeypatch.setenv('MOESCALE_DEBUG', '0')
  assert main(bad) == 2


def test_a_bug_still_shows_its_traceback(monkeypatch):
  # A TypeError outside any gin-configured call is no bad value: it must not pass as one.
  def broken(argv):
    return len(None)
  monkeypatch.setitem(cli._COMMANDS, 'broken', (broken, 'raises a TypeError'))
  with pytest.raises(TypeError):
    main(['broken'])


def test_native_stderr_keeps_what_the_level_lets_through(capfd):
  lines = [b'WARNING: All log messages before absl::InitializeLog() is called are written to '
           b'STDERR\n',
           b'I0000 00:00:1796456075.527856   24343 port.cc:153] oneDNN custom operations\n',
           b'W0000 00:00:1796456075.528696   24343 cudart_stub.cc:31] Could not find cuda\n',
           b'E0000 00:00:1796456075.528696   24343 cuda_dnn.cc:8] an error\n',
           b'F1204 10:11:12.123456 7 check.cc:1] fatal\n',
           b'/some/module.py:3: UserWarning: a Python warning\n']
  with quiet.native_stderr(level=2):  # TF's meaning: drop INFO and WARNING
    for line in lines:
      os.write(2, line)
  assert capfd.readouterr().err.encode() == b''.join(lines[3:])
  with quiet.native_stderr(level=0):
    for line in lines:
      os.write(2, line)
  assert capfd.readouterr().err.encode() == b''.join(lines)


_NOISE = re.compile(r'absl::InitializeLog|port\.cc|cudart_stub|oneDNN|cpu_feature_guard|'
                    r'^[IWE]\d{4} \d\d:|Path not found|^(INFO|WARNING) (absl|orbax)', re.M)


def test_train_prints_no_library_start_up_noise(tmp_path):
  # As a user runs it: TF_CPP_MIN_LOG_LEVEL unset (the tests' conftest sets it). The flags of
  # test_cli's demo test, so the compiled programs come from the shared compilation cache.
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'MOESCALE_DEBUG')}
  small = ['--gin.NUM_LAYERS=2', '--gin.BATCH_SIZE=2', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
           '--gin.EVAL_STEPS=1', '--gin.PARALLEL_MICROBATCHES=1', '--gin.NUM_DEVICES=1',
           "--gin_bindings=seqio_data.eval_splits = ('validation',)",
           '--gin_bindings=TrainConfig.tensorboard = False']
  r = subprocess.run([str(BIN / 'moescale'), 'train', '--gin_file=runs/tiny.gin',
                      f"--gin.MODEL_DIR='{tmp_path}'", '--gin.TRAIN_STEPS=1', *small],
                     capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / 'metrics.jsonl').is_file()  # it read the seqio data: TensorFlow loaded
  noise = _NOISE.findall(r.stderr.replace('\r', '\n'))
  assert not noise, r.stderr


@pytest.mark.parametrize('files,binding,expected', [
    (['runs/tiny.gin'], '--gin.NUM_EXPERTS=0', 'num_experts=0 must be > 0'),
    (['runs/tiny.gin'], '--gin.NUM_EXPERTS=-2', 'num_experts=-2 must be > 0'),
    (['runs/tiny.gin'], '--gin.EXPERT_SIZE=0', 'expert_size=0 must be > 0'),
    (['runs/tiny.gin', 'ffn/sigma_moe.gin'], '--gin.NUM_EXPERTS=0', 'num_experts=0 must be > 0'),
    (['models/decoder.gin', 'ffn/dense.gin'], '--gin.D_FF=0', 'd_ff=0 must be > 0'),
    (['models/decoder.gin', 'ffn/dense.gin'], '--gin.D_FF=-5', 'd_ff=-5 must be > 0'),
    (['runs/tiny.gin', 'ffn/pkm.gin'], '--gin.PKM_KNN=1025', 'knn=1025 must be <= num_keys**2=1024'),
    (['runs/tiny.gin', 'ffn/pkm.gin'], '--gin.PKM_NUM_KEYS=0', 'num_keys=0 must be > 0'),
])
def test_zero_negative_or_too_large_sizes_name_the_value(capsys, files, binding, expected):
  err = _error(capsys, 'count', *(f'--gin_file={f}' for f in files), binding)
  assert expected in err and len(err.strip().splitlines()) == 1, err


_SYNTHETIC = ['--gin.TRAIN_STEPS=1', '--gin_bindings=run_training.data = @synthetic_data()']


@pytest.mark.parametrize('bindings,expected', [
    (['--gin.DATA_PARALLELISM=3'], "has 3 devices, but 8 are available: valid are axis sizes "
     'whose product is 8'),
    (['--gin.NUM_DEVICES=9'], 'num_devices=9 but only 8 devices are available; valid: 1..8'),
    # Refused, not trained with the experts silently replicated over the expert axis.
    (['--gin.NUM_EXPERTS=6', '--gin.EXPERT_PARALLELISM=4'],
     'do not divide over the expert mesh axis of size 4 (MeshConfig.expert, EXPERT_PARALLELISM)'
     ': valid sizes divide both the experts and the 8 devices: [1, 2]'),
    (['--gin.BATCH_SIZE=12'], 'batch_size=12 must be a multiple of 8, the batch shards'),
])
def test_a_mesh_that_does_not_fit_is_refused_before_anything_is_written(capsys, tmp_path,
                                                                         bindings, expected):
  assert len(__import__('jax').devices()) == 8   # conftest's fake devices
  model_dir = tmp_path / 'run'
  err = _error(capsys, 'train', '--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{model_dir}'",
               *_SYNTHETIC, *bindings)
  assert expected in err, err
  assert not model_dir.exists()   # no config.gin, no lock file


def test_an_unknown_task_lists_the_valid_names(capsys, tmp_path):
  # The default tasks register on first use: they were missing from the list ('Registered: []').
  err = _error(capsys, 'train', '--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{tmp_path}/r'",
               "--gin.MIXTURE_OR_TASK_NAME='moescale_sot'")
  assert ("No seqio task or mixture named 'moescale_sot'. Did you mean moescale_sotu" in err
          and 'Valid: moescale_kjv, moescale_pydoc, moescale_sotu' in err), err
  assert not (tmp_path / 'r').exists()


def _analysis_inputs(root: pathlib.Path) -> None:
  (root / 'not_a_run').mkdir()
  (root / 'empty.txt').write_text('')
  (root / 'records.csv').write_text('a,b\n1,2\n')
  (root / 'hs').mkdir()
  for split in ('train', 'val'):
    (root / 'hs' / f'hellaswag_{split}.jsonl').write_text('ctx,endings,label\n')  # a CSV


@pytest.mark.parametrize('argv,expected', [
    (['eval', '{r}/not_a_run'], 'not_a_run has no config.gin: not a run directory'),
    (['eval', '{r}/not_a_run', '--text=mine={r}/missing.txt'],
     "expected a file at '{r}/missing.txt', but it does not exist"),
    (['eval', '{r}/not_a_run', '--text=mine={r}/empty.txt'],
     'files of a text corpus are empty (0 bytes): {r}/empty.txt'),
    (['prime', '{r}/not_a_run', '--task=hellaswag:{r}/hs'],
     '{r}/hs/hellaswag_train.jsonl, line 1: not valid JSON'),
    (['prime', '{r}/not_a_run', '--task=xml:{r}/hs'], "unknown format 'xml'; expected"),
    (['speedup', '{r}/records.csv'], "missing column(s) ['run', 'family', 'train_flops', "
     "'perplexity']; it has ['a', 'b']"),
    (['report', '{r}/not_a_run', '--out', '{r}/report'], 'no run directory in {r}/not_a_run'),
    (['count', '--gin_file=runs/tiny.gin', '--context_length=-4'],
     'context length -4 must be >= 1'),
])
def test_evaluation_and_analysis_commands_refuse_bad_input(capsys, tmp_path, argv, expected):
  _analysis_inputs(tmp_path)
  err = _error(capsys, *(a.format(r=tmp_path) for a in argv))
  assert expected.format(r=tmp_path) in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'report').exists() and not (tmp_path / 'not_a_run' / 'eval').exists()
