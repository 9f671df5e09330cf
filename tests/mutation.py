"""`make mutate`'s helper: mutmut's mutants generated, sampled and scored (not a test module).

A full run of the modules setup.cfg's [mutmut] section lists is ~3,100 mutants; each mutant
runs the tests that call its function in a fresh process (imports, XLA start, compiles), 25 s
on average on 2 cores (measured: 180 mutants in 75 minutes): about a day. A sample of 20 per
module answers "how good are the tests" in about 1.5 hours:

  python tests/mutation.py generate          # mutants/ from src/ (no tests run)
  python tests/mutation.py sample 20 --seed 0  # names of 20 mutants per module
  python tests/mutation.py summary 20 --seed 0  # their verdicts, read from mutants/

The sample is stratified (the same number from each module) and nested: for one seed the first
n of a module's shuffled mutants, so a larger sample contains a smaller one and a rerun of the
same sample is free (mutmut keeps every verdict in mutants/). The summary's overall score
weights each module's sampled score by the module's number of mutants (the stratified
estimate), with its binomial standard error.

Works with mutmut 3.8.1 (the version the Makefile pins): `generate` calls the four steps of
`mutmut run` that come before the tests, which mutmut has no command for.
"""

import argparse
import collections
import json
import math
import pathlib
import random
import re
import sys

# mutmut's exit codes (mutmut/stats.py): a timeout is a kill (the mutant made the tests hang or
# spin); 'no tests' (no test calls the function) and 'survived' are not.
_STATUS = {1: 'killed', 3: 'killed', 0: 'survived', 5: 'no tests', 33: 'no tests',
           36: 'timeout', 24: 'timeout', -24: 'timeout', 152: 'timeout', 255: 'timeout',
           None: 'not checked'}
_CAUGHT = ('killed', 'timeout')


def generate() -> None:
  from mutmut import __main__ as mutmut_main
  mutmut_main.makedirs(pathlib.Path('mutants'), exist_ok=True)
  mutmut_main.copy_src_dir()
  mutmut_main.copy_also_copy_files()
  mutmut_main.setup_source_paths()
  mutmut_main.store_lines_covered_by_tests()
  mutmut_main.create_mutants(1)


def verdicts(root: str = 'mutants') -> dict[str, dict[str, str]]:
  """{module: {mutant name: status}} from mutmut's .meta files (its own record of verdicts)."""
  out = {}
  for meta in sorted(pathlib.Path(root, 'src').rglob('*.py.meta')):
    codes = json.loads(meta.read_text())['exit_code_by_key']
    module = str(meta.relative_to(pathlib.Path(root, 'src')))[:-len('.py.meta')]
    module = module.replace('/', '.')
    out[module] = {name: _STATUS.get(code, f'other ({code})') for name, code in codes.items()}
  return out


def only_mutate(config: str = 'setup.cfg') -> list[str]:
  """The modules setup.cfg's [mutmut] only_mutate lists, as dotted names."""
  import configparser
  parser = configparser.ConfigParser()
  parser.read(config)
  paths = parser['mutmut']['only_mutate'].split()
  return [re.sub(r'^src/|\.py$', '', p).replace('/', '.') for p in paths]


def sample(by_module: dict[str, dict[str, str]], n: int | None, seed: int) -> dict[str, list]:
  """The first n of each module's mutants shuffled with `seed` (all of them if n is None)."""
  out = {}
  for module, names in by_module.items():
    names = sorted(names)
    random.Random(f'{seed}:{module}').shuffle(names)
    out[module] = names[:n] if n is not None else names
  return out


def summary(by_module: dict[str, dict[str, str]], chosen: dict[str, list]) -> str:
  """A table of verdicts per module and the stratified overall score with its error."""
  rows, est, var, size = [], 0.0, 0.0, 0
  lines = [f"{'module':32} {'mutants':>7} {'sampled':>7} {'killed':>6} {'timeout':>7}"
           f" {'survived':>8} {'no tests':>8} {'unchecked':>9} {'score':>6}"]
  for module, names in sorted(chosen.items()):
    counts = collections.Counter(by_module[module][name] for name in names)
    checked = len(names) - counts['not checked']
    caught = sum(counts[s] for s in _CAUGHT)
    total = len(by_module[module])
    score = caught / checked if checked else float('nan')
    shown = f'{score:6.1%}' if checked else f'{"-":>6}'
    lines.append(f'{module:32} {total:7} {len(names):7} {counts["killed"]:6} '
                 f'{counts["timeout"]:7} {counts["survived"]:8} {counts["no tests"]:8} '
                 f'{counts["not checked"]:9} {shown}')
    if checked:
      size += total
      est += total * score
      # Binomial variance of the sampled fraction, with the finite-population correction.
      fpc = (total - checked) / max(total - 1, 1)
      var += total**2 * score * (1 - score) / checked * fpc
    rows.append(counts)
  other = {k: v for c in rows for k, v in c.items()
           if k not in (*_CAUGHT, 'survived', 'no tests', 'not checked')}
  if size:
    lines.append(f'score (weighted by mutants per module): {est / size:.1%} '
                 f'± {math.sqrt(var) / size:.1%} (1 s.e.)')
  if other:
    lines.append(f'other verdicts: {other}')
  return '\n'.join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  sub.add_parser('generate', help='mutants/ from src/, no tests run')
  for name in ('sample', 'summary'):
    p = sub.add_parser(name)
    p.add_argument('n', nargs='?' if name == 'summary' else None, type=int,
                   help='mutants per module (summary: all when left out)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--mutants', default='mutants', help="mutmut's directory")
    p.add_argument('--unchecked', action='store_true', help='sample: only those not run yet')
  args = parser.parse_args(argv)
  if args.command == 'generate':
    return generate()
  modules = only_mutate()
  by_module = {m: v for m, v in verdicts(args.mutants).items() if m in modules}
  missing = sorted(set(modules) - set(by_module))
  if missing:
    sys.exit(f'no mutants of {missing} in {args.mutants}/: run `python tests/mutation.py '
             'generate` (or `make mutate`) first')
  chosen = sample(by_module, args.n, args.seed)
  if args.command == 'sample':
    for module, names in chosen.items():
      for name in names:
        if not args.unchecked or by_module[module][name] == 'not checked':
          print(name)
  else:
    print(summary(by_module, chosen))


if __name__ == '__main__':
  main()
