"""Evaluating a run directory: perplexity by domain equals a hand computation over the same
tokens and is the same on 1 and 8 devices; results are kept per checkpoint; multiple-choice
scoring is log P(continuation | context) computed by hand; bad input fails clearly."""

import json
import os
import types

import jax
import numpy as np
import pytest
from flax import nnx

from moescale import cli, evaluate
from moescale.evaluate import lm, priming
from moescale.evaluate.tasks import Choice, Example, Task
from moescale.layers import DenseFFN
from moescale.train import trainer

TINY = ['--gin_file=runs/tiny.gin', '--gin.TRAIN_STEPS=6', '--gin.LOG_PERIOD=3',
        '--gin.CHECKPOINT_PERIOD=3', '--gin.EVAL_STEPS=1', '--gin.NUM_DEVICES=1',
        '--gin.PARALLEL_MICROBATCHES=1']
EIGHT = trainer.MeshConfig(num_devices=8)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tiny'))
  assert cli.main(['train', *TINY, f"--gin.MODEL_DIR='{d}'"]) == 0
  return d


def _hand_loss(run, task_split, batches):
  """Mean cross-entropy of the run's model over the first `batches` eval batches of a task,
  from the pipeline's own rows and a plain log-softmax."""
  model = run.model
  it = run.data.eval_iterators(run.config.batch_size)[task_split]
  xent = weight = 0.0
  for i, b in enumerate(it):
    if i == batches:
      break
    out = model(b['decoder_input_tokens'], segment_ids=b['decoder_segment_ids'],
                positions=b['decoder_positions'])
    logp = np.asarray(jax.nn.log_softmax(out.logits))
    picked = np.take_along_axis(logp, b['decoder_target_tokens'][..., None], -1)[..., 0]
    xent -= float((picked * b['decoder_loss_weights']).sum())
    weight += float(b['decoder_loss_weights'].sum())
  return xent / weight, weight


