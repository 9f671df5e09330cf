"""The experiment scripts of experiments/ as modules, for the tests that run them."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load(name: str):
  """experiments/<name>.py, imported under `name`."""
  spec = importlib.util.spec_from_file_location(name, REPO / 'experiments' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
