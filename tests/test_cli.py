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


def _exit_code(argv):
  """main's return value, or the status of the SystemExit an argparse error raises."""
  try:
    return main(argv)
  except SystemExit as e:
    return e.code


def test_installed_entry_point_help_does_not_import_tensorflow():
  # The console script exists only if the package was installed (a missing install fails).
  r = _run(str(BIN / 'moescale'), '--help')
  for cmd in ('train', 'count', 'bench', 'vocab', 'demo', 'collect', 'speedup', 'report'):
    assert cmd in r.stdout
  code = ('import sys, moescale, moescale.cli, moescale.layers, moescale.model, '
          'moescale.train.trainer, moescale.accounting, moescale.analysis.cli, '
          'moescale.analysis.collect, moescale.analysis.speedup, moescale.analysis.matched, '
          'moescale.analysis.report, moescale.analysis.report_md, moescale.analysis.storage; '
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


def test_unknown_command_exits_2_naming_it_and_the_valid_ones(capsys):
  assert main(['trian', '--gin_file=runs/tiny.gin']) == 2
  err = capsys.readouterr().err
  assert "'trian'" in err
  for cmd in ('train', 'demo', 'count', 'pairs', 'vocab', 'bench'):
    assert cmd in err.split('valid:')[1], err


def test_vocab_command_trains_a_lossless_sentencepiece_model(tmp_path, capfd):
  # capfd, not capsys: SentencePiece silences its trainer by dup2-ing over sys.stderr's file
  # descriptor, and capsys's sys.stderr has none ('moescale vocab: error: fileno').
  # A few KB of text, 60 distinct words: enough for the BPE merges of 320 pieces (256 byte
  # pieces + 3 special ids + the characters + merges).
  words = [f'{a}{b}' for a in ('ex', 'ro', 'to', 'la', 'mo', 'de') for b in
           ('pert', 'uter', 'ken', 'yer', 'del', 'nse', 'ss', 'ta', 'ga', 'ck')]
  lines = [' '.join(words[(7 * i + 3 * j) % len(words)] for j in range(9)) + '.'
           for i in range(60)]
  text = tmp_path / 'text.txt'
  text.write_text('\n'.join(lines) + '\n')
  prefix = tmp_path / 'sp' / 'tiny'
  assert main(['vocab', '--input', str(text), '--model_prefix', str(prefix),
               '--vocab_size', '320', '--model_type', 'bpe']) == 0
  assert capfd.readouterr().out.strip() == f'{prefix}.model'
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2
  sp = spm.SentencePieceProcessor(model_file=f'{prefix}.model')
  proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
  # Guards the flags reaching the trainer (--vocab_size, --model_type) and seqio's ids.
  assert sp.get_piece_size() == 320
  assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
  sentence = 'the expert  token\tmodel, naïve 🙂'  # unseen characters and whitespace runs
  ids = sp.encode(sentence)
  assert sp.decode(ids) == sentence  # lossless: byte fallback, no normalisation
  assert len(sp.encode('expert token model')) <= 6  # merged pieces, not characters


class _Initialized(Exception):
  """Raised by the fake jax.distributed.initialize: stops `train` before it reads data."""


@pytest.fixture
def fake_initialize(monkeypatch):
  import jax
  calls = []

  def initialize(**kwargs):
    calls.append(kwargs)
    raise _Initialized

  monkeypatch.setattr(jax.distributed, 'initialize', initialize)
  return calls


@pytest.mark.parametrize('flags,expected', [
    (['--multiprocess'], (None, None, None)),  # TPU pod / SLURM: JAX detects all three
    (['--coordinator_address=host0:1234', '--num_processes=4', '--process_id=3'],
     ('host0:1234', 4, 3)),
    (['--multiprocess', '--coordinator_address', 'h:1', '--num_processes', '2',
      '--process_id', '0'], ('h:1', 2, 0)),
])
def test_train_multiprocess_flags_reach_jax_distributed_initialize(fake_initialize, flags,
                                                                   expected):
  # Guards the flags' plumbing (a swapped num_processes / process_id, a dropped flag) and
  # that initialisation comes before anything else of the run.
  with pytest.raises(_Initialized):
    main(['train', '--gin_file=runs/tiny.gin', *flags])
  assert fake_initialize == [dict(zip(('coordinator_address', 'num_processes', 'process_id'),
                                      expected))]


@pytest.mark.parametrize('command', ['eval', 'prime', 'finetune'])
def test_evaluation_commands_take_the_same_multiprocess_flags(fake_initialize, command,
                                                              tmp_path, capsys):
  """Every process of a multi-host evaluation runs the same command: initialisation comes
  before the run is loaded (here a directory with no run at all)."""
  extra = {'eval': [], 'prime': ['--task=corpus_source'],
           'finetune': ['--task=corpus_source', f'--out={tmp_path / "ft"}']}[command]
  flags = ['--coordinator_address=h:1', '--num_processes=2', '--process_id=1']
  with pytest.raises(_Initialized):
    main([command, str(tmp_path), *extra, *flags])
  assert fake_initialize == [{'coordinator_address': 'h:1', 'num_processes': 2,
                              'process_id': 1}]
  assert _exit_code([command, str(tmp_path), *extra, '--num_processes=2']) == 2
  assert 'without --coordinator_address, --process_id' in capsys.readouterr().err


def test_train_without_multiprocess_flags_does_not_initialize(fake_initialize, capsys):
  # Stops at the missing MODEL_DIR, after the point where it would have initialised.
  assert main(['train', '--gin_file=runs/tiny.gin']) == 2
  assert fake_initialize == [] and 'MODEL_DIR' in capsys.readouterr().err


@pytest.mark.parametrize('flags,message', [
    # Without a coordinator these were silently ignored: N single-process runs, one model dir.
    (['--num_processes=4', '--process_id=1'], 'without --coordinator_address'),
    (['--multiprocess', '--num_processes=4'], 'without --coordinator_address, --process_id'),
    (['--coordinator_address=h:1'], 'without --num_processes, --process_id'),
    (['--coordinator_address=h:1', '--num_processes=4', '--process_id=4'],
     '--process_id=4 must be in [0, --num_processes=4)'),
    (['--coordinator_address=h:1', '--num_processes=0', '--process_id=0'],
     '--process_id=0 must be in [0, --num_processes=0)'),
])
def test_train_bad_process_flags_are_a_clear_error(fake_initialize, capsys, flags, message):
  assert _exit_code(['train', '--gin_file=runs/tiny.gin', *flags]) == 2
  err = capsys.readouterr().err
  assert message in err and 'Traceback' not in err, err
  assert fake_initialize == []


def test_demo_trains_writes_metrics_and_a_checkpoint_then_resumes(tmp_path, capsys):
  # `moescale demo` (tiny.gin on the embedded corpus; `make demo` runs a study), made smaller
  # through the gin flags it passes on: 2 layers (the second a top-2 MoE), 32-token rows.
  model_dir = tmp_path / 'demo'
  small = ['--gin.NUM_LAYERS=2', '--gin.BATCH_SIZE=2', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
           '--gin.EVAL_STEPS=1', '--gin.PARALLEL_MICROBATCHES=1', '--gin.NUM_DEVICES=1',
           # One eval split, not three: each is a seqio pipeline to build (test: 32 s -> 18-23 s).
           "--gin_bindings=seqio_data.eval_splits = ('validation',)",
           '--gin_bindings=TrainConfig.tensorboard = False']

  def demo(steps):
    assert main(['demo', '--steps', str(steps), '--model_dir', str(model_dir), *small]) == 0
    out = capsys.readouterr().out
    return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

  summary = demo(2)  # guards --model_dir and --steps reaching MODEL_DIR and TRAIN_STEPS
  assert (summary['start_step'], summary['final_step']) == ('0', '2')
  records = [json.loads(l) for l in open(model_dir / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'loss' in r] == [2]
  assert all(0 < r['loss'] < 10 for r in records if 'loss' in r)
  assert (model_dir / 'checkpoints' / '2').is_dir()
  assert str(model_dir) in (model_dir / 'config.gin').read_text()
  # Again with one more step: resumes at step 2 (starting over would log step 2 again).
  summary = demo(3)
  assert (summary['start_step'], summary['final_step']) == ('2', '3')
  records = [json.loads(l) for l in open(model_dir / 'metrics.jsonl')]
  assert [r['step'] for r in records if 'loss' in r] == [2, 3]
  assert (model_dir / 'checkpoints' / '3').is_dir()


def test_a_model_dir_of_another_config_is_refused_naming_the_change(tmp_path, capsys):
  """Resuming with a changed binding would silently continue another experiment: refused
  (exit 2), naming the binding and both values, the run's files untouched; the explicit flag
  continues it and keeps the earlier config beside the new one."""
  d = tmp_path / 'run'
  small = ['--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{d}'", '--gin.NUM_LAYERS=2',
           '--gin.BATCH_SIZE=2', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
           '--gin.EVAL_STEPS=1', '--gin.PARALLEL_MICROBATCHES=1', '--gin.NUM_DEVICES=1',
           "--gin_bindings=seqio_data.eval_splits = ('validation',)",
           '--gin_bindings=TrainConfig.tensorboard = False']
  assert main(['train', *small, '--gin.TRAIN_STEPS=1']) == 0
  config = (d / 'config.gin').read_text()
  metrics = (d / 'metrics.jsonl').read_text()
  capsys.readouterr()
  assert main(['train', *small, '--gin.TRAIN_STEPS=2', '--gin.LEARNING_RATE=0.5']) == 2
  err = capsys.readouterr().err
  assert 'holds checkpoints of another configuration' in err
  # The learning rate is another experiment; more steps (TRAIN_STEPS 1 -> 2) are a resume.
  assert '1 binding(s) differ: LEARNING_RATE: 0.003 -> 0.5.' in err and 'Traceback' not in err
  assert (d / 'config.gin').read_text() == config and (d / 'metrics.jsonl').read_text() == metrics
  assert main(['train', *small, '--gin.TRAIN_STEPS=2', '--gin.LEARNING_RATE=0.5',
               '--allow_config_change']) == 0
  assert (d / 'config.1.gin').read_text() == config
  assert 'LEARNING_RATE = 0.5' in (d / 'config.gin').read_text()


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


def test_gin_typo_gives_a_clear_one_line_error(capsys, tmp_path):
  rc = main(['count', '--gin_file=runs/tiny.gin', '--gin_bindings=TopKMoE.num_expertz = 3'])
  err = capsys.readouterr().err
  assert rc == 2 and 'num_expertz' in err and 'Traceback' not in err
  # In a file: the message names the file and line, and a misspelt configurable fails too
  # (guards main() catching gin's ValueError: without it, a traceback and no exit status 2).
  for line in ('TopKMoE.num_expertz = 3', 'TopKMoEE.num_experts = 3'):
    f = tmp_path / 'typo.gin'
    f.write_text(f"include 'runs/tiny.gin'\n{line}\n")
    rc = main(['count', f'--gin_file={f}'])
    err = capsys.readouterr().err
    assert rc == 2 and line in err and f'{f}", line 2' in err and 'Traceback' not in err


def test_count_errors_name_what_is_missing(capsys, tmp_path):
  # Each case guards one `p.error` of _count; without it the count crashes with a traceback
  # (int(None) for the context, count(None) for the model).
  with pytest.raises(SystemExit) as e:
    main(['count'])
  assert e.value.code == 2 and '--gin_file is required' in capsys.readouterr().err
  # A setting binds its sizes and MAX_LENGTH but no MODEL: the user forgot the model file.
  rc = _exit_code(['count', '--gin_file=models/csordas2023/enwik8/setting.gin'])
  assert rc == 2 and 'bind no MODEL' in capsys.readouterr().err
  model_only = tmp_path / 'model_only.gin'
  model_only.write_text('MODEL = @TransformerLM\n')  # no MAX_LENGTH, no TASK_FEATURE_LENGTHS
  assert _exit_code(['count', f'--gin_file={model_only}']) == 2
  assert 'no context length' in capsys.readouterr().err


def test_count_context_length_precedence(capsys):
  # Attention FLOPs scale with the context: --context_length, else TASK_FEATURE_LENGTHS
  # targets, else MAX_LENGTH (a swapped `or` chain would count tiny.gin at 2048 keys).
  def context(*args):
    assert main(['count', '--json', *args]) == 0
    return json.loads(capsys.readouterr().out)['context_length']
  assert context('--gin_file=runs/tiny.gin') == 128
  assert context('--gin_file=runs/tiny.gin', '--context_length=32') == 32
  assert context('--gin_file=models/decoder.gin', '--gin_file=ffn/dense.gin') == 2048


def test_missing_gin_file_names_the_file(capsys):
  rc = main(['count', '--gin_file=runs/no_such_file.gin'])
  err = capsys.readouterr().err
  assert rc == 2 and 'no_such_file.gin' in err


def test_impossible_config_names_the_value(capsys):
  rc = main(['count', '--gin_file=runs/tiny.gin', '--gin.TOP_K=9'])
  err = capsys.readouterr().err
  assert rc == 2 and 'top_k=9' in err and 'num_experts=8' in err


# A paper's training recipe reads macros of that paper's model files: it joins one of them.
_RECIPE_MODELS = {'runs/csordas2023.gin': 'models/small/csordas_sigma_moe.gin',
                  'runs/artetxe2022.gin': 'models/small/artetxe_moe.gin'}


def _gin_sets():
  """Every shipped gin file but the pair files (gin/pairs/: they bind only `Pair`; every one is
  loaded and checked by test_pairs), as a parseable set: fragments get a model to join."""
  sets = []
  for path in sorted(GIN.rglob('*.gin')):
    rel = path.relative_to(GIN).as_posix()
    if rel.startswith('pairs/'):
      continue
    if rel == 'runs/pretrain.gin':
      sets.append(['models/decoder.gin', 'ffn/dense.gin', rel])
    elif rel in _RECIPE_MODELS:
      sets.append([_RECIPE_MODELS[rel], rel])
    elif rel.startswith('ffn/'):
      sets.append(['models/decoder.gin', rel])
    elif rel.startswith('sizes/'):
      sets.append(['models/decoder.gin', 'ffn/dense.gin', rel])
    elif rel.endswith('/setting.gin'):  # Csordás's settings: macros a model file applies last
      sets.append(['models/csordas2023/families/sigma_moe.gin', rel])
    else:
      sets.append([rel])
  return sets


@pytest.mark.parametrize('files', _gin_sets(), ids=lambda f: f[-1])
def test_every_shipped_gin_file_parses_and_builds_abstractly(files):
  required = ["MODEL_DIR = '/tmp/unused'", "MIXTURE_OR_TASK_NAME = 'x'",
              "TASK_FEATURE_LENGTHS = {'targets': 64}", 'TRAIN_STEPS = 1']
  gin_config.parse(files, required)
  # Never skipped: a model, run or fragment file that lost its MODEL binding (or its include
  # of models/decoder.gin) fails here instead of passing as 'not a model'.
  model_fn = gin_config.query('MODEL')
  assert model_fn is not None, f'{files} bind no MODEL'
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
  assert {('moe_top2', 'fused'), ('moe_top2', 'fused@capacity'),
          ('moe_top2', 'fused:kernels=xla'), ('dense_ffn', 'DenseFFN'),
          ('peak_matmul', 'fp32_square'), ('train_step', 'dense'),
          ('train_step', 'topk_moe')} <= names
  assert all(r['ratio'] is None or r['ratio'] > 0 for r in records)
  for r in records:
    if r['name'] == 'train_step':
      # MFU against a square matmul timed in the same rounds: a step cannot run its matmuls
      # much faster than the machine's best one, and it must hold at least its own state.
      assert 0 < r['mfu'] < 1.5, r
      assert r['peak_memory_bytes'] is None or r['peak_memory_bytes'] >= r['state_bytes'], r
