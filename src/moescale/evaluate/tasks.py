"""Multiple-choice task data for zero- and few-shot priming: `load_task` and the data types.

Pure Python (no JAX, no TensorFlow, no seqio). An `Example` is a tuple of `Choice`s, each a
(context, continuation) pair that a language model scores as log P(continuation | context),
and the index of the correct one. A `Task` holds the examples of its splits and says which
split the few-shot demonstrations come from and which one is evaluated.

    task = load_task('sotu_next_sentence')               # built from the embedded corpus
    task = load_task('hellaswag:/data/hellaswag')         # FORMAT:DIRECTORY of a public release
    for example in task.examples(task.eval_split): ...

The loaders of the public releases are in `moescale.evaluate.formats`, the tasks built from
the embedded corpus in `moescale.evaluate.builtin`, the types in `moescale.evaluate.task_data`
(re-exported here).
"""

from __future__ import annotations

from moescale.evaluate import builtin, formats
from moescale.evaluate.task_data import Choice, Example, Task  # noqa: F401  (the API)

# The FORMAT of a 'FORMAT:PATH' spec: the public releases `moescale.evaluate.formats` reads.
FORMATS = ('hellaswag', 'piqa', 'storycloze', 'winogrande', 'openbookqa', 'copa', 'boolq',
           'sst2')
# The tasks `moescale.evaluate.builtin` builds from the embedded corpus (no files needed).
TASK_NAMES = ('sotu_next_sentence', 'kjv_next_verse', 'corpus_source')


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
  if ':' in spec:
    fmt, path = spec.split(':', 1)
    if fmt not in FORMATS:
      raise ValueError(f'task spec {spec!r}: unknown format {fmt!r}; expected '
                       f'{_valid_specs()}.')
    if not path:
      raise ValueError(f'task spec {spec!r}: no path after {fmt!r}:; expected {fmt}:DIRECTORY.')
    return formats.LOADERS[fmt](path, **kwargs)
  if spec not in TASK_NAMES:
    raise ValueError(f'unknown task {spec!r}; expected {_valid_specs()}.')
  return builtin.BUILDERS[spec](**kwargs)