def test_perplexity_by_domain_is_the_hand_computed_loss_on_any_mesh(run_dir):
  tasks = ['validation', 'moescale_kjv:validation']
  run8 = evaluate.load_run(run_dir, mesh=EIGHT)
  assert run8.step == 6 and run8.mesh.size == 8
  got = evaluate.perplexity(run8, tasks, max_batches=2)
  for task in tasks:
    want, tokens = _hand_loss(run8, task, 2)
    assert got[task]['eval_loss'] == pytest.approx(want, rel=1e-5)
    assert got[task]['eval_tokens'] == tokens
    assert got[task]['perplexity'] == pytest.approx(np.exp(got[task]['eval_loss']), rel=1e-9)
  assert got['validation']['eval_loss'] != got['moescale_kjv:validation']['eval_loss']
  run1 = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1))
  one = evaluate.perplexity(run1, tasks, max_batches=2)
  for task in tasks:   # float32 sums in another order: the loss agrees to ~1e-5
    assert one[task]['eval_tokens'] == got[task]['eval_tokens']
    for metric, value in got[task].items():
      assert one[task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
  # An earlier checkpoint is another model.
  early = evaluate.perplexity(evaluate.load_run(run_dir, step=3, mesh=EIGHT), tasks,
                              max_batches=2)
  assert early['validation']['eval_loss'] > got['validation']['eval_loss']


def test_eval_command_writes_one_file_per_checkpoint_and_merges_tasks(run_dir, capsys):
  base = ['eval', run_dir, '--max_batches=1', '--num_devices=1']
  assert cli.main([*base, '--tasks=validation']) == 0
  assert 'validation' in capsys.readouterr().out
  assert cli.main([*base, '--tasks=moescale_pydoc:validation', '--step=3']) == 0
  capsys.readouterr()
  assert cli.main([*base, '--tasks=moescale_kjv:validation', '--json']) == 0
  printed = json.loads(capsys.readouterr().out)
  assert printed['step'] == 6 and set(printed['results']) == {'moescale_kjv:validation'}
  files = sorted(os.listdir(os.path.join(run_dir, 'eval')))
  assert files == ['perplexity_step3.json', 'perplexity_step6.json']
  latest = json.load(open(os.path.join(run_dir, 'eval', 'perplexity_step6.json')))
  assert latest['step'] == 6
  assert set(latest['results']) == {'validation', 'moescale_kjv:validation'}
  early = json.load(open(os.path.join(run_dir, 'eval', 'perplexity_step3.json')))
  assert set(early['results']) == {'moescale_pydoc:validation'}


def test_bad_run_directories_fail_clearly(tmp_path, run_dir):
  with pytest.raises(evaluate.RunError, match='no config.gin'):
    evaluate.load_run(str(tmp_path))
  (tmp_path / 'config.gin').write_text(open(os.path.join(run_dir, 'config.gin')).read())
  with pytest.raises(evaluate.RunError, match='no checkpoints'):
    evaluate.load_run(str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')      # nothing created by the attempt
  with pytest.raises(evaluate.RunError, match=r'no checkpoint of step 4; it has \[3, 6\]'):
    evaluate.load_run(run_dir, step=4)
  assert cli.main(['eval', str(tmp_path)]) == 2


# Room for every token at every expert: a capacity-limited MoE drops tokens depending on the
# other rows of a batch, so the by-hand reference (one prompt at a time) would differ.
NO_DROPS = ['TopKMoE.eval_capacity_factor = 8.0']


def test_scores_are_the_continuations_log_likelihood_by_hand(run_dir):
  run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1), bindings=NO_DROPS)
  vocab = run.vocabulary
  pairs = [('The Congress', ' shall'), ('We', ' the people of the United States'),
           ('x' * 300, ' end')]                            # longer than the 128-token rows
  got = priming.score(run, pairs, batch_size=2)
  model = run.model
  for i, (ctx, cont) in enumerate(pairs):
    full = (list(vocab.encode(ctx)) + list(vocab.encode(cont)))[-128:]
    inputs = np.array([[0] + full[:-1]])
    logp = np.asarray(jax.nn.log_softmax(model(inputs).logits))[0]
    n = len(vocab.encode(cont))
    want = sum(logp[t, full[t]] for t in range(len(full) - n, len(full)))
    assert got['sum'][i] == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert got['per_token'][i] == pytest.approx(want / n, rel=1e-5, abs=1e-4)
    assert got['per_byte'][i] == pytest.approx(want / len(cont.encode()), rel=1e-5, abs=1e-4)
  eight = priming.score(evaluate.load_run(run_dir, mesh=EIGHT, bindings=NO_DROPS), pairs)
  np.testing.assert_allclose(eight['sum'], got['sum'], rtol=1e-5)


def _toy_task():
  """Which word follows: the model is scored on fixed strings, so the accuracy only has to be
  deterministic and consistent with the scores, not high."""
  ex = lambda i, label: Example(tuple(Choice(f'Item {i}:', f' {w}') for w in
                                      ('the', 'xqzj', 'of', 'a')), label, id=str(i))
  train = tuple(ex(i, 0) for i in range(6))
  return Task('toy', {'train': train, 'validation': tuple(ex(i, i % 4) for i in range(8))},
              shots_split='train', eval_split='validation')


def test_priming_accuracy_follows_the_scores_and_the_shot_draws(run_dir):
  run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1))
  task = _toy_task()
  zero = priming.prime(run, task)
  assert zero['draws'] == 1 and zero['examples'] == 8 and zero['chance'] == 0.25
  # By hand: the argmax of each example's scores against its label.
  pairs = [(c.context, c.continuation) for e in task.examples('validation') for c in e.choices]
  scores = priming.score(run, pairs)['per_token'].reshape(8, 4)
  labels = np.array([e.label for e in task.examples('validation')])
  assert zero['accuracy']['per_token']['mean'] == np.mean(scores.argmax(1) == labels)
  few = priming.prime(run, task, shots=2, draws=3, seed=5)
  assert few['draws'] == 3 and len(few['accuracy']['sum']['per_draw']) == 3
  assert priming.prime(run, task, shots=2, draws=3, seed=5) == few      # seeded
  with pytest.raises(ValueError, match="7 shots asked, but the 'train' split"):
    priming.prime(run, task, shots=7)


