"""Per-host document shards and O(1) resume (moescale.data.sharded): each document is read by
exactly one host per epoch, a resumed iterator continues exactly, resuming late costs what
resuming early does, and positions saved before sharding still resume."""

import collections
import json
import time
import uuid

import numpy as np
import pytest

L = 32


def _write(path, docs):
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
  return str(path)


def _short_docs(n):
  """Distinct documents shorter than L bytes with their EOS: one chunk each."""
  words = 'alpha beta gamma delta epsilon zeta eta theta'.split()
  return [f'd{i:04d} {words[i % 8]} {words[(i * 3) % 8]}' for i in range(n)]


@pytest.fixture(scope='module')
def short_task(tmp_path_factory):
  from moescale.data import tasks
  root = tmp_path_factory.mktemp('short')
  docs = _short_docs(60)
  name = f'test_resume_{uuid.uuid4().hex[:8]}'
  tasks.register_text_task(name, _write(root / 'train.txt', docs),
                           _write(root / 'valid.txt', docs[:4]))
  return name, docs


@pytest.fixture(scope='module')
def long_task(tmp_path_factory):
  """Documents of 4 to 200 bytes, most longer than a row: chunks cross rows."""
  from moescale.data import tasks
  rng = np.random.default_rng(0)
  docs = [f'D{i} ' + 'xyz' * int(rng.integers(1, 66)) for i in range(40)]
  root = tmp_path_factory.mktemp('long')
  name = f'test_resume_long_{uuid.uuid4().hex[:8]}'
  tasks.register_text_task(name, _write(root / 'train.txt', docs))
  return name, docs


def _iterator(name, rows, shard_id=0, num_shards=1, seed=0, position=None, length=L, src=None):
  """A train iterator of a fresh data source (nothing cached), or of `src`."""
  from moescale.data import source as source_lib
  src = src or source_lib.SeqioDataSource(name, {'targets': length})
  return src.train_iterator(rows, shard_id, num_shards, seed=seed, position=position)


def _check_packed(batch, rows, length):
  """The invariants of seqio's packed decoder features, on every row."""
  tgt, inp = batch['decoder_target_tokens'], batch['decoder_input_tokens']
  seg, pos = batch['decoder_segment_ids'], batch['decoder_positions']
  assert tgt.shape == (rows, length) and all(v.dtype == np.int32 for v in batch.values())
  real = tgt != 0
  np.testing.assert_array_equal(batch['decoder_loss_weights'], real)
  assert (seg[real] > 0).all() and (seg[~real] == 0).all() and (pos[~real] == 0).all()
  for r in range(rows):
    for s in np.unique(seg[r][seg[r] > 0]):
      idx = np.flatnonzero(seg[r] == s)
      assert (np.diff(idx) == 1).all()
      np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
      np.testing.assert_array_equal(inp[r, idx], [0, *tgt[r, idx[:-1]]])


def _epoch_stream(it):
  """One epoch of a host's batches, as its real tokens in order (padding is at the end)."""
  batches = [next(it) for _ in range(it.batches_per_epoch)]
  for b in batches:
    _check_packed(b, it.rows, it.length)
  tokens = np.concatenate([b['decoder_target_tokens'].ravel() for b in batches])
  assert (tokens[np.flatnonzero(tokens == 0)[0]:] == 0).all() if (tokens == 0).any() else True
  return tokens[tokens != 0]


def _decode(stream):
  """Byte-vocabulary documents of a token stream, split at EOS (1)."""
  text = bytes(int(t) - 3 if t != 1 else 0 for t in stream).decode()
  assert text.endswith('\0')
  return text[:-1].split('\0')


@pytest.mark.parametrize('num_shards', [1, 2, 4])
def test_every_document_read_by_one_host_once_per_epoch(short_task, num_shards):
  from moescale.data import sharded
  name, docs = short_task
  shares = [sharded.share_tokens(name, 'train', shard_id=h, num_shards=num_shards)
            for h in range(num_shards)]
  assert all(shares) and sum(len(s) for s in shares) == len(docs)   # each host reads a share
  read = collections.Counter()
  for h in range(num_shards):
    it = _iterator(name, 2, h, num_shards)
    assert type(it).__name__ == 'ShardedIterator'
    host_docs = _decode(_epoch_stream(it))
    assert sorted(host_docs) == sorted(bytes(int(t) - 3 for t in d[:-1]).decode()
                                       for d in shares[h])
    read.update(host_docs)
  assert read == collections.Counter(docs)


