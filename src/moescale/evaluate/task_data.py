"""The data types of multiple-choice tasks: `Choice`, `Example`, `Task` (pure Python).

`moescale.evaluate.tasks` is where a task is asked for by name (`load_task`); the loaders
(`formats`) and the built-in tasks (`builtin`) build these.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping


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
