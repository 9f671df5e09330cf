"""Python-defined experiments (moescale.study, experiments/*.py): they build the same models as
their gin twins, expand into the expected run directories, and write configs that parse back
to the same runs."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess

import gin
import jax
import pytest
from flax import nnx

import experiment_scripts
from moescale import accounting, gin_config, study
from moescale.study import (REQUIRED, Component, DataSpec, Family, Matching, ModelSpec,
                            ScalingStudy)

ARTETXE = experiment_scripts.load('artetxe2022')
CSORDAS = experiment_scripts.load('csordas2023')


def _gin_twin(paper, small, name):
  size, family = name.split('/')
  if paper == 'csordas':
    return (f'models/small/csordas_{family}.gin' if small
            else f'models/csordas2023/{size}/{family}.gin')
  if small:
    return f'models/small/artetxe_{family}.gin'
  if family == 'dense':
    return f"models/artetxe2022/dense_{size.replace('.', '_')}.gin"
  return f"models/artetxe2022/moe_{ARTETXE.SIZES[size]['moe'].replace('.', '_')}.gin"


def _twins():
  out = []
  for paper, mod in (('artetxe', ARTETXE), ('csordas', CSORDAS)):
    for small in (True, False):
      for e in mod.make_study(small=small).expand():
        out.append(pytest.param(e, _gin_twin(paper, small, e.name),
                                id=f'{paper}:{e.name}'))
  return out


def _abstract(model_fn):
  # Stacked layers: the same modules and shapes, built in a fraction of the time.
  return accounting.abstract_model(functools.partial(model_fn, scan_layers=True))


def _same_model(a, b):
  """Same graph (module types and every static hyperparameter), same parameter shapes."""
  assert nnx.graphdef(a) == nnx.graphdef(b)
  shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m, nnx.Param))
  assert shapes(a) == shapes(b)


@pytest.mark.parametrize('experiment,gin_file', _twins())
def test_python_experiment_and_gin_twin_build_identical_models(experiment, gin_file):
  gin_config.parse([gin_file], [], finalize=False)
  from_gin = gin_config.query('MODEL')
  _same_model(_abstract(from_gin), _abstract(experiment.model_fn()))
  lengths = experiment.lengths()
  a, b = accounting.count(from_gin, *lengths), accounting.count(experiment.model_fn(), *lengths)
  assert (a.total_params, a.active_params, a.flops_breakdown) == (
      b.total_params, b.active_params, b.flops_breakdown)


def test_twin_check_detects_a_changed_hyperparameter():
  e = {x.name: x for x in ARTETXE.make_study(small=True).expand()}['small/moe']
  gin_config.parse(['models/small/artetxe_moe.gin'], [], finalize=False)
  g = _abstract(gin_config.query('MODEL'))
  moe = e.model['sparse_ffn']
  for changed in (e.model.replace(dropout=0.2),
                  e.model.replace(sparse_ffn=moe.replace(second_policy='random'))):
    with pytest.raises(AssertionError):
      _same_model(g, _abstract(changed.constructor()))


def _tiny_study(matching=Matching(), data=None):
  def dense(size):
    return ModelSpec(vocab_size=64, d_model=32, num_layers=size['layers'], num_heads=2,
                     max_length=32, ffn=Component('DenseFFN', d_ff=size['d_ff']))

  def sigma(size):
    return dense(size).replace(sparse_layers='all', sparse_ffn=Component(
        'SigmaMoE', num_experts=4, expert_size=16, top_k=2))

  def moe(size):
    if size['layers'] < 2:
      return None  # a family may skip a size
    return dense(size).replace(sparse_ffn=Component('TopKMoE', num_experts=4,
                                                    expert_size=size['expert_size']))

  return ScalingStudy(
      'tiny', {'s': dict(layers=1, d_ff=64, expert_size=64),
               'm': dict(layers=2, d_ff=64, expert_size=64)},
      [Family('dense', dense, knob='d_ff'), Family('sigma', sigma),
       Family('moe', moe, knob='expert_size')],
      data=data or DataSpec('synthetic', vocab_size=64, length=32),
      train=lambda name, size: dict(train_steps=2, batch_size=8, seed=len(name)),
      matching=matching)


def test_grid_expansion_writes_the_expected_directories(tmp_path):
  st = _tiny_study()
  runs = st.write(str(tmp_path))
  assert [e.name for e, _ in runs] == ['s/dense', 's/sigma', 'm/dense', 'm/sigma', 'm/moe']
  for e, d in runs:
    assert pathlib.Path(d) == tmp_path / e.name
    assert (tmp_path / e.name / 'config.gin').is_file()
    cfg = json.loads((tmp_path / e.name / 'config.json').read_text())
    assert cfg['name'] == e.name and cfg['meta']['family'] == e.name.split('/')[1]
    assert cfg['counts']['total_params'] == accounting.count(e.model_fn(), 32).total_params
    assert cfg['train']['seed'] == 1 and cfg['data']['function'] == 'synthetic_data'
  listing = json.loads((tmp_path / 'study.json').read_text())
  assert [r['name'] for r in listing['runs']] == [e.name for e, _ in runs]


def test_seeds_repeat_each_configuration_seed_by_seed():
  st = dataclasses.replace(_tiny_study(Matching('train_flops')), seeds=(3, 7))
  got = st.expand()
  configs = ['s/dense', 's/sigma', 'm/dense', 'm/sigma', 'm/moe']
  assert [e.name for e in got] == [f'{c}/seed{s}' for s in (3, 7) for c in configs]
  for e in got:
    seed = int(e.name.rsplit('seed', 1)[1])
    assert e.train['seed'] == seed and e.meta['seed'] == seed
    assert e.meta['config'] == e.name.rsplit('/', 1)[0]
  # Seeds share the configuration's matched knob.
  knobs = {e.name: e.meta['matched']['value'] for e in got if 'matched' in e.meta}
  assert knobs['m/moe/seed3'] == knobs['m/moe/seed7']
  for bad in ((), (1, 1), (-1,), (True,)):
    with pytest.raises(ValueError, match='seeds=.*valid: None or distinct integers >= 0'):
      dataclasses.replace(_tiny_study(), seeds=bad)


def test_matching_solves_each_knob_against_the_reference():
  st = _tiny_study(Matching('total_params', reference='sigma'))
  exps = {e.name: e for e in st.expand()}
  for size in ('s', 'm'):
    ref = exps[f'{size}/sigma'].counts.total_params
    got = exps[f'{size}/dense']
    assert got.meta['matched']['knob'] == 'd_ff'
    assert got.counts.total_params == pytest.approx(ref, rel=0.005)
    assert got.model['ffn'].kwargs['d_ff'] == got.meta['matched']['value']
  with pytest.raises(ValueError, match='reference'):
    _tiny_study(Matching('total_params', reference='nope'))


def test_papers_matching_reproduces_the_shipped_derivations():
  exps = {e.name: e for e in ARTETXE.make_study('train_flops', small=True).expand()}
  # gin/pairs/compute_matched/small_artetxe_dense_vs_moe.gin binds EXPERT_SIZE = 254.
  assert exps['small/moe'].meta['matched']['value'] == 254
  exps = {e.name: e for e in CSORDAS.make_study('total_params').expand(['wt103_small'])}
  # The paper's dense d_ff (docs/sources.md#csordas-et-al-2023-parameter-matching).
  assert exps['wt103_small/dense'].meta['matched']['value'] == 2053
  assert exps['wt103_small/pkm_relu_matched'].meta['matched']['value'] == 62


def test_written_config_gin_parses_back_to_the_same_run(tmp_path):
  e = {x.name: x for x in CSORDAS.make_study(small=True).expand()}['small/sigma_moe']
  model_dir = e.write(str(tmp_path / 'run'))
  gin_config.parse([str(tmp_path / 'run' / 'config.gin')])  # finalized: nothing REQUIRED
  _same_model(_abstract(gin_config.query('MODEL')), _abstract(e.model_fn()))
  config = gin.query_parameter('run_training.config').scoped_configurable_fn()
  assert config == e.train_config(model_dir)
  assert config.optimizer.clip_norm == 0.25 and config.optimizer.b2 == 0.999
  assert gin.query_parameter('seqio_data.task_feature_lengths') == {'targets': 64}


def test_paper_scale_config_marks_missing_data_as_required(tmp_path):
  e = {x.name: x for x in ARTETXE.make_study().expand(['125m'])}['125m/moe']
  e.write(str(tmp_path / 'run'))
  text = (tmp_path / 'run' / 'config.gin').read_text()
  assert 'seqio_data.vocabulary = %gin.REQUIRED' in text
  with pytest.raises(ValueError, match='vocabulary'):
    gin_config.parse([str(tmp_path / 'run' / 'config.gin')])
  with pytest.raises(ValueError, match='vocabulary'):
    e.data.build()
  gin_config.parse([str(tmp_path / 'run' / 'config.gin')], finalize=False)
  _same_model(_abstract(gin_config.query('MODEL')), _abstract(e.model_fn()))


def test_run_launches_each_experiment_with_its_config(tmp_path, monkeypatch):
  calls = []

  def fake_train(model_fn, data, cfg, flops_per_token=None):
    calls.append((model_fn, data, cfg, flops_per_token))
    return {'final_step': cfg.train_steps}

  from moescale.train import trainer
  monkeypatch.setattr(trainer, 'train', fake_train)
  st = _tiny_study()
  exps = st.expand(['m'])
  out = st.run(str(tmp_path), exps)
  assert out == [{'final_step': 2}] * 3
  for e, (model_fn, data, cfg, flops) in zip(exps, calls):
    assert cfg.model_dir == str(tmp_path / e.name) and cfg.batch_size == 8
    assert type(data).__name__ == 'SyntheticData' and data.length == 32
    assert flops == e.counts.flops_per_token
    _same_model(_abstract(model_fn), _abstract(e.model_fn()))
    assert (tmp_path / e.name / 'config.json').is_file()


def test_a_trained_study_is_evaluated_from_its_run_directories(tmp_path):
  st = _tiny_study()
  exps = st.expand(['s'])                  # dense and sigma (the MoE skips this size)
  trained = st.run(str(tmp_path), exps[:1])
  results = st.evaluate(str(tmp_path), experiments=exps, max_batches=2)
  assert list(results) == [exps[0].name]   # the untrained run is left out
  got = results[exps[0].name]
  assert got['step'] == 2 and got['priming'] == {}
  assert got['perplexity']['validation']['eval_loss'] == pytest.approx(
      trained[0]['validation/eval_loss'], rel=1e-5)
  saved = tmp_path / exps[0].name / 'eval' / 'perplexity_step2.json'
  assert json.loads(saved.read_text())['results'] == got['perplexity']


def test_experiment_scripts_dry_run_write_directories(tmp_path, capsys):
  assert ARTETXE.main(['--dry_run', '--root', str(tmp_path / 'a')]) == 0
  out = capsys.readouterr().out
  assert '6.7b/moe' in out and '1.1T' in out and 'wrote 10 run directories' in out
  assert (tmp_path / 'a' / '6.7b' / 'moe' / 'config.gin').is_file()
  assert not (tmp_path / 'a' / '2.7b' / 'moe').exists()  # the paper has no 2.7B MoE
  assert CSORDAS.main(['--dry_run', '--small', '--root', str(tmp_path / 'c')]) == 0
  assert 'wrote 7 run directories' in capsys.readouterr().out
  assert len(list((tmp_path / 'c' / 'small').iterdir())) == 7


def test_spec_errors_name_the_bad_value():
  with pytest.raises(ValueError, match="'DenseFFM'"):
    Component('DenseFFM', d_ff=3)
  with pytest.raises(ValueError, match='Component'):
    ModelSpec(vocab_size=3, ffn={'d_ff': 3})
  with pytest.raises(ValueError, match="'tfds'"):
    DataSpec('tfds')
  with pytest.raises(ValueError, match='cannot be written to gin'):
    study._gin_value(object())
  assert study._gin_value((1,)) == '(1,)' and study._gin_value(REQUIRED) == '%gin.REQUIRED'


def test_family_training_overrides_merge_over_the_study_settings():
  # Csordás et al. clip the WikiText-103 small dense and Top-K activation runs at 0.1, every
  # other run at 0.25 (docs/sources.md#csordas-et-al-2023-training-settings).
  runs = {e.name: e.train for e in CSORDAS.make_study().expand()}
  clips = {name: t['optimizer']['clip_norm'] for name, t in runs.items()}
  assert {n for n, c in clips.items() if c == 0.1} == {'wt103_small/dense',
                                                       'wt103_small/topk_activation'}
  assert set(clips.values()) == {0.1, 0.25}
  # The override changes one optimizer key and keeps the others.
  small_dense, small_moe = runs['wt103_small/dense'], runs['wt103_small/sigma_moe']
  assert {**small_dense['optimizer'], 'clip_norm': 0.25} == small_moe['optimizer']
  assert small_dense['optimizer']['learning_rate'] == 2.5e-4
  st = _tiny_study()
  st = dataclasses.replace(st, families=[
      dataclasses.replace(st.families[0], train={'seed': 7, 'optimizer': {'b2': 0.9}}),
      *st.families[1:]])
  exp = {e.name: e for e in st.expand()}
  assert exp['s/dense'].train == {'train_steps': 2, 'batch_size': 8, 'seed': 7,
                                  'optimizer': {'b2': 0.9}}
  assert exp['s/sigma'].train['seed'] == 1


def _resolve(value):
  """A gin parameter with its macros (also inside containers) replaced by their values."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return _resolve(value.scoped_configurable_fn())
  if isinstance(value, dict):
    return {k: _resolve(v) for k, v in value.items()}
  return value


