"""Tasks built from the embedded corpus, so that priming runs with no download.

Pure Python. Each task has a 'train' split (the demonstrations of few-shot prompts, and the
examples to fine-tune on) and a 'validation' split (evaluated) made only of held-out
documents (`moescale.evaluate.corpus_text` says which), none of whose examples' text (context
and answer) occurs in a train document; it is the same for the same `seed`. An example's id
is 'DOCUMENT/RUN/INDEX' (its context is unit INDEX of run RUN: a paragraph, or the chapter)
or, for corpus_source, 'DOCUMENT/PASSAGE'.
Examples are short, for byte-level models with contexts of a few hundred bytes: a context is
at most `max_chars` characters (its end is kept), a continuation at most
`max_continuation_chars` (its start is kept), both cut at word boundaries.

  sotu_next_sentence  context: a sentence of a State of the Union speech; choices: the
                      sentence after it in the same paragraph, and 3 sentences of other
                      speeches of the same split; the answer's position is drawn.
  kjv_next_verse      the same with consecutive verses of a chapter of the King James Bible,
                      distractors from other chapters of the same split.
  corpus_source       classification, labels ('speech', 'scripture', 'documentation'):
                      context "{passage}\\nSource:", continuations ' speech', ' scripture',
                      ' documentation'; a passage is a run of whole words of one document,
                      the same number of examples per class.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from moescale.evaluate import corpus_text
from moescale.evaluate.corpus_text import Document, head, tail
from moescale.evaluate.task_data import Choice, Example, Task

NUM_CHOICES = 4
# Sentences or verses shorter than this ("Thank you.", "Selah.") say too little to continue.
MIN_WORDS = 4
SOURCE_LABELS = ('speech', 'scripture', 'documentation')


def _pairs(documents: Sequence[Document]) -> list[tuple[int, str, str, str]]:
  """(document index, id, unit, next unit) for each unit followed by one in its run."""
  pairs = []
  for d, document in enumerate(documents):
    for r, run in enumerate(document.runs):
      for i, (unit, following) in enumerate(zip(run, run[1:])):
        if len(unit.split()) >= MIN_WORDS and len(following.split()) >= MIN_WORDS:
          pairs.append((d, f'{document.name}/{r}/{i}', unit, following))
  return pairs


def _distractors(rng: random.Random, pools: Sequence[Sequence[str]], document: int,
                 answer: str, max_chars: int) -> list[str]:
  """NUM_CHOICES - 1 different continuations from documents other than `document`."""
  chosen: list[str] = []
  while len(chosen) < NUM_CHOICES - 1:
    other = rng.randrange(len(pools))
    if other == document or not pools[other]:
      continue
    continuation = ' ' + head(rng.choice(pools[other]), max_chars - 1)
    if continuation != answer and continuation not in chosen:
      chosen.append(continuation)
  return chosen


def _compact(text: str) -> str:
  """`text` without whitespace: how texts are compared to find one inside another."""
  return ''.join(text.split())


def _train_text(documents: Sequence[tuple[str, str]]) -> str:
  """The (name, text) documents compacted, one a line, to search evaluation texts in."""
  return '\n'.join(_compact(text) for _, text in documents)


def _texts(documents: Sequence[Document]) -> list[tuple[str, str]]:
  return [(d.name, ' '.join(u for run in d.runs for u in run)) for d in documents]


def _next_unit_examples(documents: Sequence[Document], train_text: str | None,
                        rng: random.Random, num_examples: int, max_chars: int,
                        max_continuation_chars: int) -> tuple[Example, ...]:
  """Up to `num_examples` next-unit examples of `documents`, in a random order.

  With `train_text`, an example whose context and answer occur together in it is left out.
  The order is drawn first and the examples are taken from it, so fewer examples are a
  prefix of more with the same seed.
  """
  pairs = _pairs(documents)
  pools = [[u for run in d.runs for u in run if len(u.split()) >= MIN_WORDS]
           for d in documents]
  if sum(1 for pool in pools if pool) < 2:
    raise ValueError('next-unit examples need two or more documents to draw distractors from.')
  examples = []
  for d, pair_id, unit, following in rng.sample(pairs, len(pairs)):
    if len(examples) == num_examples:
      break
    context, answer = tail(unit, max_chars), ' ' + head(following, max_continuation_chars - 1)
    if train_text is not None and _compact(context + answer) in train_text:
      continue
    continuations = _distractors(rng, pools, d, answer, max_continuation_chars)
    label = rng.randrange(NUM_CHOICES)
    continuations.insert(label, answer)
    examples.append(Example(tuple(Choice(context, c) for c in continuations), label, pair_id))
  return tuple(examples)


def _next_unit_task(name: str, documents: Callable[[str], Sequence[Document]], seed: int,
                    num_examples: int, max_chars: int, max_continuation_chars: int) -> Task:
  train = documents('train')
  # Speeches repeat passages of earlier ones (and verses repeat): a held-out example whose
  # text is also in a train document would test memory, not generalisation.
  splits = {}
  for split, docs, seen in (('train', train, None),
                            ('validation', documents('validation'), _train_text(_texts(train)))):
    # A string seed: random.Random hashes it the same way in every process.
    rng = random.Random(f'{name}/{split}/{seed}')
    splits[split] = _next_unit_examples(docs, seen, rng, num_examples, max_chars,
                                        max_continuation_chars)
  return Task(name, splits, 'train', 'validation')


def sotu_next_sentence(seed: int = 0, num_examples: int = 1000, max_chars: int = 200,
                       max_continuation_chars: int = 120) -> Task:
  """Which sentence follows a sentence of a State of the Union address (4 choices).

  'train' from pre-training's train speeches, 'validation' from its held-out ones (every
  20th speech); `num_examples` per split (fewer if a split has fewer sentence pairs).
  """
  return _next_unit_task('sotu_next_sentence', corpus_text.sotu_documents, seed, num_examples,
                         max_chars, max_continuation_chars)


def kjv_next_verse(seed: int = 0, num_examples: int = 1000, max_chars: int = 200,
                   max_continuation_chars: int = 120) -> Task:
  """Which verse follows a verse of the King James Bible (4 choices).

  'validation' from the held-out chapters (~20%, by a hash of book and chapter: see
  `moescale.evaluate.corpus_text`), 'train' from the others; `num_examples` per split.
  """
  return _next_unit_task('kjv_next_verse', corpus_text.kjv_documents, seed, num_examples,
                         max_chars, max_continuation_chars)


def _source_documents(split: str) -> list[list[tuple[str, str]]]:
  """For each label of corpus_source, the (name, text) of its documents in `split`."""
  return [_texts(corpus_text.sotu_documents(split)), _texts(corpus_text.kjv_documents(split)),
          list(corpus_text.pydoc_documents(split))]


def _source_examples(documents: Sequence[tuple[str, str]], label: int, train_text: str | None,
                     rng: random.Random, count: int, max_chars: int) -> list[Example]:
  """Up to `count` examples of passages of `documents`, none in `train_text`, no two alike."""
  # Half-length passages (a document's last words) would give the length away as a cue.
  pool = [(f'{name}/{i}', p) for name, text in documents
          for i, p in enumerate(corpus_text.passages(text, max_chars)) if len(p) >= max_chars // 2]
  examples, taken = [], set()
  for passage_id, passage in rng.sample(pool, len(pool)):
    if len(examples) == count:
      break
    # pydoc topics share paragraphs: a passage is taken once, and never one of train's.
    if passage in taken or (train_text is not None and _compact(passage) in train_text):
      continue
    taken.add(passage)
    choices = tuple(Choice(f'{passage}\nSource:', f' {word}') for word in SOURCE_LABELS)
    examples.append(Example(choices, label, passage_id))
  return examples


def corpus_source(seed: int = 0, train_per_class: int = 1000, validation_per_class: int = 250,
                  max_chars: int = 200) -> Task:
  """Which collection a passage comes from: a speech, scripture or documentation.

  A classification task, balanced: each split has the same number of examples per class,
  `*_per_class` or fewer if a collection has fewer passages in the split: the held-out pydoc
  topics make 229 passages of 200 characters that no train topic has (Python 3.11's topics).
  Passages do not overlap, and no held-out passage occurs in a train document.
  """
  train = _source_documents('train')
  splits = {}
  for split, documents, per_class in (('train', train, train_per_class),
                                      ('validation', _source_documents('validation'),
                                       validation_per_class)):
    rng = random.Random(f'corpus_source/{split}/{seed}')
    by_label = [
        _source_examples(docs, label, None if split == 'train' else _train_text(train[label]),
                         rng, per_class, max_chars)
        for label, docs in enumerate(documents)]
    count = min(len(examples) for examples in by_label)
    examples = [e for label_examples in by_label for e in label_examples[:count]]
    rng.shuffle(examples)
    splits[split] = tuple(examples)
  return Task('corpus_source', splits, 'train', 'validation', labels=SOURCE_LABELS)


# Built-in task name -> builder; `moescale.evaluate.tasks.TASK_NAMES` lists the same names.
BUILDERS: dict[str, Callable[..., Task]] = {
    'sotu_next_sentence': sotu_next_sentence,
    'kjv_next_verse': kjv_next_verse,
    'corpus_source': corpus_source,
}