def _toy_classification():
  """Label words after a number's parity: a task a few steps can move the model on."""
  ex = lambda i: Example(tuple(Choice(f'{i} is', w) for w in (' even', ' odd')), i % 2,
                         id=str(i))
  return Task('parity', {'train': tuple(ex(i) for i in range(40)),
                         'validation': tuple(ex(i) for i in range(100, 112))},
              shots_split='train', eval_split='validation', labels=('even', 'odd'))


def _flat(params):
  from moescale.train.optim import path_str
  return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_finetune_writes_a_new_run_and_freezes_what_it_is_told(run_dir, tmp_path):
  from moescale.evaluate import finetune as ft
  run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1))
  before = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(run_dir)
            for f in fs if 'eval' not in dp}
  cfg = ft.FinetuneConfig(steps=3, batch_size=8, learning_rate=1e-2, freeze_router=True,
                          expert_lr_scale=0.0)
  out = str(tmp_path / 'ft')
  result = ft.finetune(run, _toy_classification(), out, cfg, shots=2, draws=2)
  assert set(result['pretrained']) == {'0shot', '2shot'}
  assert result['finetuned']['examples'] == 12 and result['pretrained_step'] == 6
  assert json.load(open(os.path.join(out, 'finetune.json')))['task'] == 'parity'
  tuned = evaluate.load_run(out, mesh=trainer.MeshConfig(num_devices=1))   # a run like any
  assert tuned.step == 3
  old, new = _flat(run.state.params), _flat(tuned.state.params)
  moe = [k for k in old if '/ffn/' in k and k.split('/ffn/')[0] + '/ffn/w_router/value' in old]
  assert moe and any('w_router' in k for k in moe)
  for k in moe:                        # routers frozen, experts at learning rate 0
    np.testing.assert_array_equal(new[k], old[k], err_msg=k)
  changed = [k for k in old if k not in moe and not np.array_equal(new[k], old[k])]
  assert any('attention' in k for k in changed)
  # The pretrained run directory was only read.
  after = {f: os.path.getmtime(os.path.join(dp, f)) for dp, _, fs in os.walk(run_dir)
           for f in fs if 'eval' not in dp}
  assert after == before
  with pytest.raises(ValueError, match='already holds a run'):
    ft.finetune(run, _toy_classification(), out, cfg)
  with pytest.raises(ValueError, match='inside the pretrained run'):
    ft.finetune(run, _toy_classification(), os.path.join(run_dir, 'ft'), cfg)
  dense_layer = DenseFFN(8, 16, rngs=nnx.Rngs(0))
  dense = types.SimpleNamespace(run_dir=str(tmp_path / 'dense'),
                                model=types.SimpleNamespace(ffn_layers=lambda: [(0, dense_layer)]))
  with pytest.raises(ValueError, match='expert_dropout=0.1 needs a MoE layer'):
    ft.finetune(dense, _toy_classification(), str(tmp_path / 'x'),
                ft.FinetuneConfig(expert_dropout=0.1))


def test_prime_command_on_a_built_in_task(run_dir, capsys):
  base = ['prime', run_dir, '--num_devices=1', '--task=corpus_source', '--max_examples=9']
  assert cli.main([*base, '--shots=0,1', '--draws=2', '--json']) == 0
  printed = json.loads(capsys.readouterr().out)
  zero, one = printed['results']['corpus_source/0shot'], printed['results']['corpus_source/1shot']
  assert zero['examples'] == 9 and zero['chance'] == pytest.approx(1 / 3)
  assert one['draws'] == 2 and len(one['accuracy']['per_token']['per_draw']) == 2
  saved = json.load(open(os.path.join(run_dir, 'eval', 'priming_step6.json')))
  assert set(saved['results']) == {'corpus_source/0shot', 'corpus_source/1shot'}
  assert cli.main([*base, '--shots=100000']) == 2
  assert "100000 shots asked, but the 'train' split" in capsys.readouterr().err
  assert cli.main(['prime', run_dir, '--task=nope']) == 2
  assert 'sotu_next_sentence' in capsys.readouterr().err