def _assert_same_data(experiment, vocab):
  """The parsed gin's data source and its arguments are the Python experiment's (vocab: the
  vocabulary the test named for a run that must be given one)."""
  data = gin.query_parameter('run_training.data')
  assert data.configurable.name == experiment.data.function
  gin_data = {k: _resolve(gin.query_parameter(f'{experiment.data.function}.{k}'))
              for k in experiment.data.kwargs}
  python_data = dict(experiment.data.kwargs)
  if vocab is not None:
    python_data['vocabulary'] = vocab
  assert gin_data == python_data


def _csordas_runs():
  out = []
  for small in (True, False):
    for e in CSORDAS.make_study(small=small).expand():
      out.append(pytest.param(e, _gin_twin('csordas', small, e.name), id=e.name))
  return out


@pytest.mark.parametrize('experiment,gin_file', _csordas_runs())
def test_csordas_gin_recipe_and_python_study_train_alike(experiment, gin_file):
  """The operative training and data configs: the model file + runs/csordas2023.gin against
  experiments/csordas2023.py's run (both from docs/sources.md#csordas-et-al-2023-training-
  settings)."""
  vocab = 'sp8k.model'  # WikiText-103's SentencePiece model: a run must name one
  needs_vocab = experiment.data.kwargs['vocabulary'] is REQUIRED
  gin_config.parse([gin_file, 'runs/csordas2023.gin'],
                   ["MODEL_DIR = '/tmp/run'"] + [f"VOCABULARY = '{vocab}'"] * needs_vocab,
                   finalize=False)
  evaluate = lambda name: gin.query_parameter(name).scoped_configurable_fn()
  from_gin = evaluate('run_training.config')
  from_python = experiment.train_config('/tmp/run')
  assert from_gin == from_python
  opt = from_gin.optimizer
  # Their recipe, not the generic run defaults (b2 0.98, lr 3e-4, clip 1.0, batch 8).
  assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.decay) == (0.9, 0.999, 1e-8, 0.0,
                                                                    'cosine')
  size = experiment.meta['size']
  if size != 'small':
    assert opt.learning_rate == 2.5e-4 and from_gin.train_steps == 100_000
    assert opt.warmup_steps == (4000 if size == 'wt103_big' else 0)
    assert from_gin.batch_size == (32 if size == 'enwik8' else 64)
    small_dense = size == 'wt103_small' and experiment.meta['family'] in (
        'dense', 'topk_activation')
    assert opt.clip_norm == (0.1 if small_dense else 0.25)
  _assert_same_data(experiment, vocab if needs_vocab else None)


