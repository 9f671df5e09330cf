"""The configs ship with the package: a regular (non-editable) install, used from another
directory, finds the shipped gin files and their package-path includes, and the C++ kernel
sources; nothing reaches back into the source checkout."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_a_regular_install_counts_a_shipped_config_from_another_directory(tmp_path):
  site = tmp_path / 'site'
  # --no-deps --no-build-isolation --no-index: the package alone, built offline with the
  # setuptools of this environment (the dependencies are already installed here).
  build = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-build-isolation',
       '--no-index', '--target', str(site), str(REPO)],
      capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stdout + build.stderr
  shipped = site / 'moescale' / 'gin'
  assert (shipped / 'runs' / 'tiny.gin').is_file() and not shipped.is_symlink()
  assert sorted(p.name for p in (site / 'moescale' / 'cpu').glob('*.cc')) == sorted(
      p.name for p in (REPO / 'src' / 'moescale' / 'cpu').glob('*.cc'))
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (elsewhere / 'runs').mkdir()   # a folder named like a config folder must not confuse gin
  code = ('import json, moescale, moescale.gin_config as g; '
          'from moescale.cli import main; '
          "print(json.dumps({'file': moescale.__file__, 'gin': str(g.shipped_gin_dir())})); "
          "main(['count', '--gin_file=runs/tiny.gin', '--json'])")
  # The installed copy first on the path: before the source tree the test environment has.
  env = dict(os.environ, PYTHONPATH=str(site), MOESCALE_GIN_DIR='')
  run = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  where, counted = run.stdout.split('\n', 1)
  where = json.loads(where)
  assert where['file'].startswith(str(site)) and where['gin'].startswith(str(site)), where
  assert json.loads(counted)['total_params'] > 0
  assert 'Path not found' not in run.stderr and 'ERROR' not in run.stderr, run.stderr
