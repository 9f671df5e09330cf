"""Tests for the priming task data: moescale.evaluate.tasks, formats and builtin.

The loaders read hand-made lines in each release's exact format, written to tmp_path; the
built-in tasks are checked against the embedded corpus they are cut from.
"""

import ast
import collections
import json
import pathlib
import sys

import pytest

from moescale.data import corpus
from moescale.evaluate import builtin, corpus_text, formats
from moescale.evaluate.tasks import FORMATS, TASK_NAMES, Choice, Example, Task, load_task

EVALUATE_DIR = pathlib.Path(builtin.__file__).parent
OUR_MODULES = ('tasks', 'formats', 'records', 'corpus_text', 'builtin', 'task_data')


def _write(directory, files):
  """Writes {relative path: list of lines} (dicts as JSON) under `directory`."""
  for name, lines in files.items():
    path = pathlib.Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join((json.dumps(l) if isinstance(l, dict) else l) + '\n'
                            for l in lines), encoding='utf-8')
  return str(directory)


def _choices(example):
  return [(c.context, c.continuation) for c in example.choices]


# ------------------------------------------------------------------- data types


def test_example_demonstration_and_label_check():
  example = Example((Choice('a', ' b'), Choice('c', ' d')), 1, 'x')
  assert example.demonstration == 'c d'
  with pytest.raises(ValueError, match='label 2'):
    Example((Choice('a', ' b'), Choice('a', ' c')), 2)


def test_task_examples_names_the_splits_and_is_read_only():
  example = Example((Choice('a', ' b'), Choice('a', ' c')), 0)
  task = Task('t', {'train': [example], 'validation': (example,)}, 'train', 'validation')
  assert task.examples('train') == (example,)
  with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'validation'\]"):
    task.examples('test')
  with pytest.raises(TypeError):
    task.splits['test'] = ()  # type: ignore[index]
  with pytest.raises(ValueError, match="no split 'dev'"):
    Task('t', {'train': (example,)}, 'train', 'dev')
  with pytest.raises(ValueError, match='2 choices for the 3 labels'):
    Task('t', {'train': (example,)}, 'train', 'train', labels=('x', 'y', 'z'))


def test_load_task_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError) as e:
    load_task('no_such_task')
  for name in TASK_NAMES + FORMATS:
    assert name in str(e.value)
  with pytest.raises(ValueError, match="unknown format 'mmlu'.*hellaswag, piqa"):
    load_task('mmlu:/data/mmlu')
  with pytest.raises(ValueError, match='no path'):
    load_task('copa:')


def test_registries_match_the_names():
  assert tuple(formats.LOADERS) == FORMATS
  assert tuple(builtin.BUILDERS) == TASK_NAMES