def _artetxe_runs():
  out = []
  for small in (True, False):
    for e in ARTETXE.make_study(small=small).expand():
      out.append(pytest.param(e, _gin_twin('artetxe', small, e.name), id=e.name))
  return out


# The authors' runs (docs/sources.md#artetxe-et-al-2022-training-settings), written out rather
# than read from the study: peak LR, warmup updates, updates, batch (2048-token sequences),
# weight decay, dropout (= attention dropout).
ARTETXE_RUNS = {
    '125m/dense': (6e-4, 750, 572204, 256, 0.01, 0.1),
    '355m/dense': (3e-4, 715, 572204, 256, 0.01, 0.0),
    '1.3b/dense': (2e-4, 357, 286102, 512, 0.01, 0.1),
    '2.7b/dense': (1.6e-4, 357, 286102, 512, 0.01, 0.1),
    '6.7b/dense': (1.2e-4, 187, 143051, 1024, 0.01, 0.1),
    '13b/dense': (1e-4, 187, 143051, 1024, 0.01, 0.1),
    '125m/moe': (6e-4, 750, 572204, 256, 0.01, 0.1),      # 15B
    '355m/moe': (3e-4, 715, 572204, 256, 0.01, 0.0),      # 52B
    '1.3b/moe': (1.6e-4, 2000, 286102, 512, 0.0, 0.1),    # 207B: not its twin's LR, warmup, wd
    '6.7b/moe': (1.2e-4, 187, 143051, 1024, 0.01, 0.1),   # 1.1T (the 2048-token retrain)
}


