"""Tests for moescale.data: corpus, vocabularies, seqio tasks, packed pipeline.

Tiny corpora written to tmp_path, sequence lengths of 8-32 tokens, the byte
vocabulary unless a test is about SentencePiece.
"""

import collections
import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest

from moescale.data import corpus

L = 16  # sequence length used by most tests

_WORDS = ('alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu '
          'nu xi omicron pi rho sigma tau upsilon phi chi psi omega').split()


def _name(prefix='t'):
  return f'test_{prefix}_{uuid.uuid4().hex[:8]}'


def _documents(n=12, seed=0):
  """Documents of 1 to 12 words, a few non-ASCII characters among them."""
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(n):
    words = rng.choice(_WORDS, size=rng.integers(1, 13))
    docs.append(f'doc{i} ' + ' '.join(words) + (' café' if i % 3 == 0 else ''))
  return docs


def _write_paragraphs(path, docs):
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
  return str(path)


def _byte_ids(text, eos=True):
  return [b + 3 for b in text.encode('utf-8')] + ([1] if eos else [])


def _chunks(ids, length):
  return [tuple(ids[i:i + length]) for i in range(0, len(ids), length)]


def _segments(batch):
  """The token sequences of all packed segments in a batch, row by row."""
  out = []
  targets, segs = batch['decoder_target_tokens'], batch['decoder_segment_ids']
  for row_t, row_s in zip(targets, segs):
    for s in np.unique(row_s[row_s > 0]):
      out.append(tuple(int(t) for t in row_t[row_s == s]))
  return out


