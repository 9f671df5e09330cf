"""One process of the two-process tests (run by test_multiprocess.py, not by pytest itself).

argv: process_id num_processes port model_dir out_json local_devices [mode]. The global mesh
spans every process's local CPU devices. Prints nothing; writes a summary to out_json.

mode 'train' (the default): trains a tiny MoE on synthetic data; the summary has its losses and
parameters. mode 'evaluate': a one-process worker trains a tiny seqio run in model_dir while
the processes of a multi-process run wait for it; then each evaluates it with
`moescale.evaluate`: multiple-choice scores and perplexity by domain. mode 'resume': `moescale
train` on a seqio mixture, uninterrupted and stopped then resumed; the
summary has both runs' losses and the data position of the resumed run's checkpoint.
"""

import json
import os
import sys
import time

# The compile-time flags of tests/conftest.py: these processes mostly compile (~35% faster).
os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={sys.argv[6]} '
                           '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false')
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def main():
  pid, nproc, port, model_dir, out = sys.argv[1:6]
  mode = sys.argv[7] if len(sys.argv) > 7 else 'train'
  pid, nproc = int(pid), int(nproc)
  if nproc > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc,
                               process_id=pid)
  summary = {'train': train, 'evaluate': evaluate, 'resume': resume}[mode](model_dir)
  summary.update(process_count=jax.process_count(), devices=jax.device_count())
  with open(out, 'w') as f:
    json.dump(summary, f)


def train(model_dir):
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
  return {'loss': summary['loss'], 'final_step': summary['final_step'],
          'eval': summary.get('validation/eval_loss'), 'params': flat}


# A small top-2 MoE on the embedded corpus (seqio, byte vocabulary): what `moescale.evaluate`
# loads needs a run directory with config.gin, which only the gin path writes.
TINY = ['--gin_file=runs/tiny.gin', '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=4',
        '--gin.PARALLEL_MICROBATCHES=1', '--gin.EVAL_STEPS=1', "--gin.TASK_FEATURE_LENGTHS="
        "{'targets': 64}", '--gin.D_MODEL=32', '--gin.NUM_LAYERS=2', '--gin.D_FF=64',
        '--gin.NUM_EXPERTS=4', '--gin.EXPERT_SIZE=32', "--gin.seqio_data.eval_splits="
        "('validation',)"]
# Prompts for priming: 7 pairs in batches of 4 (two batches, the second padded), one longer
# than the 64-token rows. Room for every token at every expert: a capacity-limited MoE drops
# tokens depending on how the batch is split over devices.
PAIRS = [('The Congress', ' shall'), ('We', ' the people of the United States'),
         ('x' * 100, ' end'), ('Fellow citizens', ' of the Senate'), ('In', ' God we trust'),
         ('Mr. Speaker,', ' Mr. President'), ('The state of the Union', ' is strong')]
NO_DROPS = ['TopKMoE.eval_capacity_factor = 8.0']
DOMAINS = ['validation', 'moescale_kjv:validation']


def evaluate(run_dir):
  from moescale import cli
  from moescale.evaluate import lm, priming, run as run_lib
  from moescale.train import trainer
  trained = run_dir + '.trained'   # the one-process reference trains the run; others wait
  if jax.process_count() == 1:
    assert cli.main(['train', *TINY, f"--gin.MODEL_DIR='{run_dir}'"]) == 0
    open(trained, 'w').close()
  else:
    from moescale.data import source  # noqa: F401  (seqio and TensorFlow, while waiting)
    deadline = time.time() + 300
    while not os.path.exists(trained):
      assert time.time() < deadline, f'no {trained} after 300 s'
      time.sleep(0.2)
  # Two processes: data and expert parallelism across them (expert=2 inside each process).
  mesh = trainer.MeshConfig(expert=2 if jax.device_count() > 1 else 1)
  run = run_lib.load_run(run_dir, mesh=mesh, bindings=NO_DROPS)
  scores = priming.score(run, PAIRS, batch_size=4)
  ppl = lm.perplexity(run, DOMAINS, max_batches=2, batch_size=4)
  saved = lm.save(run, f'perplexity_{jax.process_count()}p', ppl)
  bad_batch = None
  if jax.process_count() > 1:
    try:
      priming.score(run, PAIRS, batch_size=3)
    except ValueError as e:
      bad_batch = str(e)
  return {'scores': {k: v.tolist() for k, v in scores.items()}, 'perplexity': ppl,
          'saved': saved, 'bad_batch': bad_batch, 'step': run.step}




def resume(model_dir):
  """4 steps straight, and 2 steps then the same command to 4 (it resumes from step 2), on a
  3 : 1 mixture of SOTU and a made-up task: each process reads its own share of both tasks' documents
  and restores its position from the checkpoint process 0 wrote."""
  import seqio
  from moescale import cli
  from moescale.data import tasks
  tasks.get_provider('moescale_sotu')    # registers the embedded corpus's tasks
  # A second task with a train split (the corpus's other domains are validation only): the
  # same 200 made-up documents in every process.
  path = os.path.join(model_dir, f'numbers{jax.process_index()}.txt')
  with open(path, 'w') as f:
    f.write('\n\n'.join(f'number {i} is {i * i % 97} then {i * 7 % 31}' for i in range(200)))
  tasks.register_text_task('test_mp_numbers', path)
  seqio.MixtureRegistry.add('test_mp_mixture', [('moescale_sotu', 3.0), ('test_mp_numbers', 1.0)])
  flags = [*TINY, "--gin.MIXTURE_OR_TASK_NAME='test_mp_mixture'", '--gin.LOG_PERIOD=1',
           '--gin.CHECKPOINT_PERIOD=2', "--gin.seqio_data.eval_splits=('moescale_kjv:validation',)",
           '--gin_bindings=TrainConfig.tensorboard = False']
  out = {}
  for name, steps in (('straight', 4), ('resumed', 2), ('resumed', 4)):
    run_dir = os.path.join(model_dir, name)
    assert cli.main(['train', *flags, f'--gin.TRAIN_STEPS={steps}',
                     f"--gin.MODEL_DIR='{run_dir}'"]) == 0
    records = [json.loads(l) for l in open(os.path.join(run_dir, 'metrics.jsonl'))]
    out[name] = {r['step']: r['loss'] for r in records if 'loss' in r}
  with open(os.path.join(model_dir, 'resumed', 'checkpoints', '2', 'meta', 'metadata')) as f:
    out['position'] = json.load(f)['data_position']
  return out


if __name__ == '__main__':
  import jax.experimental.multihost_utils  # noqa: F401
  main()
