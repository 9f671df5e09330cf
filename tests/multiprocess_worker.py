"""One process of the two-process test (run by test_multiprocess.py, not by pytest itself).

argv: process_id num_processes port model_dir out_json local_devices. The global mesh spans
every process's local CPU devices. Prints nothing; writes the run summary to out_json.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={sys.argv[6]}'
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def main():
  pid, nproc, port, model_dir, out = sys.argv[1:6]
  pid, nproc = int(pid), int(nproc)
  if nproc > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc,
                               process_id=pid)
  import functools
  import numpy as np
  from flax import nnx
  from moescale.data.synthetic import SyntheticData
  from moescale.layers import DenseFFN, TopKMoE
  from moescale.model import TransformerLM
  from moescale.train import optim, trainer

  model_fn = functools.partial(
      TransformerLM, vocab_size=32, d_model=32, num_layers=2, num_heads=4,
      ffn=functools.partial(DenseFFN, d_ff=64),
      sparse_ffn=functools.partial(TopKMoE, num_experts=4, expert_size=32, top_k=2,
                                   capacity_factor=1.0))
  # Plain SGD: parameters then move in proportion to the gradient, so a gradient summed
  # instead of averaged over devices or processes cannot hide behind Adam's normalisation.
  # One device in all: the reference run, no expert parallelism.
  expert = 2 if jax.device_count() > 1 else 1
  cfg = trainer.TrainConfig(
      model_dir=model_dir, train_steps=4, batch_size=8, log_period=2, checkpoint_period=2,
      mesh=trainer.MeshConfig(data=-1, expert=expert), tensorboard=False, progress=False,
      optimizer=optim.OptimizerConfig(name='sgd', learning_rate=0.5, decay='constant',
                                      clip_norm=None))
  summary = trainer.train(model_fn, SyntheticData(vocab_size=32, length=16), cfg)
  params = nnx.to_flat_state(summary.state.params)
  # Gather every parameter to host (fully replicated copy) for the comparison.
  flat = {'/'.join(map(str, p)): np.asarray(jax.experimental.multihost_utils
                                             .process_allgather(v[...], tiled=True)).tolist()
          for p, v in params}
  with open(out, 'w') as f:
    json.dump({'loss': summary['loss'], 'final_step': summary['final_step'],
               'eval': summary.get('validation/eval_loss'), 'params': flat,
               'process_count': jax.process_count(), 'devices': jax.device_count()}, f)


if __name__ == '__main__':
  import jax.experimental.multihost_utils  # noqa: F401
  main()