@pytest.mark.parametrize('experiment,gin_file', _artetxe_runs())
def test_artetxe_gin_recipe_and_python_study_train_alike(experiment, gin_file):
  """The operative training and data configs: the model file + runs/artetxe2022.gin against
  experiments/artetxe2022.py's run, and both against the authors' runs."""
  vocab = 'gpt2_bpe.model'  # their GPT-2 BPE: a paper-scale run must name one
  needs_vocab = experiment.data.kwargs['vocabulary'] is REQUIRED
  files, bindings = [gin_file, 'runs/artetxe2022.gin'], ["MODEL_DIR = '/tmp/run'"]
  if needs_vocab:
    with pytest.raises(ValueError, match='ARTETXE_VOCABULARY'):
      gin_config.parse(files, bindings)
  gin_config.parse(files, bindings + [f"VOCABULARY = '{vocab}'"] * needs_vocab, finalize=False)
  from_gin = gin.query_parameter('run_training.config').scoped_configurable_fn()
  assert from_gin == experiment.train_config('/tmp/run')
  opt = from_gin.optimizer
  # Their recipe, not the generic run defaults (clip 1.0, cosine, decay of matrices only).
  assert (opt.name, opt.b1, opt.b2, opt.eps, opt.decay, opt.end_lr_fraction) == (
      'adamw', 0.9, 0.98, 1e-8, 'linear', 0.0)
  assert opt.clip_norm is None and opt.weight_decay_params == 'all'
  dropout = gin.query_parameter('%DROPOUT')
  assert dropout == experiment.model['dropout'] == experiment.model['attention_dropout']
  if experiment.meta['size'] != 'small':
    assert (opt.learning_rate, opt.warmup_steps, from_gin.train_steps, from_gin.batch_size,
            opt.weight_decay, dropout) == ARTETXE_RUNS[experiment.name]
    # 300B tokens, in whole updates of the batch.
    assert from_gin.train_steps == int(300e9) // (from_gin.batch_size * 2048)
  _assert_same_data(experiment, vocab if needs_vocab else None)


