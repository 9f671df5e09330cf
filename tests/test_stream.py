"""Transformer-XL training on contiguous streams: the stream's rows continue from batch to
batch, the memory rides in the train state through microbatch splits and checkpoints, and
evaluation carries a longer memory over a whole split, as Csordás et al. train and test."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moescale.data.stream import StreamIterator
from moescale.data.synthetic import SyntheticData
from moescale.layers import DenseFFN
from moescale.model import TransformerLM
from moescale.train import optim, trainer
from moescale.train import memory as memory_lib
from moescale.train import step as step_lib

L = 8          # segment length
VOCAB = 32

XL = functools.partial(
    TransformerLM, vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2,
    positions='relative', mem_len=L, max_length=2 * L, scale_embeddings=False,
    ffn=functools.partial(DenseFFN, d_ff=32))


def _text(n=1201, seed=0):
  """A token stream where memory helps: every token repeats the one 5 positions back, with
  some noise, so a model that sees across the segment boundary predicts better."""
  rng = np.random.default_rng(seed)
  t = rng.integers(0, VOCAB, n)
  for i in range(5, n):
    if rng.random() < 0.9:
      t[i] = t[i - 5]
  return t.astype(np.int32)


class StreamData:
  """A stream data source over fixed token arrays (what SeqioDataSource(stream=True) is)."""

  def __init__(self, train, validation, length=L):
    self.train, self.validation, self.length = train, validation, length

  def train_iterator(self, batch_size, shard_id=0, num_shards=1, seed=0, position=None):
    return StreamIterator(self.train, self.length, batch_size * num_shards, shard_id=shard_id,
                          num_shards=num_shards, state=position)

  def eval_iterators(self, batch_size, shard_id=0, num_shards=1):
    return {'validation': StreamIterator(self.validation, self.length, batch_size * num_shards,
                                         shard_id=shard_id, num_shards=num_shards,
                                         num_epochs=1)}


DATA = StreamData(_text(), _text(401, seed=1))


def _cfg(model_dir, steps, **kw):
  base = dict(model_dir=str(model_dir), train_steps=steps, batch_size=8, log_period=1,
              mesh=trainer.MeshConfig(data=2, fsdp=2, num_devices=4), tensorboard=False,
              progress=False,
              eval_steps=None,  # the whole split
              # constant: a run of 2 steps resumed to 4 follows the 4-step run's schedule
              optimizer=optim.OptimizerConfig(learning_rate=1e-2, decay='constant'))
  base.update(kw)
  return trainer.TrainConfig(**base)


# ------------------------------------------------------------------------------- the stream

def test_each_row_continues_its_own_stream_and_hosts_split_the_rows():
  tokens = np.arange(100, dtype=np.int32)
  it = StreamIterator(tokens, 4, batch_size=3)
  assert it.per_row == 8 and it.tokens == 96           # (100 - 1) // 4 // 3 chunks per row
  batches = [next(it) for _ in range(9)]
  for p, b in enumerate(batches[:8]):
    starts = np.array([0, 32, 64]) + 4 * p
    np.testing.assert_array_equal(b['decoder_input_tokens'], starts[:, None] + np.arange(4))
    np.testing.assert_array_equal(b['decoder_target_tokens'], b['decoder_input_tokens'] + 1)
    assert b['memory_reset'].tolist() == [int(p == 0)] * 3
  # The next epoch starts the rows over, and says so.
  np.testing.assert_array_equal(batches[8]['decoder_input_tokens'],
                                batches[0]['decoder_input_tokens'])
  assert batches[8]['memory_reset'].tolist() == [1, 1, 1]
  # Two hosts: disjoint rows that concatenate to the global batch.
  tokens = np.arange(201, dtype=np.int32)
  whole = next(StreamIterator(tokens, 5, batch_size=4))
  parts = [next(StreamIterator(tokens, 5, batch_size=4, shard_id=i, num_shards=2))
           for i in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_stream_resumes_from_its_position_and_refuses_a_foreign_one():
  tokens = np.arange(300, dtype=np.int32)
  it = StreamIterator(tokens, 4, batch_size=2)
  for _ in range(40):                                   # past the first epoch (37 steps)
    next(it)
  again = StreamIterator(tokens, 4, batch_size=2, state=it.position())
  for _ in range(3):
    a, b = next(it), next(again)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match='steps per'):
    StreamIterator(tokens, 5, batch_size=2, state=it.position())
  with pytest.raises(ValueError, match='packed'):
    StreamIterator(tokens, 4, batch_size=2, state={'epoch': 0, 'batches_in_epoch': 3})
  with pytest.raises(ValueError, match='too few'):
    StreamIterator(tokens[:9], 4, batch_size=3)
  evals = list(StreamIterator(tokens, 4, batch_size=2, num_epochs=1))
  assert len(evals) == 37


def test_split_tokens_is_the_task_in_document_order(tmp_path):
  from moescale.data import stream, tasks
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"text": "ab"}\n{"text": "cde"}\n{"text": "f"}\n', encoding='utf-8')
  name = f'test_stream_{tmp_path.name}'
  tasks.register_text_task(name, [str(path)], [str(path)], 'bytes', format='jsonl')
  ids = lambda s: [c + 3 for c in s.encode()]            # bytes vocab: EOS = 1, bytes + 3
  assert stream.split_tokens(name, 'train', 'bytes').tolist() == (
      ids('ab') + [1] + ids('cde') + [1] + ids('f') + [1])
  with pytest.raises(ValueError, match='no .test. split'):
    stream.split_tokens(name, 'test', 'bytes')


# ------------------------------------------------------------------------------- training

def _memory(state):
  return jax.tree.map(np.asarray, state.memory)


def test_memory_after_two_steps_is_the_second_segments_layer_inputs(tmp_path):
  one = trainer.train(XL, DATA, _cfg(tmp_path, 1)).state
  mem1 = _memory(one)
  # After one step: every row's memory is its first segment (mask all True: mem_len = L).
  assert mem1['mask'].all() and mem1['layers'][0].shape == (8, L, 16)
  two = trainer.train(XL, DATA, _cfg(tmp_path, 2))     # resumes from step 1's checkpoint
  assert two['start_step'] == 1
  mem2 = _memory(two.state)
  it = DATA.train_iterator(8)
  first, second = next(it), next(it)
  # Layer 1's memory is its input: the embedding of the second segment's tokens, looked up
  # with the parameters the second step ran with (no embedding scale, no dropout).
  graphdef = nnx.graphdef(XL(rngs=nnx.Rngs(0)))
  model = nnx.merge(graphdef, one.params, one.rest)
  embed = np.asarray(model.embed[...])
  np.testing.assert_allclose(mem2['layers'][0], embed[second['decoder_input_tokens']],
                             rtol=1e-6)
  # Every layer's: the forward pass of segment 2 given segment 1's memory.
  out = model(jnp.asarray(second['decoder_input_tokens']), memory=one.memory['layers'],
              memory_mask=one.memory['mask'])
  for got, want in zip(mem2['layers'], out.memory):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # ...and not what the segment gives alone: the memory was used.
  alone = model(jnp.asarray(second['decoder_input_tokens']))
  assert not np.allclose(mem2['layers'][1], alone.memory[1], atol=1e-4)
  del first


def test_resume_and_microbatch_splits_keep_each_rows_memory(tmp_path):
  straight = trainer.train(XL, DATA, _cfg(tmp_path / 'a', 4))
  trainer.train(XL, DATA, _cfg(tmp_path / 'b', 2))
  resumed = trainer.train(XL, DATA, _cfg(tmp_path / 'b', 4))
  jax.tree.map(np.testing.assert_array_equal, _memory(straight.state), _memory(resumed.state))
  jax.tree.map(np.testing.assert_array_equal, straight.state.params, resumed.state.params)
  # Split into 2 sequential x 2 parallel microbatches: row b's memory must come back to row b
  # (a mix-up hands rows each other's context: O(1) differences).
  split = trainer.train(XL, DATA, _cfg(tmp_path / 'c', 4, step=step_lib.StepConfig(
      grad_accum_steps=2, parallel_microbatches=2)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               _memory(straight.state), _memory(split.state))
  # The losses too (the parameters themselves are no test: Adam's first steps move a weight
  # by ~lr whatever the sign of a near-zero gradient, and summation order flips such signs).
  losses = [[json.loads(l)['loss'] for l in open(tmp_path / d / 'metrics.jsonl')
             if '"loss"' in l] for d in 'ac']
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
  assert len(losses[0]) == 4


def _eval_by_hand(state, mem_len):
  """The validation loss by a plain loop: memory of mem_len tokens, empty at the start."""
  model = nnx.merge(nnx.graphdef(XL(rngs=nnx.Rngs(0))), state.params, state.rest)
  memory = mask = None
  xent = weight = 0.0
  for batch in DATA.eval_iterators(4)['validation']:
    out = model(jnp.asarray(batch['decoder_input_tokens']), memory=memory, memory_mask=mask,
                mem_len=mem_len or None)
    logp = jax.nn.log_softmax(out.logits)
    xent -= float(jnp.take_along_axis(logp, batch['decoder_target_tokens'][..., None],
                                      -1).sum())
    weight += batch['decoder_target_tokens'].size
    if mem_len:
      memory, mask = out.memory, out.memory_mask
  return xent / weight


def test_evaluation_carries_a_longer_memory_over_the_whole_split(tmp_path):
  trainer.train(XL, DATA, _cfg(tmp_path, 30))
  results = {}
  for mem_len in (0, L, 3 * L):
    s = trainer.train(XL, DATA, _cfg(tmp_path, 30, eval_mem_len=mem_len, eval_batch_size=4))
    results[mem_len] = s['validation/eval_loss']
    assert s['validation/eval_tokens'] == 4 * (400 // L // 4) * L      # the whole split
    assert results[mem_len] == pytest.approx(_eval_by_hand(s.state, mem_len), rel=1e-4)
  # The task rewards seeing 5 tokens back: the memory must help.
  assert results[L] < results[0] - 0.05 and results[3 * L] < results[0] - 0.05


def test_with_memory_empties_the_rows_that_restart():
  memory = {'layers': [jnp.ones((3, 2, 4))], 'mask': jnp.ones((3, 2), bool)}
  batch = {'decoder_input_tokens': jnp.zeros((3, 5), jnp.int32),
           'memory_reset': jnp.array([0, 1, 0])}
  out = memory_lib.with_memory(batch, memory)
  assert 'memory_reset' not in out
  assert out['memory']['mask'].tolist() == [[True, True], [False, False], [True, True]]
  assert 'memory' not in memory_lib.with_memory(batch, None)


def test_a_memory_model_refuses_packed_data(tmp_path):
  with pytest.raises(ValueError, match='stream'):
    trainer.train(XL, SyntheticData(vocab_size=VOCAB, length=L), _cfg(tmp_path, 1))
