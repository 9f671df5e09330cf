"""Loaders of public multiple-choice and classification releases, from a user's directory.

Pure Python. Each `load_FORMAT(directory)` reads the files of the public release (the user
downloads them; nothing here does), and returns a `Task` with the splits whose files are
there and have labels: 'train' (the demonstrations of few-shot prompts) and 'validation'
(evaluated), and 'test' where the release labels it. An example's id is 'FILE:LINE'.

Prompts follow the GPT-3 paper (Brown et al., 2020, appendix G) and fairseq's few-shot
evaluation: the model scores each candidate continuation after a shared context.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from typing import Callable

from moescale.evaluate.records import Where, find_file, read_jsonl, read_lines, read_table
from moescale.evaluate.records import table_columns
from moescale.evaluate.task_data import Choice, Example, Task

WINOGRANDE_SIZES = ('xs', 's', 'm', 'l', 'xl')


def _task(name: str, splits: dict[str, list[Example]], shots: str = 'train',
          evaluated: str = 'validation', labels: tuple[str, ...] | None = None) -> Task:
  return Task(name, {s: tuple(e) for s, e in splits.items()}, shots, evaluated, labels)


def _shared(context: str, continuations: list[str], label: int, where: Where) -> Example:
  """An example whose choices share `context`."""
  return Example(tuple(Choice(context, c) for c in continuations), label, where.id)


def _hellaswag_text(text: str) -> str:
  # WikiHow contexts carry the scrape's markup ("[title]", "[header]", "[step]"); a title
  # ends a sentence, the other tags are dropped, as common HellaSwag evaluations do.
  text = re.sub(r'\[[^\]]*\]', '', text.strip().replace(' [title]', '. '))
  return re.sub(r'  +', ' ', text).strip()


def load_hellaswag(directory: str | os.PathLike) -> Task:
  """HellaSwag (Zellers et al., 2019), the release github.com/rowanz/hellaswag (data/).

  Files: hellaswag_train.jsonl ('train') and hellaswag_val.jsonl ('validation'); the test
  file has no labels. Each line: {"ctx": str, "endings": [str, ...] (4), "label": int (or
  its string)}; without "ctx", the context is "ctx_a" + " " + "ctx_b" capitalised (which is
  how the release builds "ctx").

  Prompt: context = ctx; continuation i = ' ' + endings[i]; both without WikiHow's markup.
  """
  expected = 'hellaswag_train.jsonl and hellaswag_val.jsonl'
  splits = {}
  for split, name in (('train', 'hellaswag_train.jsonl'), ('validation', 'hellaswag_val.jsonl')):
    splits[split] = []
    for where, record in read_jsonl(find_file(directory, [name], 'hellaswag', expected)):
      if 'ctx' in record:
        context = where.field(record, 'ctx')
      else:
        ctx_b = where.field(record, 'ctx_b')
        context = f"{where.field(record, 'ctx_a')} {ctx_b[:1].upper()}{ctx_b[1:]}"
      endings = where.text_list(record, 'endings')
      label = where.index(record, 'label', [str(i) for i in range(len(endings))])
      splits[split].append(_shared(_hellaswag_text(context),
                                   [' ' + _hellaswag_text(e) for e in endings], label, where))
  return _task('hellaswag', splits)


def load_piqa(directory: str | os.PathLike) -> Task:
  """PIQA (Bisk et al., 2020), the release yonatanbisk.com/piqa (physicaliqa-train-dev).

  Files: train.jsonl + train-labels.lst ('train'), valid.jsonl + valid-labels.lst
  ('validation'); the test file has no labels. Each .jsonl line: {"goal": str, "sol1": str,
  "sol2": str}; line i of the .lst file is its label, 0 (sol1) or 1 (sol2).

  Prompt: context = "Question: {goal}\\nAnswer:"; continuations ' ' + sol1, ' ' + sol2.
  """
  expected = 'train.jsonl, train-labels.lst, valid.jsonl and valid-labels.lst'
  splits = {}
  for split, stem in (('train', 'train'), ('validation', 'valid')):
    questions = find_file(directory, [f'{stem}.jsonl'], 'piqa', expected)
    answers = find_file(directory, [f'{stem}-labels.lst'], 'piqa', expected)
    records, labels = list(read_jsonl(questions)), list(read_lines(answers))
    if len(labels) != len(records):
      raise ValueError(f'piqa: {len(records)} questions in {questions} but {len(labels)} '
                       f'labels in {answers}; expected one label line per question.')
    splits[split] = []
    for (where, record), (label_where, label) in zip(records, labels):
      index = label_where.index({'label': label}, 'label', ['0', '1'])
      context = f"Question: {where.field(record, 'goal').strip()}\nAnswer:"
      solutions = [' ' + where.field(record, key).strip() for key in ('sol1', 'sol2')]
      splits[split].append(_shared(context, solutions, index, where))
  return _task('piqa', splits)


def _storycloze_examples(path: str) -> list[Example]:
  examples = []
  for where, row in read_table(path):
    context = ' '.join(where.field(row, f'InputSentence{i}').strip() for i in range(1, 5))
    endings = [' ' + where.field(row, f'RandomFifthSentenceQuiz{i}').strip() for i in (1, 2)]
    examples.append(_shared(context, endings, where.index(row, 'AnswerRightEnding', ['1', '2']),
                            where))
  return examples


def _storycloze_file(directory, given: str | None, word: str) -> str | None:
  """The CSV file named `given`, or the one *.csv whose name has `word` (None if none)."""
  if given is not None:
    return find_file(directory, [given], 'storycloze', f'the {word} file {given!r}')
  # Both files of the release are named "cloze_test_...": look for the word in the rest.
  found = sorted(p for p in glob.glob(os.path.join(glob.escape(os.fspath(directory)), '*.csv'))
                 if word in os.path.basename(p).lower().replace('cloze_test', ''))
  if len(found) > 1:
    raise ValueError(f'storycloze: {len(found)} {word} files in {os.fspath(directory)!r} '
                     f'({[os.path.basename(p) for p in found]}); pass {word}_file=NAME.')
  return found[0] if found else None


def load_storycloze(directory: str | os.PathLike, val_file: str | None = None,
                    test_file: str | None = None) -> Task:
  """Story Cloze Test (Mostafazadeh et al., 2016), the 2016 or 2018 release (CSV files).

  Files: the validation CSV (the *.csv whose name contains 'val', or `val_file`) and,
  optionally, the test CSV (name contains 'test', or `test_file`), e.g. "cloze_test_val__
  spring2016 - cloze_test_ALL_val.csv". Columns: InputSentence1 .. InputSentence4,
  RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2).

  There is no training set with endings. With a labelled test file (2016): 'validation' is
  the demonstrations and 'test' is evaluated, as in GPT-3. Otherwise (the 2018 test has no
  labels, or no test file) every 10th validation story (the 1st, 11th, ...) makes 'train',
  the demonstrations, and the rest 'validation', evaluated.

  Prompt: context = the four sentences joined by spaces; continuations ' ' + ending.
  """
  val_path = _storycloze_file(directory, val_file, 'val')
  if val_path is None:
    raise FileNotFoundError(
        f'storycloze: no validation file in {os.fspath(directory)!r}; the storycloze format '
        "expects a *.csv whose name contains 'val' (or val_file=NAME), and optionally 'test'.")
  validation = _storycloze_examples(val_path)
  test_path = _storycloze_file(directory, test_file, 'test')
  if test_path is not None and 'AnswerRightEnding' in table_columns(test_path):
    return _task('storycloze', {'validation': validation,
                                'test': _storycloze_examples(test_path)}, 'validation', 'test')
  return _task('storycloze', {'train': validation[::10],
                              'validation': [e for i, e in enumerate(validation) if i % 10]})


def _winogrande_example(where: Where, record: dict) -> Example:
  sentence = where.field(record, 'sentence')
  if sentence.count('_') != 1:
    raise where.error(f"field 'sentence' has {sentence.count('_')} blanks ('_'); expected 1.")
  before, after = sentence.split('_')
  options = [where.field(record, key) for key in ('option1', 'option2')]
  label = where.index(record, 'answer', ['1', '2'])
  return Example(tuple(Choice(before + option, after) for option in options), label, where.id)


def load_winogrande(directory: str | os.PathLike, size: str | None = None) -> Task:
  """WinoGrande (Sakaguchi et al., 2020), the release winogrande_1.1 (JSON lines).

  Files: train_{xs,s,m,l,xl}.jsonl ('train': `size`, default the largest there) and
  dev.jsonl ('validation'); the test file has no labels. Each line: {"sentence": str with one
  '_' (the blank), "option1": str, "option2": str, "answer": "1" or "2"}.

  Prompt (partial scoring, as GPT-3): choice i has context = the sentence before '_' + option
  i, and continuation = the rest of the sentence after '_', the same for both; the model
  scores how well the rest follows each option.
  """
  expected = f'train_{{{",".join(WINOGRANDE_SIZES)}}}.jsonl and dev.jsonl'
  if size is not None and size not in WINOGRANDE_SIZES:
    raise ValueError(f'winogrande: size={size!r}; expected one of {WINOGRANDE_SIZES}.')
  sizes = [size] if size else WINOGRANDE_SIZES[::-1]
  train = find_file(directory, [f'train_{s}.jsonl' for s in sizes], 'winogrande', expected)
  dev = find_file(directory, ['dev.jsonl'], 'winogrande', expected)
  return _task('winogrande', {
      split: [_winogrande_example(where, record) for where, record in read_jsonl(path)]
      for split, path in (('train', train), ('validation', dev))})


def load_openbookqa(directory: str | os.PathLike) -> Task:
  """OpenBookQA (Mihaylov et al., 2018), the release OpenBookQA-V1-Sep2018 (Data/Main).

  Files: train.jsonl ('train'), dev.jsonl ('validation') and test.jsonl ('test'), in
  Main/ under the directory or in it. Each line: {"question": {"stem": str, "choices":
  [{"text": str, "label": "A"}, ...]}, "answerKey": "A"}.

  Prompt: context = stem; continuation i = ' ' + text of choice i.
  """
  splits = {}
  for split, name in (('train', 'train'), ('validation', 'dev'), ('test', 'test')):
    path = find_file(directory, [f'Main/{name}.jsonl', f'{name}.jsonl'], 'openbookqa',
                     'train.jsonl, dev.jsonl and test.jsonl (in Main/ or not)')
    splits[split] = []
    for where, record in read_jsonl(path):
      choices = where.field(record, 'question.choices', list)
      texts, keys = [], []
      for i, choice in enumerate(choices):
        texts.append(where.field(choice, 'text', name=f'question.choices[{i}].text'))
        keys.append(where.field(choice, 'label', name=f'question.choices[{i}].label'))
      label = where.index(record, 'answerKey', keys)
      splits[split].append(_shared(where.field(record, 'question.stem').strip(),
                                   [' ' + t.strip() for t in texts], label, where))
  return _task('openbookqa', splits)


def _copa_choice(text: str) -> str:
  # The choice continues the premise's sentence: lower its first letter, except the word "I".
  text = text.strip()
  return text if re.match(r"I\b", text) else text[:1].lower() + text[1:]


def load_copa(directory: str | os.PathLike) -> Task:
  """COPA (Roemmele et al., 2011) as released in SuperGLUE (COPA/, JSON lines).

  Files: train.jsonl ('train') and val.jsonl ('validation'); the test file has no labels.
  Each line: {"premise": str, "choice1": str, "choice2": str, "question": "cause" or
  "effect", "label": 0 or 1}.

  Prompt: context = the premise without its final period + ' because' (cause) or ' so'
  (effect); continuation i = ' ' + choice i with its first letter lowercased.
  """
  splits = {}
  for split, name in (('train', 'train.jsonl'), ('validation', 'val.jsonl')):
    path = find_file(directory, [name], 'copa', 'train.jsonl and val.jsonl')
    splits[split] = []
    for where, record in read_jsonl(path):
      premise = where.field(record, 'premise').strip()
      premise = premise[:-1] if premise.endswith('.') else premise
      connective = [' because', ' so'][where.index(record, 'question', ['cause', 'effect'])]
      choices = [' ' + _copa_choice(where.field(record, key)) for key in ('choice1', 'choice2')]
      splits[split].append(_shared(premise + connective, choices,
                                   where.index(record, 'label', ['0', '1']), where))
  return _task('copa', splits)


def load_boolq(directory: str | os.PathLike) -> Task:
  """BoolQ (Clark et al., 2019) as released in SuperGLUE (BoolQ/, JSON lines).

  Files: train.jsonl ('train') and val.jsonl ('validation'); the test file has no labels.
  Each line: {"passage": str, "question": str, "label": true or false}.

  A classification task, labels ('no', 'yes'): context = "{passage}\\nQuestion: {question}?
  \\nAnswer:" (one '?' whether or not the question has one); continuations ' no', ' yes';
  the label is 1 (' yes') for true.
  """
  splits = {}
  for split, name in (('train', 'train.jsonl'), ('validation', 'val.jsonl')):
    path = find_file(directory, [name], 'boolq', 'train.jsonl and val.jsonl')
    splits[split] = []
    for where, record in read_jsonl(path):
      question = where.field(record, 'question').strip().rstrip('?')
      context = f"{where.field(record, 'passage').strip()}\nQuestion: {question}?\nAnswer:"
      label = int(where.field(record, 'label', bool))
      splits[split].append(_shared(context, [' no', ' yes'], label, where))
  return _task('boolq', splits, labels=('no', 'yes'))


def load_sst2(directory: str | os.PathLike) -> Task:
  """SST-2 (Socher et al., 2013) as released in GLUE (SST-2/, tab-separated).

  Files: train.tsv ('train') and dev.tsv ('validation'), each with the header line
  "sentence<TAB>label" and label 0 (negative) or 1 (positive); the test file has no labels.

  A classification task, labels ('negative', 'positive'): context = "Review: {sentence}
  \\nSentiment:"; continuations ' negative', ' positive'.
  """
  splits = {}
  for split, name in (('train', 'train.tsv'), ('validation', 'dev.tsv')):
    path = find_file(directory, [name], 'sst2', 'train.tsv and dev.tsv')
    splits[split] = []
    # The sentences hold quotes that are text, not CSV quoting.
    for where, row in read_table(path, '\t', csv.QUOTE_NONE):
      context = f"Review: {where.field(row, 'sentence').strip()}\nSentiment:"
      label = where.index(row, 'label', ['0', '1'])
      splits[split].append(_shared(context, [' negative', ' positive'], label, where))
  return _task('sst2', splits, labels=('negative', 'positive'))


# FORMAT -> loader; `moescale.evaluate.tasks.FORMATS` lists the same names, in this order.
LOADERS: dict[str, Callable[..., Task]] = {
    'hellaswag': load_hellaswag,
    'piqa': load_piqa,
    'storycloze': load_storycloze,
    'winogrande': load_winogrande,
    'openbookqa': load_openbookqa,
    'copa': load_copa,
    'boolq': load_boolq,
    'sst2': load_sst2,
}
