"""Multiple-choice task data for zero- and few-shot priming: the data types and `load_task`.

Pure Python (no JAX, no TensorFlow, no seqio). An `Example` is a tuple of `Choice`s, each a
(context, continuation) pair that a language model scores as log P(continuation | context),
and the index of the correct one. A `Task` holds the examples of its splits and says which
split the few-shot demonstrations come from and which one is evaluated.

    task = load_task('sotu_next_sentence')               # built from the embedded corpus
    task = load_task('hellaswag:/data/hellaswag')         # FORMAT:DIRECTORY of a public release
    for example in task.examples(task.eval_split): ...

The loaders of the public releases are in `moescale.evaluate.formats`, the tasks built from
the embedded corpus in `moescale.evaluate.builtin`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping

# The FORMAT of a 'FORMAT:PATH' spec: the public releases `moescale.evaluate.formats` reads.
FORMATS = ('hellaswag', 'piqa', 'storycloze', 'winogrande', 'openbookqa', 'copa', 'boolq',
           'sst2')
# The tasks `moescale.evaluate.builtin` builds from the embedded corpus (no files needed).
TASK_NAMES = ('sotu_next_sentence', 'kjv_next_verse', 'corpus_source')


@dataclasses.dataclass(frozen=True)
class Choice:
  """One candidate: the model scores log P(continuation | context)."""
  context: str
  continuation: str


@dataclasses.dataclass(frozen=True)
class Example:
  """A multiple-choice example.

  Attributes:
    choices: the candidates. Most tasks give every choice the same context; Winogrande gives
      each its own (partial scoring: the option filled into the blank ends the context).
    label: the index of the correct choice.
    id: where the example comes from (the release's id, or file and line), for reports.
  """
  choices: tuple[Choice, ...]
  label: int
  id: str = ''

  def __post_init__(self):
    if len(self.choices) < 2:
      raise ValueError(f'example {self.id!r}: {len(self.choices)} choice(s); expected 2 or more.')
    if not 0 <= self.label < len(self.choices):
      raise ValueError(f'example {self.id!r}: label {self.label} is not the index of one of '
                       f'its {len(self.choices)} choices.')

  @property
  def demonstration(self) -> str:
    """The example written as a shot of a few-shot prompt: the correct choice in full."""
    correct = self.choices[self.label]
    return correct.context + correct.continuation


@dataclasses.dataclass(frozen=True)
class Task:
  """The examples of a task, by split.

  Attributes:
    name: the task's name in reports.
    splits: split name -> examples (read-only).
    shots_split: the split the few-shot demonstrations are drawn from.
    eval_split: the split evaluated by default.
    labels: the class names of a classification task (choice i is label i for every example),
      None for a multiple-choice task whose choices differ from example to example.
    separator: what joins the demonstrations and the evaluated context in a few-shot prompt.
  """
  name: str
  splits: Mapping[str, tuple[Example, ...]]
  shots_split: str
  eval_split: str
  labels: tuple[str, ...] | None = None
  separator: str = '\n\n'

  def __post_init__(self):
    # A read-only copy: a task is shared by every evaluation that loads it.
    object.__setattr__(self, 'splits', types.MappingProxyType(
        {split: tuple(examples) for split, examples in self.splits.items()}))
    for split in (self.shots_split, self.eval_split):
      self.examples(split)  # raises for a split the task does not have
    if self.labels is not None:
      for split, examples in self.splits.items():
        for example in examples:
          if len(example.choices) != len(self.labels):
            raise ValueError(
                f'task {self.name!r}, {split} example {example.id!r}: {len(example.choices)} '
                f'choices for the {len(self.labels)} labels {self.labels}.')

  def examples(self, split: str) -> tuple[Example, ...]:
    """The examples of `split`; ValueError naming the available splits if there is none."""
    if split not in self.splits:
      raise ValueError(f'task {self.name!r} has no split {split!r}; its splits are '
                       f'{sorted(self.splits)}.')
    return self.splits[split]


def _valid_specs() -> str:
  return (f'a built-in task ({", ".join(TASK_NAMES)}) or FORMAT:PATH with FORMAT one of '
          f'{", ".join(FORMATS)}')


def load_task(spec: str, **kwargs) -> Task:
  """The task named by `spec`: a built-in name, or 'FORMAT:PATH' (a directory of a release).

  Args:
    spec: e.g. 'sotu_next_sentence', 'hellaswag:/data/hellaswag', 'sst2:/data/SST-2'.
    **kwargs: passed to the builder (e.g. seed=, max_chars=) or the loader (e.g. size= for
      Winogrande); see `moescale.evaluate.builtin` and `moescale.evaluate.formats`.
  """
  # Imported here, not at the top: both modules import this one for the data types.
  if ':' in spec:
    fmt, path = spec.split(':', 1)
    if fmt not in FORMATS:
      raise ValueError(f'task spec {spec!r}: unknown format {fmt!r}; expected '
                       f'{_valid_specs()}.')
    if not path:
      raise ValueError(f'task spec {spec!r}: no path after {fmt!r}:; expected {fmt}:DIRECTORY.')
    from moescale.evaluate import formats  # pylint: disable=import-outside-toplevel
    return formats.LOADERS[fmt](path, **kwargs)
  if spec not in TASK_NAMES:
    raise ValueError(f'unknown task {spec!r}; expected {_valid_specs()}.')
  from moescale.evaluate import builtin  # pylint: disable=import-outside-toplevel
  return builtin.BUILDERS[spec](**kwargs)