def test_artetxe_step_override_reaches_both_families():
  # The MoE family trains with its own run (RUNS), merged over the dense one: a --train_steps
  # must still win there, and nothing else change.
  runs = {e.name: e.train for e in ARTETXE.make_study(train_steps=7).expand()}
  paper = {e.name: e.train for e in ARTETXE.make_study().expand()}
  assert set(runs) == set(ARTETXE_RUNS)
  for name, train in runs.items():
    assert train == {**paper[name], 'train_steps': 7}


def test_artetxe_pretraining_data_is_registered_in_fairseq_format(tmp_path):
  path = tmp_path / 'mix.txt'
  path.write_text('doc one, paragraph one\nparagraph two\n\ndoc two\n', encoding='utf-8')
  task = ARTETXE.register_pretraining_data([str(path)], None, 'bytes',
                                           name=f'test_artetxe_{tmp_path.name}')
  docs = sorted(list(ex['targets']) for ex in task.get_dataset(
      {'targets': 128}, split='train', shuffle=False).as_numpy_iterator())
  ids = lambda text: [b + 3 for b in text.encode()]
  assert docs == sorted([ids('doc one, paragraph one') + [1] + ids('paragraph two') + [1, 1],
                         ids('doc two') + [1, 1]])


def test_grid_as_scheduler_jobs_runs_and_is_found_by_the_report(tmp_path, capsys):
  """--emit_jobs: one config and one command per run and a SLURM array whose task i runs
  command i (checked by running the script with a fake srun); a command run as a scheduler
  would run it trains the run under the root, where `moescale report ROOT` finds it."""
  from moescale import cli
  from moescale.study import jobs
  exps = _tiny_study().expand()
  root, jobs_dir = tmp_path / 'runs', tmp_path / 'jobs'
  paths = jobs.write_jobs(exps, str(root), str(jobs_dir),
                          jobs.Slurm(nodes=2, gpus_per_node=8, max_parallel=2,
                                     setup=['echo setup-ran']))
  commands = open(paths['commands']).read().splitlines()
  assert len(commands) == len(exps) == 5
  for e, line in zip(exps, commands):
    gin_file = jobs_dir / f"{e.name.replace('/', '__')}.gin"
    assert line == f'moescale train --gin_file={gin_file} --multiprocess'
    assert f"TrainConfig.model_dir = '{root / e.name}'" in gin_file.read_text()
  script = open(paths['sbatch']).read()
  for directive in ('--array=0-4%2', '--nodes=2', '--ntasks-per-node=1', '--gpus-per-node=8'):
    assert f'#SBATCH {directive}\n' in script
  assert '--partition' not in script and '--time' not in script   # unset: cluster default
  fake = tmp_path / 'bin'
  fake.mkdir()
  (fake / 'srun').write_text('#!/bin/bash\necho "srun: $*"\n')
  (fake / 'srun').chmod(0o755)
  out = subprocess.run(['bash', paths['sbatch']], capture_output=True, text=True, check=True,
                       env={**os.environ, 'PATH': f"{fake}:{os.environ['PATH']}",
                            'SLURM_ARRAY_TASK_ID': '3'}).stdout
  assert 'setup-ran' in out and f'srun: bash -c {commands[3]}' in out
  listing = json.loads(open(paths['study']).read())
  assert [r['dir'] for r in listing['runs']] == [str(root / e.name) for e in exps]
  # The scheduler runs task 0 (one host here: no --multiprocess).
  assert cli.main(commands[0].split()[1:-1]) == 0
  assert (root / exps[0].name / 'metrics.jsonl').is_file()
  capsys.readouterr()
  assert cli.main(['report', str(root), '--out', str(tmp_path / 'report')]) == 0
  assert exps[0].name in open(tmp_path / 'report' / 'report.md').read()
  with pytest.raises(ValueError, match='nodes=0'):
    jobs.Slurm(nodes=0)
  jobs.write_jobs(exps[:1], 'gs://bucket/study', str(tmp_path / 'remote'))
  assert "'gs://bucket/study/s/dense'" in open(tmp_path / 'remote' / 's__dense.gin').read()