def test_long_documents_are_chunked_and_nothing_is_lost(long_task):
  from moescale.data import sharded
  name, docs = long_task
  want = collections.Counter(t for d in docs for t in [*(b + 3 for b in d.encode()), 1])
  got = collections.Counter()
  for h in range(2):
    it = _iterator(name, 3, h, 2, length=16)
    assert it.batches_per_epoch == -(-it.tokens_per_epoch // (3 * 16))
    first = _epoch_stream(it)
    got.update(first.tolist())
    # The next epoch has the same tokens in another order.
    second = _epoch_stream(it)
    assert sorted(first) == sorted(second) and (first != second).any()
  assert got == want
  # Chunks of a row are at most `length` and segments start at chunk starts: a document's
  # first byte ('D') always opens a segment.
  it = _iterator(name, 3, 0, 1, length=16)
  for _ in range(it.batches_per_epoch):
    b = next(it)
    d_at = b['decoder_target_tokens'] == ord('D') + 3
    assert (b['decoder_positions'][d_at] == 0).all()
  start, size = sharded._chunks(np.array([5, 16, 17, 1]), 16)
  np.testing.assert_array_equal(start, [0, 5, 21, 37, 38])
  np.testing.assert_array_equal(size, [5, 16, 16, 1, 1])


def test_resume_continues_exactly(short_task):
  from moescale.data import source as source_lib
  name = short_task[0]
  # One source: its cached share of the documents is what a resume in the same process uses;
  # a fresh process tokenizes the share again (the timing test's case).
  src = source_lib.SeqioDataSource(name, {'targets': L})
  it = _iterator(name, 2, 1, 2, seed=3, src=src)
  per_epoch = it.batches_per_epoch
  uninterrupted = [next(it) for _ in range(2 * per_epoch + 3)]
  for at in (0, 1, per_epoch - 1, per_epoch, 2 * per_epoch + 1):
    it = _iterator(name, 2, 1, 2, seed=3, src=src)
    for _ in range(at):
      next(it)
    saved = json.loads(json.dumps(it.position()))   # what a checkpoint's meta holds
    assert saved['sharded_steps'] == at
    resumed = _iterator(name, 2, 1, 2, seed=3, position=saved, src=src)
    for want in uninterrupted[at:at + 2]:
      got = next(resumed)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'{k} at {at}')
  # Epochs differ in order; another host or seed reads other rows.
  assert (uninterrupted[0]['decoder_target_tokens']
          != uninterrupted[per_epoch]['decoder_target_tokens']).any()
  other = next(_iterator(name, 2, 0, 2, seed=3, src=src))['decoder_target_tokens']
  assert (other != uninterrupted[0]['decoder_target_tokens']).any()
  with pytest.raises(ValueError, match='seed'):
    _iterator(name, 2, 1, 2, seed=4, position=saved, src=src)
  with pytest.raises(ValueError, match='num_shards'):
    _iterator(name, 1, 0, 4, seed=3, position=saved, src=src)


def _resume_seconds(name, steps, repeats=2):
  """Best of `repeats`: a fresh data source (nothing cached), the iterator, one batch."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    next(_iterator(name, 1, length=8, position={'sharded_steps': steps, 'seed': 0}))
    best = min(best, time.perf_counter() - start)
  return best


def test_resume_cost_does_not_grow_with_the_position():
  # The embedded corpus's 11.5M training tokens: 1.4M one-row batches of 8 tokens an epoch,
  # so the positions reach from the start through the epoch into the 8th epoch.
  per_epoch = _iterator('moescale_sotu', 1, length=8).batches_per_epoch
  positions = (10, 10_000, per_epoch - 1, 7 * per_epoch + 12_345)
  seconds = [_resume_seconds('moescale_sotu', p) for p in positions]
  print('resume seconds at', dict(zip(positions, (round(t, 3) for t in seconds))))
  assert max(seconds) < 3 * min(seconds)


def test_positions_saved_before_sharding_still_resume(short_task):
  from moescale.data import pipeline, sharded
  name = short_task[0]
  old = pipeline.DataPipeline(name, {'targets': L}, 'train', 4, seed=0, shuffle=True,
                              shard_id=1, num_shards=2)
  for _ in range(3):
    next(old)
  saved = json.loads(json.dumps(old.position()))
  want = next(old)
  resumed = _iterator(name, 2, 1, 2, position=saved)
  assert isinstance(resumed, pipeline.DataPipeline)    # the old run's data, continued
  got = next(resumed)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert resumed.position()['batches_consumed'] == 4
  with pytest.raises(ValueError, match='DataPipeline position'):
    sharded.ShardedIterator([np.ones(3, np.int32)], L, 2, state=saved)
