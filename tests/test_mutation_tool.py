"""tests/mutation.py, `make mutate`'s sampler and scorer, on hand-made mutmut records."""

import json

import mutation


def _write_meta(root, module, codes):
  path = root / 'src' / (module.replace('.', '/') + '.py.meta')
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'exit_code_by_key': codes}))


def test_verdicts_read_mutmut_exit_codes(tmp_path):
  _write_meta(tmp_path, 'pkg.a', {'pkg.a.x_f__mutmut_1': 1, 'pkg.a.x_f__mutmut_2': 0,
                                  'pkg.a.x_f__mutmut_3': 33, 'pkg.a.x_f__mutmut_4': None,
                                  'pkg.a.x_f__mutmut_5': -24})
  assert mutation.verdicts(str(tmp_path)) == {'pkg.a': {
      'pkg.a.x_f__mutmut_1': 'killed', 'pkg.a.x_f__mutmut_2': 'survived',
      'pkg.a.x_f__mutmut_3': 'no tests', 'pkg.a.x_f__mutmut_4': 'not checked',
      'pkg.a.x_f__mutmut_5': 'timeout'}}


def test_sample_is_stratified_nested_and_seeded():
  by_module = {m: {f'{m}.x_f__mutmut_{i}': 'not checked' for i in range(50)} for m in 'ab'}
  small, large = mutation.sample(by_module, 5, 0), mutation.sample(by_module, 12, 0)
  for m in 'ab':
    assert len(small[m]) == 5 and len(large[m]) == 12
    assert large[m][:5] == small[m]
    assert set(small[m]) <= set(by_module[m])
  assert mutation.sample(by_module, 5, 1) != small
  assert sorted(mutation.sample(by_module, None, 0)['a']) == sorted(by_module['a'])


def test_summary_weights_modules_by_their_number_of_mutants():
  # Module a: 100 mutants, 4 sampled, all killed (one by timeout). Module b: 300 mutants, 4
  # sampled: 1 killed, 1 survived, 1 without tests, 1 not run yet (left out of its score).
  a = {f'a.x_f__mutmut_{i}': 'not checked' for i in range(100)}
  b = {f'b.x_f__mutmut_{i}': 'not checked' for i in range(300)}
  chosen = {'a': list(a)[:4], 'b': list(b)[:4]}
  for name, status in zip(chosen['a'], ['killed', 'killed', 'killed', 'timeout']):
    a[name] = status
  for name, status in zip(chosen['b'], ['killed', 'survived', 'no tests', 'not checked']):
    b[name] = status
  text = mutation.summary({'a': a, 'b': b}, chosen)
  row_b = next(line for line in text.splitlines() if line.startswith('b '))
  assert row_b.split()[1:] == ['300', '4', '1', '0', '1', '1', '1', '33.3%']
  # (100 * 1 + 300 * 1/3) / 400 = 50%.
  assert 'score (weighted by mutants per module): 50.0% ±' in text
