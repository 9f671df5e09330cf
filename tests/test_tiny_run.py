"""The shipped tiny run (gin/runs/tiny.gin) on the embedded corpus, through the command line:
it lowers the validation loss, writes its operative config and metrics, and a second
invocation with more steps resumes from the checkpoint at the right step."""

import json

import gin

from moescale import gin_config
from moescale.cli import main


def _records(model_dir):
  return [json.loads(l) for l in open(model_dir / 'metrics.jsonl')]


def test_tiny_run_lowers_validation_loss_and_resumes(tmp_path):
  model_dir = tmp_path / 'tiny'
  common = ['--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{model_dir}'",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", '--gin.BATCH_SIZE=8',
            '--gin.EVAL_STEPS=2', '--gin.LOG_PERIOD=4', '--gin.CHECKPOINT_PERIOD=8',
            # One microbatch: tiny.gin's 4 unrolled ones (a CPU speed setting, checked for
            # exactness in test_trainer) make each compile here 4x larger (test: 167 s vs 116 s).
            '--gin.PARALLEL_MICROBATCHES=1',
            # The run a user makes on a CPU: one device, not the 8 fake ones of the tests
            # (sharded training: test_trainer, test_train_sharded, test_multiprocess).
            '--gin.NUM_DEVICES=1']
  # One run evaluates the initial model and the trained one (a separate TRAIN_STEPS=0 run
  # costs a whole start-up: 49 s of this test's 152 s with 8 fake devices).
  assert main(['train', *common, '--gin.TRAIN_STEPS=8', '--gin.EVAL_BEFORE_TRAINING=True']) == 0
  evals = [r for r in _records(model_dir) if 'validation/eval_loss' in r]
  assert [r['step'] for r in evals] == [0, 8]
  before, after = evals
  assert after['step'] == 8
  assert after['validation/eval_loss'] < before['validation/eval_loss'] - 0.5
  assert 'moescale_kjv:validation/bits_per_byte' in after           # out-of-domain eval
  assert list((model_dir / 'tensorboard').glob('events.out.tfevents.*'))  # live metrics
  text = (model_dir / 'config.gin').read_text()
  assert 'TopKMoE' in text and str(model_dir) in text

  # More steps, same MODEL_DIR: resumes at step 8, does not start over.
  assert main(['train', *common, '--gin.TRAIN_STEPS=12']) == 0
  train_steps = [r['step'] for r in _records(model_dir) if 'loss' in r]
  assert train_steps == [4, 8, 12]
  steps = sorted(int(p.name) for p in (model_dir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 12 and 8 in steps


def test_swapping_the_family_is_one_binding():
  gin_config.parse(['runs/tiny.gin'], ["MODEL_DIR = '/tmp/unused'",
                                       'TransformerLM.sparse_ffn = @SigmaMoE',
                                       'SigmaMoE.num_experts = 8', 'SigmaMoE.expert_size = 64',
                                       'SigmaMoE.top_k = 2'])
  from moescale import accounting
  model = accounting.abstract_model(gin_config.query('MODEL'))
  kinds = [type(f).__name__ for _, f in model.ffn_layers()]
  assert kinds == ['DenseFFN', 'SigmaMoE', 'DenseFFN', 'SigmaMoE']
  # ...and it runs: the run's loss weights know every family's loss names.
  import jax.numpy as jnp
  from flax import nnx
  out = gin_config.query('MODEL')(rngs=nnx.Rngs(0))(jnp.ones((1, 8), jnp.int32))
  assert out.logits.shape == (1, 8, 264) and 'entropy' in out.aux_losses
  gin.clear_config()
