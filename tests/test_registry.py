"""A fifth FFN family, written in this test module and registered through the public API, is a
first-class citizen with no edit to the package: it counts (its own category), trains through
a gin binding on the command line, and trains through the Python study API."""

import json

import gin
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moescale import accounting, gin_config, layers, study
from moescale.cli import main
from moescale.layers import common


@layers.register_family
class GatedFFN(nnx.Module):
  """A GLU feed-forward layer with a toy auxiliary loss (the hidden units' mean square)."""

  def __init__(self, d_model: int, d_ff: int, *, activity_weight: float = 0.1,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.d_model, self.d_ff, self.activity_weight, self.dtype = (d_model, d_ff,
                                                                  activity_weight, dtype)
    self.w_gate = common.param(rngs, common.fan_in_normal(d_model), (d_model, d_ff),
                               ('embed', 'mlp'), param_dtype)
    self.w_in = common.param(rngs, common.fan_in_normal(d_model), (d_model, d_ff),
                             ('embed', 'mlp'), param_dtype)
    self.w_out = common.param(rngs, common.fan_in_normal(d_ff), (d_ff, d_model),
                              ('mlp', 'embed'), param_dtype)

  def __call__(self, x, *, deterministic=True, segment_ids=None):
    x = x.astype(self.dtype)
    h = jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_in[...])
    activity = jnp.mean(jnp.square(h.astype(jnp.float32)))
    aux = common.Aux(common.weighted({'activity': self.activity_weight}, activity=activity),
                     {'activity': activity})
    return h @ self.w_out[...], aux

  def cost(self) -> common.Cost:
    matmul = 2 * self.d_model * self.d_ff
    return common.Cost(flops={'gate': matmul, 'ffn_in': matmul, 'ffn_out': matmul},
                       active_params=3 * self.d_model * self.d_ff, category='glu')


def test_registered_family_is_listed_and_counted_in_its_own_category():
  assert layers.families()['GatedFFN'] is GatedFFN
  assert layers.GatedFFN is GatedFFN and layers.get_family('GatedFFN') is GatedFFN
  with pytest.raises(ValueError, match=r"unknown FFN family 'GatedFN'.*'GatedFFN'"):
    layers.get_family('GatedFN')
  spec = study.ModelSpec(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                         ffn=study.Component('DenseFFN', d_ff=32),
                         sparse_ffn=study.Component('GatedFFN', d_ff=24))
  c = accounting.count(spec.constructor(), 16)
  assert c.flops_by_category['glu'] == 3 * 2 * 16 * 24          # one GLU layer (layer 2)
  assert c.params_by_category['glu'] == 3 * 16 * 24
  assert [layer['ffn'] for layer in c.layers] == ['DenseFFN', 'GatedFFN']


def test_registered_family_trains_through_a_gin_binding(tmp_path, capsys):
  model_dir = tmp_path / 'gated'
  rc = main(['train', '--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{model_dir}'",
             '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=4', '--gin.NUM_DEVICES=1',
             '--gin.PARALLEL_MICROBATCHES=1', '--gin.EVAL_STEPS=1', '--gin.LOG_PERIOD=1',
             '--gin_bindings=TransformerLM.sparse_ffn = @GatedFFN',
             '--gin_bindings=GatedFFN.d_ff = 64',
             # No data files, no TensorFlow: synthetic text and no TensorBoard writer.
             '--gin_bindings=run_training.data = @synthetic_data()',
             '--gin_bindings=synthetic_data.vocab_size = 264',
             '--gin_bindings=synthetic_data.length = 32',
             '--gin_bindings=TrainConfig.tensorboard = False'])
  assert rc == 0, capsys.readouterr().err
  records = [json.loads(l) for l in open(model_dir / 'metrics.jsonl')]
  trained = [r for r in records if 'loss' in r]
  assert [r['step'] for r in trained] == [1, 2]
  # The family's own loss and metric reach the logs, by the names it gave them.
  assert trained[-1]['aux/activity'] > 0
  assert trained[-1]['routing/layer_02/activity'] > 0 and 'routing/layer_01/activity' not in (
      trained[-1])
  assert 'GatedFFN' in (model_dir / 'config.gin').read_text()
  gin.clear_config()


def test_registered_family_trains_through_the_study_api(tmp_path):
  exp = study.Experiment(
      name='gated', data=study.DataSpec('synthetic', vocab_size=32, length=16),
      model=study.ModelSpec(vocab_size=32, d_model=16, num_layers=2, num_heads=2,
                            ffn=study.Component('DenseFFN', d_ff=32),
                            sparse_ffn=study.Component('GatedFFN', d_ff=24,
                                                       activity_weight=0.5)),
      train=dict(train_steps=2, batch_size=4, log_period=1, eval_steps=1, tensorboard=False,
                 progress=False, mesh={'num_devices': 1}))
  summary = exp.launch(str(tmp_path / 'gated'))
  assert summary.final_step == 2 and summary.loss > 0
  assert summary.state.params['groups']['blocks'][1]['ffn']['w_gate'][...].shape == (1, 16, 24)
  # The operative config it wrote names the family, and parses back to the same model.
  gin_config.parse([str(tmp_path / 'gated' / 'config.gin')])
  model = accounting.abstract_model(gin_config.query('MODEL'))
  assert [type(f).__name__ for _, f in model.ffn_layers()] == ['DenseFFN', 'GatedFFN']
  assert model.ffn_layers()[1][1].activity_weight == 0.5
  gin.clear_config()


def test_families_command_lists_every_registered_family(capsys):
  assert main(['families']) == 0
  out = capsys.readouterr().out
  for name in ('DenseFFN', 'TopKMoE', 'SigmaMoE', 'ProductKeyMemory', 'GatedFFN'):
    assert f'{name}  (' in out, name
  assert 'arguments: d_ff, activity_weight' in out   # what a gin file may bind on it