def test_own_text_domain_bf16_and_a_foreign_vocabulary(run_dir, tmp_path, capsys):
  text = tmp_path / 'letters.txt'
  text.write_text('Dear Sir, I write to you about the weather.\n\nYours, a friend.\n')
  assert cli.main(['eval', run_dir, '--num_devices=1', f'--text=letters={text}', '--json',
                   '--no_save']) == 0
  res = json.loads(capsys.readouterr().out)['results']
  # Every byte of both paragraphs and their EOS ids is scored.
  assert set(res) == {'letters:validation'}
  assert res['letters:validation']['eval_tokens'] == len('Dear Sir, I write to you about the '
                                                          'weather.Yours, a friend.') + 2
  run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1))
  f32 = evaluate.perplexity(run, ['validation'], max_batches=1)['validation']['eval_loss']
  bf16_run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1),
                               model_overrides={'dtype': 'bfloat16'})
  bf16 = evaluate.perplexity(bf16_run, ['validation'], max_batches=1)['validation']['eval_loss']
  assert bf16 != f32 and bf16 == pytest.approx(f32, rel=2e-2)
  # A vocabulary larger than the checkpoint's embedding is not the one it was trained with.
  import dataclasses
  import types
  foreign = dataclasses.replace(run, data_factory=lambda: types.SimpleNamespace(vocab_size=8000))
  with pytest.raises(ValueError, match='has 8000 ids but the checkpoint.s embedding has 264'):
    foreign.data


def test_finetune_with_a_classification_head(run_dir, tmp_path):
  from moescale.evaluate import classifier
  from moescale.evaluate import finetune as ft
  run = evaluate.load_run(run_dir, mesh=trainer.MeshConfig(num_devices=1))
  out = str(tmp_path / 'head')
  cfg = ft.FinetuneConfig(steps=2, batch_size=8, learning_rate=1e-9, head='classifier',
                          expert_dropout=0.4)
  result = ft.finetune(run, _toy_classification(), out, cfg, shots=0)
  tuned = evaluate.load_run(out, mesh=trainer.MeshConfig(num_devices=1))
  # The top-k MoE layers fine-tuned with their expert dropout (its own family's binding).
  assert 'TopKMoE.expert_dropout = 0.4' in open(os.path.join(out, 'config.gin')).read()
  assert {getattr(f, 'expert_dropout', None) for _, f in tuned.model.lm.ffn_layers()} >= {0.4}
  params = _flat(tuned.state.params)
  assert params['head/value'].shape == (run.model.d_model, 2)
  # The LM starts from the pretrained weights (a 1e-9 step leaves them where they were).
  for k, v in _flat(run.state.params).items():
    np.testing.assert_allclose(params['lm/' + k], v, atol=1e-6, err_msg=k)
  # The reported accuracy is the head's argmax at each context's last token, by hand.
  task = _toy_classification()
  model = tuned.model
  hits = 0
  for e in task.examples('validation'):
    ids = np.array([[0] + list(run.vocabulary.encode(e.choices[0].context))])
    hits += int(np.argmax(np.asarray(model(ids).logits)[0, -1]) == e.label)
  assert result['finetuned']['accuracy'] == hits / 12
  with pytest.raises(ValueError, match='needs a classification task'):
    ft.finetune(run, _toy_task(), str(tmp_path / 'mc'), cfg)
  del classifier


def test_classification_rows_target_only_label_indices():
  """The head's logits cover the labels: every target a row holds is a label index (the
  unscored positions 0), else the loss gathers out of range, NaN, and NaN * 0 stays NaN."""
  from moescale.data import vocab as vocab_lib
  from moescale.evaluate import classifier
  feats = classifier.rows(vocab_lib.get_vocabulary('bytes'), ['some context', 'x'], [1, 0], 16)
  scored = feats['decoder_loss_weights'] > 0
  assert scored.sum(axis=1).tolist() == [1, 1]
  assert feats['decoder_target_tokens'][scored].tolist() == [1, 0]
  assert not feats['decoder_target_tokens'][~scored].any()