def _take(pipeline, n):
  return [next(pipeline) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


B = 8  # global batch size used by the pipeline tests


@pytest.fixture(scope='module')
def small_task(tmp_path_factory):
  """A 12-document byte-level task: (name, train docs, validation docs)."""
  from moescale.data import tasks
  root = tmp_path_factory.mktemp('small')
  train, valid = _documents(12, seed=0), _documents(4, seed=1)
  name = _name('small')
  tasks.register_text_task(name, _write_paragraphs(root / 'train.txt', train),
                           _write_paragraphs(root / 'valid.txt', valid))
  return name, train, valid


@pytest.fixture(scope='module')
def two_epochs(small_task):
  """Global batches of 2 epochs (seed 0) and the epoch each belongs to."""
  from moescale.data import pipeline
  p = pipeline.get_dataset(small_task[0], {'targets': L}, 'train',
                           batch_size=B, seed=0, num_epochs=2)
  batches, epochs = [], []
  for batch in p:
    batches.append(batch)
    epochs.append(p.state()['epoch'])  # the epoch of the batch just taken
  return batches, epochs


@pytest.fixture(scope='module')
def five_batches(small_task):
  """The first 5 global batches of another run with seed 0, and its state."""
  from moescale.data import pipeline
  p = pipeline.get_dataset(small_task[0], {'targets': L}, 'train',
                           batch_size=B, seed=0)
  return _take(p, 5), p.state()


# ---------------------------------------------------------------- imports


def test_import_does_not_load_tensorflow_or_seqio():
  code = ('import sys, moescale, moescale.data, moescale.data.corpus, '
          'moescale.data.vocab; '
          "bad = [m for m in ('tensorflow', 'seqio') if m in sys.modules]; "
          'assert not bad, bad; '
          'moescale.data.corpus.sotu_speech_files(); '
          "assert 'tensorflow' not in sys.modules and 'pandas' not in sys.modules")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


# ---------------------------------------------------------- default corpus


def test_default_corpus_files_located_and_sotu_split_by_document():
  files = corpus.sotu_speech_files()
  assert len(files) > 200 and all(f.is_file() for f in files)
  train = corpus.sotu_split_files('train')
  valid = corpus.sotu_split_files('validation')
  assert set(train).isdisjoint(valid)
  assert sorted(train + valid) == files
  assert 0.03 < len(valid) / len(files) < 0.07
  assert valid == files[corpus.SOTU_VALIDATION_EVERY - 1::corpus.SOTU_VALIDATION_EVERY]
  with pytest.raises(ValueError, match='test'):
    corpus.sotu_split_files('test')
  assert corpus.kjv_file().is_file()
  assert corpus.pydoc_topics_file().is_file()
  topics = corpus.pydoc_topics()
  assert len(topics) > 20 and all(t.strip() for t in topics)


def test_kjv_chapters_are_whole_chapters():
  chapters = corpus.kjv_chapters()
  assert len(chapters) == 1189
  assert chapters[0].startswith('In the beginning God created the heaven')
  assert chapters[49].startswith('And Joseph fell upon his father')  # Gen 50
  assert chapters[-1].endswith('with you all. Amen.')


# ------------------------------------------------------------ vocabularies


def test_byte_vocabulary_roundtrip():
  from moescale.data import vocab
  v = vocab.get_vocabulary('bytes')
  text = 'Grüße, world! 1790\nnew line'
  ids = v.encode(text)
  assert ids == [b + 3 for b in text.encode('utf-8')]
  assert v.decode(ids) == text
  assert v.eos_id == 1 and v.pad_id == 0
  table = vocab.token_byte_lengths(v)
  assert table.shape == (v.vocab_size,) and table[:3].sum() == 0
  assert table[ids].sum() == len(text.encode('utf-8'))


def test_sentencepiece_train_and_roundtrip(tmp_path):
  from moescale.data import vocab
  text = tmp_path / 'train.txt'
  text.write_text('\n'.join(corpus.pydoc_topics()[:30]), encoding='utf-8')
  model = vocab.train_sentencepiece(
      [str(text)], str(tmp_path / 'sp' / 'tiny'), 100, byte_fallback=False,
      character_coverage=0.995, num_threads=1)
  assert model.endswith('.model') and os.path.isfile(model)
  v = vocab.get_vocabulary(model)
  assert v.vocab_size == 100
  assert (v.pad_id, v.eos_id, v.tokenizer.unk_id()) == (0, 1, 2)
  sentence = 'The assert statement is a convenient way to insert checks.'
  ids = v.encode(sentence)
  assert 0 not in ids and 1 not in ids
  assert len(ids) < len(sentence)  # pieces longer than one character
  assert v.decode(ids) == sentence
  # Bytes per token: exact up to the word-start mark of the first piece.
  nbytes = vocab.token_byte_lengths(v)[ids].sum()
  assert nbytes in (len(sentence), len(sentence) + 1)
  # Through a task: tokens of a split = pieces of its documents + one EOS.
  from moescale.data import pipeline, tasks
  docs = ['The assert statement.', 'Assignment statements are used to bind.']
  name = _name('sp')
  tasks.register_text_task(
      name, None, _write_paragraphs(tmp_path / 'v.txt', docs), model)
  assert pipeline.count_tokens(name, 'validation') == sum(
      len(v.encode(d)) + 1 for d in docs)


def test_sentencepiece_trains_when_stderr_has_no_file_descriptor(tmp_path, monkeypatch):
  # The trainer's log is silenced by dup2-ing /dev/null over sys.stderr's file descriptor; a
  # sys.stderr without one (pytest's capsys, notebooks) failed with "fileno".
  import sentencepiece as spm
  from moescale.data import vocab
  text = tmp_path / 'train.txt'
  text.write_text('\n'.join(corpus.pydoc_topics()[:30]), encoding='utf-8')
  stderr = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', stderr)
  model = vocab.train_sentencepiece(
      [str(text)], str(tmp_path / 'tiny'), 100, byte_fallback=False,
      character_coverage=0.995, num_threads=1)
  assert model.endswith('.model') and os.path.isfile(model)
  assert spm.SentencePieceProcessor(model_file=model).get_piece_size() == 100
  assert sys.stderr is stderr


def test_missing_files_raise_errors_naming_the_path(tmp_path):
  from moescale.data import tasks, vocab
  missing = tmp_path / 'nope.txt'
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    tasks.register_text_task(_name(), str(missing))
  with pytest.raises(FileNotFoundError, match=r'matches no file'):
    tasks.register_text_task(_name(), str(tmp_path / '*.jsonl'),
                             format='jsonl')
  with pytest.raises(FileNotFoundError, match='wiki.train.raw'):
    tasks.register_wikitext103(_name(), tmp_path, 'bytes')
  with pytest.raises(FileNotFoundError, match='enwik8'):
    tasks.register_enwik8(_name(), tmp_path / 'enwik8')
  with pytest.raises(FileNotFoundError, match='x.model'):
    vocab.get_vocabulary(str(tmp_path / 'x.model'))


# ------------------------------------------------------------------ tasks


def test_registration_is_idempotent(tmp_path):
  from moescale.data import tasks
  a = _write_paragraphs(tmp_path / 'a.txt', ['one'])
  b = _write_paragraphs(tmp_path / 'b.txt', ['two'])
  name = _name()
  first = tasks.register_text_task(name, a)
  assert tasks.register_text_task(name, a) is first
  with pytest.raises(ValueError, match='already registered'):
    tasks.register_text_task(name, b)
  names = tasks.register_default_tasks()
  assert names == tasks.register_default_tasks()
  assert names == ['moescale_sotu', 'moescale_kjv', 'moescale_pydoc']


def test_default_corpus_sizes_match_the_text():
  from moescale.data import pipeline
  stats = pipeline.split_stats('moescale_pydoc', 'validation')
  topics = corpus.pydoc_topics()
  assert stats == {'documents': len(topics),
                   'bytes': sum(len(t.encode()) for t in topics),
                   'tokens': sum(len(t.encode()) + 1 for t in topics)}
  assert pipeline.count_tokens('moescale_pydoc', 'validation') == stats['tokens']


def test_chunking_and_packing_drop_no_tokens(small_task, two_epochs):
  from moescale.data import pipeline
  name, train, _ = small_task
  batches = [b for b, e in zip(*two_epochs) if e == 0]  # one epoch
  got = [s for b in batches for s in _segments(b)]
  want = [c for d in train for c in _chunks(_byte_ids(d), L)]
  assert max(len(s) for s in want) == L and min(len(s) for s in want) < L
  assert sorted(got) == sorted(want)
  total = sum(int(b['decoder_loss_weights'].sum()) for b in batches)
  assert total == sum(len(_byte_ids(d)) for d in train)
  assert total == pipeline.count_tokens(name, 'train')


def test_packed_segments_and_positions_are_consistent(two_epochs):
  batch = two_epochs[0][0]
  assert set(batch) == {'decoder_target_tokens', 'decoder_input_tokens',
                        'decoder_segment_ids', 'decoder_positions',
                        'decoder_loss_weights'}
  assert batch['decoder_target_tokens'].shape == (B, L)
  seg, pos = batch['decoder_segment_ids'], batch['decoder_positions']
  tgt, inp = batch['decoder_target_tokens'], batch['decoder_input_tokens']
  real = tgt != 0
  np.testing.assert_array_equal(batch['decoder_loss_weights'], real)
  assert (seg[real] > 0).all() and (seg[~real] == 0).all()
  assert (pos[~real] == 0).all()
  assert (seg > 0).sum(axis=1).max() == L  # some row is full
  assert seg.max() > 1  # and some row packs several chunks
  for r in range(seg.shape[0]):
    for s in np.unique(seg[r][seg[r] > 0]):
      idx = np.flatnonzero(seg[r] == s)
      assert (np.diff(idx) == 1).all()  # a segment is contiguous
      np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
      # Inputs are the targets shifted right within the segment (BOS = 0).
      np.testing.assert_array_equal(inp[r, idx], [0, *tgt[r, idx[:-1]]])


def test_host_shards_are_disjoint_and_make_up_the_global_batch(
    small_task, two_epochs):
  from moescale.data import pipeline
  name, train, _ = small_task
  global_ = [b for b, e in zip(*two_epochs) if e == 0]
  hosts = [list(pipeline.get_dataset(name, {'targets': L}, 'train',
                                     batch_size=B, seed=0, num_epochs=1,
                                     shard_id=i, num_shards=2))
           for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(global_) > 1
  for g, h0, h1 in zip(global_, *hosts):
    for k in g:
      assert h0[k].shape == h1[k].shape == (B // 2, L)
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
  # Every chunk of the epoch reaches exactly one host, once.
  want = collections.Counter(c for d in train for c in _chunks(_byte_ids(d), L))
  seg0 = collections.Counter(s for b in hosts[0] for s in _segments(b))
  seg1 = collections.Counter(s for b in hosts[1] for s in _segments(b))
  assert seg0 and seg1 and seg0 + seg1 == want
  with pytest.raises(ValueError, match='multiple of num_shards'):
    pipeline.get_dataset(name, {'targets': L}, batch_size=3, num_shards=2)


def test_order_is_deterministic_per_seed(small_task, two_epochs, five_batches):
  from moescale.data import pipeline
  # Two runs with seed 0 (here with num_epochs=2 and None) agree ...
  _assert_batches_equal(five_batches[0], two_epochs[0][:5])
  # ... and seed 1 gives another order.
  other = _take(pipeline.get_dataset(small_task[0], {'targets': L}, 'train',
                                     batch_size=B, seed=1), 2)
  assert any((x['decoder_target_tokens'] != y['decoder_target_tokens']).any()
             for x, y in zip(other, two_epochs[0]))


def test_resume_from_state_continues_exactly(small_task, two_epochs,
                                             five_batches):
  from moescale.data import pipeline
  name, _, _ = small_task
  uninterrupted, epochs = two_epochs
  assert len(uninterrupted) >= 6 and epochs[5] == 1  # resume in epoch 1
  state = five_batches[1]
  assert set(state) == {'epoch', 'batches_in_epoch', 'batches_consumed',
                        'seed'}
  assert state['batches_consumed'] == 5
  resumed = pipeline.get_dataset(name, {'targets': L}, 'train', batch_size=B,
                                 seed=0, state=state)
  _assert_batches_equal([next(resumed)], uninterrupted[5:6])
  assert resumed.state()['batches_consumed'] == 6
  # Each epoch has its own order.
  epoch1 = epochs.index(1)
  assert (uninterrupted[0]['decoder_target_tokens']
          != uninterrupted[epoch1]['decoder_target_tokens']).any()
  with pytest.raises(ValueError, match='seed'):
    pipeline.get_dataset(name, {'targets': L}, 'train', batch_size=B, seed=8,
                         state=state)


def test_trainer_data_source(small_task, two_epochs):
  from moescale.data import pipeline
  from moescale.data import source as source_lib
  source = source_lib.SeqioDataSource(small_task[0], {'targets': L})
  assert source.sequence_length == L and source.vocab_size == 259
  assert source.eval_splits == ('validation',)
  # Per-host batch size in: training reads the host's own documents (test_data_resume.py).
  it = source.train_iterator(B // 2, 1, 2, seed=0, position=None)
  assert next(it)['decoder_target_tokens'].shape == (B // 2, L)
  assert it.position()['sharded_steps'] == 1 and it.position()['num_shards'] == 2
  # A DataPipeline position (a run from before sharding) continues on global batches, of
  # which host 1 of 2 gets the second half.
  it = source.train_iterator(B // 2, 1, 2, seed=0,
                             position={'epoch': 0, 'batches_in_epoch': 0, 'seed': 0})
  batch = next(it)
  for k, v in two_epochs[0][0].items():
    np.testing.assert_array_equal(batch[k], v[B // 2:])
  assert it.position()['batches_consumed'] == 1
  default = source_lib.SeqioDataSource('moescale_sotu', {'targets': L})
  assert default.eval_splits == ('validation', 'moescale_kjv:validation',
                                 'moescale_pydoc:validation')
  evals = default.eval_iterators(2, 0, 1)
  assert set(evals) == set(default.eval_splits)
  assert not evals['validation'].shuffle
  assert evals['moescale_pydoc:validation'].num_epochs == 1
  stats = pipeline.split_stats('moescale_pydoc', 'validation')
  assert default.bytes_per_token('moescale_pydoc:validation') == (
      stats['bytes'] / stats['tokens'])


def test_eval_pipelines_are_rewound_not_rebuilt(small_task, monkeypatch):
  from moescale.data import pipeline
  from moescale.data import source as source_lib
  source = source_lib.SeqioDataSource(small_task[0], {'targets': L})
  built = []
  real = pipeline.DataPipeline.host_dataset
  monkeypatch.setattr(pipeline.DataPipeline, 'host_dataset',
                      lambda self, *a: built.append(a) or real(self, *a))
  first = source.eval_iterators(2)['validation']
  want = [next(first) for _ in range(2)]
  again = source.eval_iterators(2)['validation']           # the next evaluation
  assert again is first and again.position()['batches_consumed'] == 0
  for w in want:
    for k, v in next(again).items():
      np.testing.assert_array_equal(v, w[k])
  assert built == [(0, 0)]                                  # one tf.data build for both
  assert source.eval_iterators(4)['validation'] is not first  # another batch size: its own


# ------------------------------------------------------------ user corpora


def _decoded_split(name, split):
  """A byte-level split's text, reassembled from one unshuffled epoch."""
  from moescale.data import pipeline
  p = pipeline.get_dataset(name, {'targets': L}, split, batch_size=2,
                           num_epochs=1, shuffle=False, pack=False)
  ids = [t for b in p for row in b['decoder_target_tokens'] for t in row if t]
  return bytes(t - 3 for t in ids if t != 1)  # drop EOS


def test_enwik8_split_sizes_on_a_fake_file(tmp_path):
  from moescale.data import pipeline, tasks
  data = bytes(np.random.default_rng(0).integers(0, 256, 1000, np.uint8))
  path = tmp_path / 'enwik8'
  path.write_bytes(data)
  assert corpus.enwik8_ranges(100_000_000) == {
      'train': (0, 90_000_000), 'validation': (90_000_000, 95_000_000),
      'test': (95_000_000, 100_000_000)}
  name = _name('enwik8')
  tasks.register_enwik8(name, path, valid_bytes=100, test_bytes=50,
                        block_bytes=64)
  sizes = {s: pipeline.split_stats(name, s)
           for s in ('train', 'validation', 'test')}
  assert {s: v['bytes'] for s, v in sizes.items()} == {
      'train': 850, 'validation': 100, 'test': 50}
  assert all(v['tokens'] == v['bytes'] for v in sizes.values())  # no EOS
  assert sizes['train']['documents'] == 14  # ceil(850 / 64) blocks
  assert _decoded_split(name, 'validation') == data[850:950]
  with pytest.raises(ValueError, match='cannot hold'):
    corpus.enwik8_ranges(100, 60, 40)


def test_wikitext103_task_reads_articles(tmp_path):
  from moescale.data import pipeline, tasks
  article = ' = {t} = \n \n Text of {t} , with @-@ tokens .\n \n = = Sub = = \n More .\n'
  for split, fname in corpus.WIKITEXT_FILES.items():
    text = ' \n' + ''.join(article.format(t=f'{split} {i}') for i in range(3))
    (tmp_path / fname).write_text(text, encoding='utf-8')
  name = _name('wt103')
  tasks.register_wikitext103(name, tmp_path, 'bytes')
  stats = pipeline.split_stats(name, 'validation')
  text = (tmp_path / 'wiki.valid.raw').read_text(encoding='utf-8')
  assert stats['documents'] == 3 and stats['bytes'] == len(text.encode())
  docs = list(tasks.get_provider(name).source.documents('validation'))
  assert docs[1].startswith(b' = validation 1 = \n')
  assert b''.join(docs).decode() == text
  assert pipeline.split_stats(name, 'train')['documents'] == 3


def test_jsonl_task_reads_the_text_field(tmp_path):
  from moescale.data import pipeline, tasks
  docs = _documents(5, seed=2)
  path = tmp_path / 'c4.jsonl'
  path.write_text(''.join(json.dumps({'text': d, 'url': 'x'}) + '\n'
                          for d in docs), encoding='utf-8')
  name = _name('jsonl')
  tasks.register_text_task(name, None, str(path), format='jsonl')
  source = tasks.get_provider(name).source
  assert [d.decode() for d in source.documents('validation')] == docs
  with pytest.raises(ValueError, match="no 'train' split"):
    pipeline.get_dataset(name, {'targets': L}, 'train')


def test_text_units_and_streamed_splits(tmp_path):
  from moescale.data import tasks
  path = tmp_path / 'a.txt'
  path.write_text('p1 l1\np1 l2\n\n\np2 l1\n', encoding='utf-8')
  read = lambda unit: list(corpus.read_text_documents(str(path), unit))
  assert read('paragraph') == ['p1 l1\np1 l2', 'p2 l1']
  assert read('line') == ['p1 l1', 'p1 l2', 'p2 l1']
  assert read('file') == ['p1 l1\np1 l2\n\n\np2 l1\n']
  # A split over max_in_memory_bytes is streamed: files in a seeded order,
  # documents in file order, nothing lost.
  files = [_write_paragraphs(tmp_path / f'{i}.txt', [f'f{i} d{j}' for j in range(3)])
           for i in range(6)]
  task = tasks.register_text_task(_name('stream'), files,
                                  max_in_memory_bytes=0)
  source = task.source
  assert not source.in_memory('train')
  ordered = [d.decode() for d in source.documents('train')]
  assert ordered == [f'f{i} d{j}' for i in range(6) for j in range(3)]
  shuffled = [d.decode() for d in source.documents('train', True, seed=1)]
  assert shuffled != ordered and sorted(shuffled) == sorted(ordered)
  assert shuffled == [d.decode() for d in source.documents('train', True, 1)]
  for k in range(0, 18, 3):  # each file's documents stay together, in order
    assert [d[-2:] for d in shuffled[k:k + 3]] == ['d0', 'd1', 'd2']


def test_line_breaks_eos_is_fairseqs_format(tmp_path):
  """Artetxe et al.'s data went through fairseq-preprocess: every line ends with EOS and no
  newline is ever a token; documents end with one more EOS (the blank line between them)."""
  from moescale.data import tasks
  path = tmp_path / 'a.txt'
  path.write_text('one\ntwo é\n\nthree\n', encoding='utf-8')

  def tokens(line_breaks):
    task = tasks.register_text_task(_name(line_breaks), str(path), unit='paragraph',
                                    line_breaks=line_breaks)
    ds = task.get_dataset({'targets': 64}, split='train', shuffle=False)
    return [list(ex['targets']) for ex in ds.as_numpy_iterator()]

  eos_format = tokens('eos')
  assert sorted(eos_format) == sorted([
      _byte_ids('one', eos=False) + [1] + _byte_ids('two é', eos=False) + [1, 1],
      _byte_ids('three', eos=False) + [1, 1]])
  newline = _byte_ids('\n', eos=False)[0]
  assert all(newline not in doc for doc in eos_format)
  # The default keeps newlines as text.
  assert sorted(tokens('keep')) == sorted([_byte_ids('one\ntwo é'), _byte_ids('three')])
  with pytest.raises(ValueError, match="line_breaks='crlf'; valid"):
    tasks.register_text_task(_name('bad'), str(path), line_breaks='crlf')


def test_a_vocabulary_of_the_same_size_but_other_tokens_is_refused(tmp_path):
  """guard.check_vocabulary: the fingerprint a run recorded (here from a SentencePiece model
  trained on one text) refuses another model of the same vocab_size (trained on another text),
  for training on and for evaluation; the recorded one and the byte vocabulary behave."""
  from moescale.data import vocab
  from moescale.train import guard
  topics = corpus.pydoc_topics()
  texts = {'a': '\n'.join(topics[:30]), 'b': '\n'.join(topics[30:60])}
  models = {}
  for name, text in texts.items():
    (tmp_path / f'{name}.txt').write_text(text, encoding='utf-8')
    models[name] = vocab.train_sentencepiece(str(tmp_path / f'{name}.txt'),
                                             str(tmp_path / name), 100, byte_fallback=False,
                                             character_coverage=0.995, num_threads=1)

  class Source:
    def __init__(self, spec):
      self.vocabulary = vocab.get_vocabulary(spec)

    def fingerprint(self):
      return vocab.fingerprint(self.vocabulary)

  a, b = Source(models['a']), Source(models['b'])
  assert a.vocabulary.vocab_size == b.vocabulary.vocab_size == 100
  run = tmp_path / 'run'
  guard.check_vocabulary(str(run), a, write=False)        # evaluation writes nothing
  assert not (run / 'vocabulary.json').exists()
  guard.check_vocabulary(str(run), a)                     # training records it
  recorded = json.loads((run / 'vocabulary.json').read_text())
  assert recorded['vocab_size'] == 100 and recorded['vocabulary'].endswith('a.model')
  guard.check_vocabulary(str(run), a)                     # the same one: fine
  with pytest.raises(guard.VocabularyMismatch, match=r'trained with the vocabulary .*a\.model'
                     r"' \(100 ids, sha256 .*this data has .*b\.model' \(100 ids"):
    guard.check_vocabulary(str(run), b)
  with pytest.raises(guard.VocabularyMismatch):
    guard.check_vocabulary(str(run), Source('bytes'))
  guard.check_vocabulary(str(run), object())              # no fingerprint: not checked
  assert vocab.fingerprint(vocab.get_vocabulary('bytes')) == Source('bytes').fingerprint()