def test_modules_are_pure_python():
  """No JAX, TensorFlow, seqio or numpy: only the stdlib and moescale's own pure modules."""
  allowed = {f'moescale.evaluate.{m}' for m in OUR_MODULES} | {
      'moescale.evaluate', 'moescale.data', 'moescale.data.corpus', 'moescale.data.readers'}
  for module in OUR_MODULES:
    tree = ast.parse((EVALUATE_DIR / f'{module}.py').read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [node.module]
      else:
        continue
      for name in names:
        assert (name in allowed or name.split('.')[0] in sys.stdlib_module_names
                or name == 'pydoc_data'), f'{module}.py imports {name}'


# ---------------------------------------------------------------------- formats


# A minimal valid release of each format: {file: lines}.
RELEASES = {
    'hellaswag': {
        'hellaswag_train.jsonl': [{'ctx': 'A man sits. He', 'endings': ['a', 'b', 'c', 'd'],
                                   'label': 1}],
        'hellaswag_val.jsonl': [{'ctx': 'A dog runs. It', 'endings': ['e', 'f', 'g', 'h'],
                                 'label': 2}]},
    'piqa': {'train.jsonl': [{'goal': 'g', 'sol1': 'a', 'sol2': 'b'}], 'train-labels.lst': ['0'],
             'valid.jsonl': [{'goal': 'h', 'sol1': 'c', 'sol2': 'd'}], 'valid-labels.lst': ['1']},
    'storycloze': {'cloze_test_val__spring2016 - cloze_test_ALL_val.csv': [
        'InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,'
        'RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding',
        'id0,S1.,S2.,S3.,S4.,E1.,E2.,1', 'id1,T1.,T2.,T3.,T4.,F1.,F2.,2']},
    'winogrande': {
        'train_xs.jsonl': [{'sentence': 'A _ b.', 'option1': 'x', 'option2': 'y', 'answer': '1'}],
        'dev.jsonl': [{'sentence': 'C _ d.', 'option1': 'x', 'option2': 'y', 'answer': '2'}]},
    'openbookqa': {f'Main/{name}.jsonl': [
        {'id': '1', 'question': {'stem': 'Q', 'choices': [{'text': 'a', 'label': 'A'},
                                                         {'text': 'b', 'label': 'B'}]},
         'answerKey': 'B'}] for name in ('train', 'dev', 'test')},
    'copa': {name: [{'premise': 'P.', 'choice1': 'A.', 'choice2': 'B.', 'question': 'cause',
                     'label': 0}] for name in ('train.jsonl', 'val.jsonl')},
    'boolq': {name: [{'passage': 'P', 'question': 'q', 'label': True}]
              for name in ('train.jsonl', 'val.jsonl')},
    'sst2': {name: ['sentence\tlabel', 'good .\t1'] for name in ('train.tsv', 'dev.tsv')},
}

# A malformed record of each format: (file, line to append, line number, field it lacks).
MALFORMED = {
    'hellaswag': ('hellaswag_val.jsonl', {'ctx': 'x', 'label': 0}, 2, 'endings'),
    'piqa': ('valid.jsonl', {'goal': 'x', 'sol1': 'y'}, 2, 'sol2'),
    'storycloze': ('cloze_test_val__spring2016 - cloze_test_ALL_val.csv',
                   'id2,S1.,S2.,S3.,S4.,E1.,E2.', 4, 'AnswerRightEnding'),
    'winogrande': ('dev.jsonl', {'sentence': 'C _ d.', 'option1': 'x', 'answer': '1'}, 2,
                   'option2'),
    'openbookqa': ('Main/dev.jsonl', {'question': {'stem': 'Q', 'choices': [
        {'text': 'a', 'label': 'A'}, {'label': 'B'}]}, 'answerKey': 'A'}, 2,
                   'question.choices[1].text'),
    'copa': ('val.jsonl', {'premise': 'P.', 'choice1': 'A.', 'choice2': 'B.', 'label': 1}, 2,
             'question'),
    'boolq': ('val.jsonl', {'question': 'q', 'label': False}, 2, 'passage'),
    'sst2': ('dev.tsv', 'bad .', 3, 'label'),
}


@pytest.mark.parametrize('fmt', FORMATS)
def test_minimal_release_loads(fmt, tmp_path):
  task = load_task(f'{fmt}:{_write(tmp_path, RELEASES[fmt])}')
  assert task.name == fmt
  assert all(len(examples) == 1 for examples in task.splits.values())
  assert task.shots_split != task.eval_split


@pytest.mark.parametrize('fmt', FORMATS)
def test_missing_file_names_it_and_the_expected_files(fmt, tmp_path):
  for name in RELEASES[fmt]:
    files = {n: lines for n, lines in RELEASES[fmt].items() if n != name}
    directory = tmp_path / name.replace('/', '_')
    _write(directory, files)
    with pytest.raises(FileNotFoundError) as e:
      load_task(f'{fmt}:{directory}')
    message = str(e.value)
    if fmt == 'storycloze':
      assert str(directory) in message and "'val'" in message
    else:
      assert str(directory / pathlib.Path(name).name) in message or str(directory / name) in message
      expected = {'winogrande': ['train_{xs,s,m,l,xl}.jsonl', 'dev.jsonl']}.get(
          fmt, [pathlib.Path(n).name for n in RELEASES[fmt]])
      assert all(n in message for n in expected), (expected, message)


@pytest.mark.parametrize('fmt', FORMATS)
def test_malformed_line_names_file_line_and_field(fmt, tmp_path):
  name, line, lineno, field = MALFORMED[fmt]
  files = dict(RELEASES[fmt])
  files[name] = files[name] + [line]
  if fmt == 'piqa':
    files['valid-labels.lst'] = ['1', '0']
  _write(tmp_path, files)
  with pytest.raises(ValueError) as e:
    load_task(f'{fmt}:{tmp_path}')
  assert str(e.value).startswith(f'{tmp_path / name}, line {lineno}: no field {field!r}')


def test_hellaswag(tmp_path):
  endings = [', the man adds wax.', ', a person skis.', ', he sings.', ', the man keeps on.']
  _write(tmp_path, {
      'hellaswag_train.jsonl': [
          {'ind': 4, 'ctx_a': 'The man writes on the snow.', 'ctx_b': 'then',
           'ctx': 'The man writes on the snow. Then', 'endings': endings, 'label': 3},
          {'ctx_a': 'A man is sitting on a roof.', 'ctx_b': 'he', 'endings': endings,
           'label': '0'}],
      'hellaswag_val.jsonl': [
          {'ctx': '[header] How to clean a pan [title] Soak the pan.',
           'endings': ['[step] Scrub it.', 'Burn it.', 'Sell it.', 'Eat it.'], 'label': 0}],
      'hellaswag_test.jsonl': [{'ctx': 'unlabelled', 'endings': ['a', 'b', 'c', 'd']}]})
  task = load_task(f'hellaswag:{tmp_path}')
  assert (set(task.splits), task.shots_split, task.eval_split, task.labels) == (
      {'train', 'validation'}, 'train', 'validation', None)
  first, second = task.examples('train')
  assert _choices(first) == [('The man writes on the snow. Then', ' ' + e) for e in endings]
  assert (first.label, first.id) == (3, 'hellaswag_train.jsonl:1')
  assert first.demonstration == 'The man writes on the snow. Then , the man keeps on.'
  assert second.choices[0].context == 'A man is sitting on a roof. He'
  assert second.label == 0
  (val,) = task.examples('validation')
  assert _choices(val) == [('How to clean a pan. Soak the pan.', f' {e}')
                           for e in ('Scrub it.', 'Burn it.', 'Sell it.', 'Eat it.')]
  with pytest.raises(ValueError, match=r"line 1: field 'label' is 4; expected one of"):
    _write(tmp_path, {'hellaswag_val.jsonl': [{'ctx': 'x', 'endings': endings, 'label': 4}]})
    load_task(f'hellaswag:{tmp_path}')


def test_piqa(tmp_path):
  _write(tmp_path, {
      'train.jsonl': [{'goal': 'How do I boil an egg?', 'sol1': 'Put it in a pan of water.',
                       'sol2': 'Put it on ice.'},
                      {'goal': 'Dry a shirt', 'sol1': 'Hang it up', 'sol2': 'Soak it'}],
      'train-labels.lst': ['0', '1'],
      'valid.jsonl': [{'goal': 'Cut bread', 'sol1': 'use a spoon', 'sol2': 'use a knife'}],
      'valid-labels.lst': ['1']})
  task = load_task(f'piqa:{tmp_path}')
  egg, shirt = task.examples('train')
  question = 'Question: How do I boil an egg?\nAnswer:'
  assert _choices(egg) == [(question, ' Put it in a pan of water.'), (question, ' Put it on ice.')]
  assert (egg.label, shirt.label) == (0, 1)
  assert shirt.demonstration == 'Question: Dry a shirt\nAnswer: Soak it'
  assert task.examples('validation')[0].demonstration == 'Question: Cut bread\nAnswer: use a knife'
  _write(tmp_path, {'valid-labels.lst': ['1', '0']})
  with pytest.raises(ValueError, match=r'1 questions in .*valid.jsonl but 2 labels'):
    load_task(f'piqa:{tmp_path}')
  _write(tmp_path, {'valid-labels.lst': ['2']})
  with pytest.raises(ValueError, match=r"valid-labels.lst, line 1: field 'label' is '2'"):
    load_task(f'piqa:{tmp_path}')


STORY_HEADER = ('InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,'
                'RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding')


def _story(i, answer=1):
  return (f'id{i},Tom had a dog{i}.,"It was big, and loud.",It barked.,Tom was sad.,'
          f'Tom gave it away.,Tom ate the moon.,{answer}')


def test_storycloze_with_a_labelled_test_file(tmp_path):
  _write(tmp_path, {'cloze_test_val__spring2016 - cloze_test_ALL_val.csv':
                    [STORY_HEADER, _story(0, 1), _story(1, 2)],
                    'cloze_test_test__spring2016 - cloze_test_ALL_test.csv':
                    [STORY_HEADER, _story(2, 2)]})
  task = load_task(f'storycloze:{tmp_path}')
  assert (set(task.splits), task.shots_split, task.eval_split) == (
      {'validation', 'test'}, 'validation', 'test')
  first, second = task.examples('validation')
  context = 'Tom had a dog0. It was big, and loud. It barked. Tom was sad.'
  assert _choices(first) == [(context, ' Tom gave it away.'), (context, ' Tom ate the moon.')]
  assert (first.label, second.label, task.examples('test')[0].label) == (0, 1, 1)
  assert second.demonstration == context.replace('dog0', 'dog1') + ' Tom ate the moon.'
  assert first.id == 'cloze_test_val__spring2016 - cloze_test_ALL_val.csv:2'


def test_storycloze_without_test_labels_splits_validation(tmp_path):
  unlabelled = STORY_HEADER.rsplit(',', 1)[0]
  _write(tmp_path, {'val.csv': [STORY_HEADER] + [_story(i, 1 + i % 2) for i in range(12)],
                    'test.csv': [unlabelled, _story(99).rsplit(',', 1)[0]]})
  task = load_task(f'storycloze:{tmp_path}')
  assert (task.shots_split, task.eval_split) == ('train', 'validation')
  assert [e.id for e in task.examples('train')] == ['val.csv:2', 'val.csv:12']
  assert [e.id for e in task.examples('validation')] == [
      f'val.csv:{i + 2}' for i in range(12) if i % 10]
  _write(tmp_path, {'other_val.csv': [STORY_HEADER, _story(5)]})
  with pytest.raises(ValueError, match='2 val files.*val_file=NAME'):
    load_task(f'storycloze:{tmp_path}')
  assert len(load_task(f'storycloze:{tmp_path}', val_file='other_val.csv').splits['train']) == 1


def test_winogrande_partial_scoring_and_size(tmp_path):
  line = {'qID': 'q1', 'sentence': 'The trophy does not fit in the case because _ is too big.',
          'option1': 'the trophy', 'option2': 'the case', 'answer': '1'}
  _write(tmp_path, {'train_xs.jsonl': [line], 'train_m.jsonl': [line, dict(line, answer='2')],
                    'dev.jsonl': [dict(line, answer=2)]})
  task = load_task(f'winogrande:{tmp_path}')
  assert len(task.examples('train')) == 2  # the largest size there: m
  assert len(load_task(f'winogrande:{tmp_path}', size='xs').examples('train')) == 1
  (dev,) = task.examples('validation')
  before = 'The trophy does not fit in the case because '
  assert _choices(dev) == [(before + 'the trophy', ' is too big.'),
                           (before + 'the case', ' is too big.')]
  assert dev.label == 1
  assert dev.demonstration == 'The trophy does not fit in the case because the case is too big.'
  with pytest.raises(FileNotFoundError, match='train_xl.jsonl'):
    load_task(f'winogrande:{tmp_path}', size='xl')
  with pytest.raises(ValueError, match="size='xxl'"):
    load_task(f'winogrande:{tmp_path}', size='xxl')
  _write(tmp_path, {'dev.jsonl': [line, dict(line, sentence='No blank.')]})
  with pytest.raises(ValueError, match=r"dev.jsonl, line 2: field 'sentence' has 0 blanks"):
    load_task(f'winogrande:{tmp_path}')


@pytest.mark.parametrize('main', ['Main/', ''])
def test_openbookqa(tmp_path, main):
  question = {'id': '7-980', 'question': {'stem': 'The sun is responsible for', 'choices': [
      {'text': 'puppies learning new tricks', 'label': 'A'},
      {'text': 'plants sprouting, blooming and wilting', 'label': 'B'},
      {'text': 'children growing up', 'label': 'C'}, {'text': 'flowers wilting', 'label': 'D'}]},
      'answerKey': 'B'}
  _write(tmp_path, {f'{main}train.jsonl': [question], f'{main}dev.jsonl': [question],
                    f'{main}test.jsonl': [dict(question, answerKey='D')]})
  task = load_task(f'openbookqa:{tmp_path}')
  assert set(task.splits) == {'train', 'validation', 'test'}
  (train,) = task.examples('train')
  assert _choices(train)[1] == ('The sun is responsible for',
                                ' plants sprouting, blooming and wilting')
  assert (train.label, task.examples('test')[0].label) == (1, 3)
  assert train.demonstration == 'The sun is responsible for plants sprouting, blooming and wilting'
  _write(tmp_path, {f'{main}dev.jsonl': [dict(question, answerKey='E')]})
  with pytest.raises(ValueError, match=r"line 1: field 'answerKey' is 'E'; expected one of"):
    load_task(f'openbookqa:{tmp_path}')


def test_copa(tmp_path):
  _write(tmp_path, {
      'train.jsonl': [{'premise': 'My body cast a shadow over the grass.',
                       'choice1': 'The sun was rising.', 'choice2': 'The grass was cut.',
                       'question': 'cause', 'label': 0, 'idx': 0}],
      'val.jsonl': [{'premise': 'The man lost his balance.', 'choice1': 'He fell.',
                     'choice2': "I laughed.", 'question': 'effect', 'label': 1}]})
  task = load_task(f'copa:{tmp_path}')
  (train,), (val,) = task.examples('train'), task.examples('validation')
  because = 'My body cast a shadow over the grass because'
  assert _choices(train) == [(because, ' the sun was rising.'), (because, ' the grass was cut.')]
  assert _choices(val) == [('The man lost his balance so', ' he fell.'),
                           ('The man lost his balance so', ' I laughed.')]
  assert (train.label, val.label) == (0, 1)
  assert val.demonstration == 'The man lost his balance so I laughed.'
  _write(tmp_path, {'val.jsonl': [{'premise': 'P.', 'choice1': 'A.', 'choice2': 'B.',
                                   'question': 'reason', 'label': 1}]})
  with pytest.raises(ValueError, match="line 1: field 'question' is 'reason'"):
    load_task(f'copa:{tmp_path}')


def test_boolq(tmp_path):
  _write(tmp_path, {
      'train.jsonl': [{'question': 'is the sky blue', 'passage': 'The sky is blue.',
                       'label': True},
                      {'question': 'is grass red?', 'passage': 'Grass is green.', 'label': False}],
      'val.jsonl': [{'question': 'q', 'passage': 'p', 'label': True}]})
  task = load_task(f'boolq:{tmp_path}')
  assert task.labels == ('no', 'yes')
  sky, grass = task.examples('train')
  context = 'The sky is blue.\nQuestion: is the sky blue?\nAnswer:'
  assert _choices(sky) == [(context, ' no'), (context, ' yes')]
  assert (sky.label, grass.label) == (1, 0)
  assert grass.demonstration == 'Grass is green.\nQuestion: is grass red?\nAnswer: no'
  _write(tmp_path, {'val.jsonl': [{'question': 'q', 'passage': 'p', 'label': 1}]})
  with pytest.raises(ValueError, match="line 1: field 'label' is 1; expected bool"):
    load_task(f'boolq:{tmp_path}')


def test_sst2(tmp_path):
  _write(tmp_path, {'train.tsv': ['sentence\tlabel', 'hide new secretions \t0',
                                  'the film \'s " charm " works \t1'],
                    'dev.tsv': ['sentence\tlabel', "it 's a charming journey . \t1"],
                    'test.tsv': ['index\tsentence', '0\tunlabelled']})
  task = load_task(f'sst2:{tmp_path}')
  assert (task.labels, set(task.splits)) == (('negative', 'positive'), {'train', 'validation'})
  bad, good = task.examples('train')
  assert _choices(bad) == [('Review: hide new secretions\nSentiment:', ' negative'),
                           ('Review: hide new secretions\nSentiment:', ' positive')]
  assert (bad.label, good.label, good.id) == (0, 1, 'train.tsv:3')
  assert good.demonstration == 'Review: the film \'s " charm " works\nSentiment: positive'


# ----------------------------------------------------------------- built-in tasks


def test_sentences_and_word_boundaries():
  text = 'Mr. Smith went to Washington.  He said: "Yes." The U.S.\nArmy is big! Is it? 5 men.'
  assert corpus_text.split_sentences(text) == [
      'Mr. Smith went to Washington.', 'He said: "Yes."', 'The U.S. Army is big!', 'Is it?',
      '5 men.']
  assert corpus_text.head('alpha beta gamma', 10) == 'alpha beta'
  assert corpus_text.head('alpha beta gamma', 9) == 'alpha'
  assert corpus_text.tail('alpha beta gamma', 10) == 'beta gamma'
  assert corpus_text.tail('alpha beta gamma', 9) == 'gamma'
  assert corpus_text.passages(' a bb\nccc dd  e ', 6) == ['a bb', 'ccc dd', 'e']


def test_kjv_verses_make_the_chapters():
  chapters = corpus.kjv_chapters()
  verses = corpus_text.kjv_verses()
  assert [c for c, _ in verses][:2] == [1001, 1002] and len(verses) == len(chapters)
  assert verses[0][1][0] == 'In the beginning God created the heaven and the earth.'
  # The module's text does not always put a space between verses, so compare without any.
  for (_, chapter_verses), chapter in zip(verses, chapters):
    assert ''.join(''.join(chapter_verses).split()) == ''.join(chapter.split())


def test_kjv_and_pydoc_splits_are_disjoint_and_cover_all():
  kjv = {s: {d.name for d in corpus_text.kjv_documents(s)} for s in ('train', 'validation')}
  pydoc = {s: {n for n, _ in corpus_text.pydoc_documents(s)} for s in ('train', 'validation')}
  for names, total in ((kjv, 1189), (pydoc, len(corpus.pydoc_topics()))):
    assert not names['train'] & names['validation']
    assert len(names['train'] | names['validation']) == total
    assert 0.1 < len(names['validation']) / total < 0.3
  # Fixed once and for all, so that results of different versions stay comparable.
  assert len(kjv['validation']) == 251
  assert sorted(kjv['validation'])[:4] == ['kjv:01001', 'kjv:01003', 'kjv:01007', 'kjv:01010']


@pytest.fixture(scope='module')
def next_unit_tasks():
  return {'sotu_next_sentence': load_task('sotu_next_sentence'),
          'kjv_next_verse': load_task('kjv_next_verse')}


def _compact_source(name, split):
  """{document name: its text without whitespace} of a next-unit task's source documents."""
  if name == 'sotu_next_sentence':
    return {p.stem: ''.join(p.read_text(encoding='utf-8').split())
            for p in corpus.sotu_split_files(split)}
  chapters = corpus.kjv_chapters()
  names = [f'kjv:{c:05d}' for c, _ in corpus_text.kjv_verses()]
  held = {d.name for d in corpus_text.kjv_documents('validation')}
  return {n: ''.join(t.split()) for n, t in zip(names, chapters)
          if (n in held) == (split == 'validation')}


@pytest.mark.parametrize('name', ['sotu_next_sentence', 'kjv_next_verse'])
def test_next_unit_answer_is_the_true_next_one(name, next_unit_tasks):
  task = next_unit_tasks[name]
  assert (task.shots_split, task.eval_split, task.labels) == ('train', 'validation', None)
  for split in ('train', 'validation'):
    texts = _compact_source(name, split)
    examples = task.examples(split)
    assert 300 <= len(examples) <= 5000
    for example in examples:
      document = example.id.split('/')[0]
      assert len(example.choices) == 4 and len({c.context for c in example.choices}) == 1
      assert len(example.choices[0].context) <= 200
      assert all(len(c.continuation) <= 120 and c.continuation.startswith(' ')
                 for c in example.choices)
      # The context followed by the answer is a piece of the example's own document.
      assert ''.join(example.demonstration.split()) in texts[document], example
      answer = example.choices[example.label].continuation
      distractors = [c.continuation for i, c in enumerate(example.choices) if i != example.label]
      assert answer not in distractors and len(set(distractors)) == 3
      for distractor in distractors if split == 'validation' else ():
        # From another document of the same split.
        assert any(''.join(distractor.split()) in text for other, text in texts.items()
                   if other != document), (distractor, example.id)
    positions = collections.Counter(e.label for e in examples)
    assert set(positions) == {0, 1, 2, 3} and max(positions.values()) < 0.35 * len(examples)


@pytest.mark.parametrize('name', ['sotu_next_sentence', 'kjv_next_verse'])
def test_next_unit_evaluation_text_is_not_in_train_documents(name, next_unit_tasks):
  train_text = '\n'.join(_compact_source(name, 'train').values())
  held = _compact_source(name, 'validation')
  for example in next_unit_tasks[name].examples('validation'):
    assert example.id.split('/')[0] in held
    assert ''.join(example.demonstration.split()) not in train_text, example


@pytest.mark.parametrize('name', TASK_NAMES)
def test_builtin_tasks_are_deterministic_under_the_seed(name, next_unit_tasks):
  small = {'corpus_source': {'train_per_class': 20, 'validation_per_class': 20}}.get(
      name, {'num_examples': 50})
  first, again = load_task(name, seed=3, **small), load_task(name, seed=3, **small)
  assert first == again
  assert load_task(name, seed=4, **small).splits != first.splits
  if name in next_unit_tasks:  # fewer examples are the first ones of more, same seed
    assert load_task(name, **small).splits['validation'] == (
        next_unit_tasks[name].examples('validation')[:50])


def _compact_texts(texts):
  return '\n'.join(''.join(t.split()) for t in texts)


def test_corpus_source_is_balanced_and_from_the_right_documents():
  task = load_task('corpus_source')
  assert task.labels == ('speech', 'scripture', 'documentation')
  assert (task.shots_split, task.eval_split) == ('train', 'validation')
  kjv_held = {d.name for d in corpus_text.kjv_documents('validation')}
  kjv = {f'kjv:{c:05d}': text for (c, _), text in zip(corpus_text.kjv_verses(),
                                                      corpus.kjv_chapters())}
  pydoc = {n: t for split in ('train', 'validation') for n, t in corpus_text.pydoc_documents(split)}
  pydoc_held = {n for n, _ in corpus_text.pydoc_documents('validation')}
  sources = [  # per label: {document: text} of the held-out and of the train documents
      ({p.stem: p.read_text() for p in corpus.sotu_split_files('validation')},
       {p.stem: p.read_text() for p in corpus.sotu_split_files('train')}),
      ({n: t for n, t in kjv.items() if n in kjv_held},
       {n: t for n, t in kjv.items() if n not in kjv_held}),
      ({n: t for n, t in pydoc.items() if n in pydoc_held},
       {n: t for n, t in pydoc.items() if n not in pydoc_held})]
  for split in ('train', 'validation'):
    examples = task.examples(split)
    counts = collections.Counter(e.label for e in examples)
    assert set(counts) == {0, 1, 2} and len(set(counts.values())) == 1
    assert counts[0] == 1000 if split == 'train' else 200 <= counts[0] <= 250
    assert len({e.choices[0].context for e in examples}) == len(examples)
    assert [e.label for e in examples[:30]] != sorted(e.label for e in examples[:30])
    for example in examples:
      assert _choices(example)[1][1] == ' scripture'
      passage, ending = example.choices[0].context.rsplit('\n', 1)
      assert ending == 'Source:' and 100 <= len(passage) <= 200 and '\n' not in passage
      held, train = sources[example.label]
      document = example.id.rsplit('/', 1)[0]
      assert document in (held if split == 'validation' else train), example.id
      assert ''.join(passage.split()) in ''.join(
          (held if split == 'validation' else train)[document].split())
  for label, (_, train) in enumerate(sources):
    train_text = _compact_texts(train.values())
    for example in task.examples('validation'):
      if example.label == label:
        passage = example.choices[0].context.rsplit('\n', 1)[0]
        assert ''.join(passage.split()) not in train_text, example.id
