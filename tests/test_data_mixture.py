"""A seqio mixture trains in its proportions and resumes in O(1) (moescale.data.mixture): every
document of every task is read by one host once per task epoch, a resumed iterator continues
exactly, resuming at batch 10,000 builds only that batch's rows, and the trainer resumes a
mixture run to the losses of an uninterrupted one."""

import collections
import functools
import json
import time
import uuid

import numpy as np
import pytest

L = 32


def _write(path, docs):
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
  return str(path)


@pytest.fixture(scope='module')
def mix(tmp_path_factory):
  """Two tasks, 3 : 1, with documents shorter than a row (one chunk each, though a row may
  end inside one): task a's text is upper case, task b's lower case."""
  import seqio
  from moescale.data import tasks
  root = tmp_path_factory.mktemp('mix')
  tag = uuid.uuid4().hex[:8]
  docs = {'a': [f'A{i:03d} ALPHA BETA' for i in range(50)],
          'b': [f'b{i:03d} gamma' for i in range(23)]}
  for t in docs:
    tasks.register_text_task(f'test_mix_{t}_{tag}', _write(root / f'{t}.txt', docs[t]))
  name = f'test_mix_{tag}'
  seqio.MixtureRegistry.add(name, [(f'test_mix_a_{tag}', 3.0), (f'test_mix_b_{tag}', 1.0)])
  return name, docs


def _iterator(name, rows, shard_id=0, num_shards=1, seed=0, position=None, src=None):
  from moescale.data import source as source_lib
  src = src or source_lib.SeqioDataSource(name, {'targets': L})
  return src.train_iterator(rows, shard_id, num_shards, seed=seed, position=position)


def _text(tokens):
  """Byte-vocabulary text of real tokens; EOS (1) as NUL."""
  return bytes(int(t) - 3 if t > 1 else 0 for t in tokens if t != 0).decode()


def test_the_schedule_and_its_weights():
  from moescale.data import mixture
  np.testing.assert_array_equal(mixture.integer_weights([3, 1]), [7500, 2500])
  # Largest remainder: 1/3 each is 3333.33 -> the first gets the leftover row.
  np.testing.assert_array_equal(mixture.integer_weights([1, 1, 1]), [3334, 3333, 3333])
  # A tiny rate still gets a row a period; the others pay for it.
  w = mixture.integer_weights([1e-9, 1.0])
  assert list(w) == [1, 9999]
  # The module docstring's worked example.
  np.testing.assert_array_equal(mixture.row_schedule(np.array([7500, 2500]))[:8],
                                [0, 0, 1, 0, 0, 0, 1, 0])
  for rates in ([3, 1], [0.5, 0.3, 0.2], [1, 2, 3, 4, 5, 6, 7], [1e-3, 1, 1]):
    weights = mixture.integer_weights(rates)
    schedule = mixture.row_schedule(weights)
    counts = np.cumsum(schedule[:, None] == np.arange(len(rates)), axis=0)
    share = np.arange(1, len(schedule) + 1)[:, None] * weights / weights.sum()
    assert np.abs(counts - share).max() < 1.0, rates   # every prefix within a row of its share
  for bad in ([], [1, 0], [1, -2], [float('nan')]):
    with pytest.raises(ValueError, match='positive rate'):
      mixture.integer_weights(bad)


@pytest.mark.parametrize('num_shards', [1, 2, 4])
def test_proportions_and_every_document_once_per_task_epoch(mix, num_shards):
  name, docs = mix
  read = {t: collections.Counter() for t in docs}
  for h in range(num_shards):
    it = _iterator(name, 4, h, num_shards)
    assert type(it).__name__ == 'MixtureIterator'
    per_epoch = dict(zip('ab', it.task_rows_per_epoch))
    rows = {t: [] for t in docs}
    while min(len(rows[t]) - per_epoch[t] for t in docs) < 0:
      batch = next(it)
      # 3 : 1 over 4 rows: the schedule's a, a, b, a in every batch, and each row holds its
      # task's text only.
      for t, row in zip('aaba', batch['decoder_target_tokens']):
        text = _text(row)
        assert text and not any(c.islower() if t == 'a' else c.isupper() for c in text), (t, text)
        rows[t].append(row)
    for t in docs:
      # Within an epoch a task's rows are consecutive pieces of its stream of chunks.
      stream = _text(np.concatenate(rows[t][:per_epoch[t]]))
      first_epoch = stream.rstrip('\0').split('\0')
      assert len(first_epoch) == len(set(first_epoch))   # nothing twice within the epoch
      read[t].update(first_epoch)
  for t in docs:
    assert read[t] == collections.Counter(docs[t]), t    # every document once, by one host


