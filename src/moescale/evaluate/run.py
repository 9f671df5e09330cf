"""A trained run, loaded from its directory for evaluation: the model its config.gin builds,
the parameters of one of its checkpoints, its data source and vocabulary, on a device mesh.

    run = load_run('runs/tiny')            # the latest checkpoint; step=N for another
    run.model                              # the nnx model with the checkpoint's parameters
    run.step, run.config, run.vocabulary   # TrainConfig; the seqio vocabulary (built on use)

The run directory is all it needs: MODEL_DIR/config.gin (written by every `moescale train`
and by the study code) and MODEL_DIR/checkpoints/<step>. Evaluation runs sharded like
training (the run's own mesh rules); `mesh` picks another mesh (e.g. one device).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
from flax import nnx

from moescale.train import checkpoint as ckpt_lib
from moescale.train import guard, trainer


class RunError(ValueError):
  pass


@dataclasses.dataclass
class Run:
  """A loaded run; see the module docstring. `state` is the restored TrainState (params,
  non-param variables, optimizer moments, Transformer-XL memory), `built` what `state` was
  restored into (graphdef, shardings, memory spec)."""
  run_dir: str
  step: int
  config: trainer.TrainConfig
  model_fn: Callable
  mesh: Any
  built: trainer.BuiltState
  state: Any
  data_factory: Callable[[], Any]

  @functools.cached_property
  def data(self):
    """The run's data source (moescale.launch.seqio_data: imports seqio and TensorFlow)."""
    data = self.data_factory()
    try:
      guard.check_vocabulary(self.run_dir, data, write=False)
    except guard.VocabularyMismatch as e:
      raise RunError(str(e)) from None
    have, need = getattr(data, 'vocab_size', None), getattr(self.model, 'vocab_size', None)
    if have and need and have > need:
      raise RunError(f'the vocabulary of {self.run_dir} has {have} ids but the checkpoint\'s '
                     f'embedding has {need}: not the vocabulary this model was trained with')
    return data

  @property
  def vocabulary(self):
    return self.data.vocabulary

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.built.graphdef, self.state.params, self.state.rest)

  @property
  def sequence_length(self) -> int:
    return int(getattr(self.data, 'sequence_length', 0) or 0)

  def output_path(self, name: str) -> str:
    """Where results of this checkpoint go: RUN_DIR/eval/<name>_step<step>.json (one file per
    checkpoint: another checkpoint's results are never overwritten)."""
    return os.path.join(self.run_dir, 'eval', f'{name}_step{self.step}.json')


def writes_files() -> bool:
  """Whether this process writes evaluation files (results JSON, a fine-tuned run's config):
  process 0 only, as training's metrics (moescale.train.metrics). Every process computes the
  same, replicated results; one writer keeps two processes from racing on one file."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (multi-process runs only): after process 0 wrote a
  file, so that the others find it there when they read it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def parse_config(run_dir: str, bindings) -> tuple[Callable, trainer.TrainConfig, Callable]:
  """(model constructor, TrainConfig, data-source factory) of run_dir/config.gin with
  `bindings` applied over it (`gin_config.parse_run`; a RunError where it is no run)."""
  from moescale import gin_config
  try:
    return gin_config.parse_run(run_dir, bindings)
  except FileNotFoundError as e:
    if not os.path.isfile(os.path.join(run_dir, 'config.gin')):
      raise RunError(str(e)) from None
    raise


def load_run(run_dir: str, step: int | None = None, *, mesh=None,
             model_overrides: dict | None = None, bindings=()) -> Run:
  """The run in run_dir at `step` (None: its latest checkpoint).

  mesh: a jax Mesh or a trainer.MeshConfig (None: the run's own mesh config, e.g. every
  device); model_overrides: constructor arguments to change, e.g. {'dtype': 'bfloat16'};
  bindings: extra gin bindings applied over config.gin.
  """
  run_dir = os.path.abspath(run_dir)
  model_fn, cfg, data_factory = parse_config(run_dir, bindings)
  if model_overrides:
    model_fn = functools.partial(model_fn, **model_overrides)
  cfg = dataclasses.replace(cfg, model_dir=run_dir)
  if mesh is None or isinstance(mesh, trainer.MeshConfig):
    mesh = (mesh or cfg.mesh).make()
  if not os.path.isdir(os.path.join(run_dir, 'checkpoints')):
    raise RunError(f'{run_dir} has no checkpoints/ directory: train it first (moescale train) '
                   'or point at a run that has one')
  checkpointer = ckpt_lib.Checkpointer(run_dir, keep=None)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise RunError(f'{run_dir} has no complete checkpoint in {checkpointer.directory}: train '
                     'it first (moescale train) or point at a run that has one')
    if step is not None and step not in steps:
      raise RunError(f'{run_dir} has no checkpoint of step {step}; it has {sorted(steps)}')
    built = trainer.build_state(model_fn, cfg, mesh, abstract=True)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            built.state, built.state_sh)
    state, _ = checkpointer.restore(abstract, step)
  finally:
    checkpointer.close()
  return Run(run_dir=run_dir, step=int(state.step), config=cfg, model_fn=model_fn, mesh=mesh,
             built=built, state=state, data_factory=data_factory)