def test_resume_continues_exactly_and_checks_what_it_resumes(mix):
  from moescale.data import mixture, source as source_lib
  name = mix[0]
  src = source_lib.SeqioDataSource(name, {'targets': L})
  it = _iterator(name, 3, 1, 2, seed=5, src=src)
  late = 2 * max(it.task_rows_per_epoch)      # past the end of both tasks' first epochs
  past_period = mixture.PERIOD // 3 + 1        # the schedule's second period (3 rows a batch)
  uninterrupted = [next(it) for _ in range(past_period + 2)]
  for at in (0, 1, 7, late, past_period):
    it = _iterator(name, 3, 1, 2, seed=5, src=src)
    for _ in range(at):
      next(it)
    saved = json.loads(json.dumps(it.position()))   # what a checkpoint's meta holds
    assert saved['mixture_steps'] == at and saved['tasks'][0][1] == 7500
    resumed = _iterator(name, 3, 1, 2, seed=5, position=saved, src=src)
    for want in uninterrupted[at:at + 2]:
      got = next(resumed)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'{k} at {at}')
  # Another host or seed reads other rows.
  first = uninterrupted[0]['decoder_target_tokens']
  assert (next(_iterator(name, 3, 0, 2, seed=5, src=src))['decoder_target_tokens'] != first).any()
  assert (next(_iterator(name, 3, 1, 2, seed=6, src=src))['decoder_target_tokens'] != first).any()
  with pytest.raises(ValueError, match='seed'):
    _iterator(name, 3, 1, 2, seed=4, position=saved, src=src)
  with pytest.raises(ValueError, match='num_shards'):
    _iterator(name, 3, 0, 3, seed=5, position=saved, src=src)
  other = dict(saved, tasks=[['x', 5000], ['y', 5000]])
  with pytest.raises(ValueError, match='tasks'):
    _iterator(name, 3, 1, 2, seed=5, position=other, src=src)


def test_resuming_late_builds_only_the_next_batch(mix, monkeypatch):
  """O(1): a resume at batch 10 and one at batch 10,000,000 read the same number of rows (one
  batch's) and take the same time (within noise; printed for the record)."""
  from moescale.data import sharded, source as source_lib
  name = mix[0]
  src = source_lib.SeqioDataSource(name, {'targets': L})
  start = _iterator(name, 4, src=src).position()
  taken = []
  real = sharded.ShardedIterator.take_rows
  monkeypatch.setattr(sharded.ShardedIterator, 'take_rows',
                      lambda self, first, count: taken.append(count) or real(self, first, count))
  seconds = {}
  for steps in (10, 10_000, 10_000_000):
    taken.clear()
    t0 = time.perf_counter()
    batch = next(_iterator(name, 4, position=dict(start, mixture_steps=steps), src=src))
    seconds[steps] = time.perf_counter() - t0
    assert sum(taken) == 4, (steps, taken)          # one batch of rows, no replay
    assert batch['decoder_loss_weights'].any()
  print('mixture resume seconds (tokenized shares cached):', seconds)


def test_the_trainer_resumes_a_mixture_run_exactly(mix, tmp_path):
  from moescale.data import source as source_lib
  from moescale.layers import DenseFFN
  from moescale.model import TransformerLM
  from moescale.train import trainer
  from moescale.train import optim
  src = source_lib.SeqioDataSource(mix[0], {'targets': L}, eval_splits=())
  model = functools.partial(TransformerLM, vocab_size=src.vocab_size, d_model=16, num_layers=1,
                            num_heads=2, ffn=functools.partial(DenseFFN, d_ff=32))
  cfg = lambda d, steps: trainer.TrainConfig(
      model_dir=str(d), train_steps=steps, batch_size=4, log_period=1, checkpoint_period=2,
      mesh=trainer.MeshConfig(num_devices=1), tensorboard=False, progress=False,
      optimizer=optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=1))
  trainer.train(model, src, cfg(tmp_path / 'a', 5))
  trainer.train(model, src, cfg(tmp_path / 'b', 2))
  meta = json.loads((tmp_path / 'b' / 'checkpoints' / '2' / 'meta' / 'metadata').read_text())
  assert meta['data_position']['mixture_steps'] == 2
  trainer.train(model, src, cfg(tmp_path / 'b', 5))
  losses = {d: {r['step']: r['loss'] for r in map(json.loads, open(tmp_path / d / 'metrics.jsonl'))
                if 'loss' in r} for d in 'ab'}
  assert sorted(losses['b']) == [1, 2, 3, 4, 5] and losses['b'] == losses['a']
