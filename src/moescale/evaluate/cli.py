"""`moescale eval` (and the other evaluation commands): flags -> moescale.evaluate -> a table,
JSON beside the checkpoint, or --json on stdout."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from moescale import distributed


def _run_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('run_dir', help='a run directory (its config.gin and checkpoints/)')
  p.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  p.add_argument('--num_devices', type=int, default=None,
                 help='evaluate on the first N devices (default: the run\'s mesh)')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                 help='compute dtype (default: the run\'s)')
  p.add_argument('--json', action='store_true', help='print the results as JSON')
  p.add_argument('--no_save', action='store_true',
                 help='do not write RUN_DIR/eval/<name>_step<step>.json')
  distributed.add_flags(p)   # every process runs the same command


def parse(p: argparse.ArgumentParser, argv: Sequence[str]):
  """Flags, with --gin.NAME=VALUE bindings applied over the run's config.gin (e.g.
  --gin.TopKMoE.eval_capacity_factor=2.0) kept aside for `load`."""
  from moescale import gin_config
  files, bindings, _, rest = gin_config.split_gin_flags(list(argv))
  if files:
    p.error('evaluation reads the run\'s own config.gin; use --gin.NAME=VALUE to change it')
  args = p.parse_args(rest)
  distributed.check_flags(p, args)
  args.bindings = bindings
  return args


def load(args):
  distributed.initialize(args)
  from moescale.evaluate import run as run_lib
  from moescale.train import trainer
  mesh = None
  if args.num_devices is not None:
    mesh = trainer.MeshConfig(num_devices=args.num_devices)
  overrides = {'dtype': args.dtype} if args.dtype else None
  return run_lib.load_run(args.run_dir, args.step, mesh=mesh, model_overrides=overrides,
                          bindings=args.bindings)


def _name_and_files(p: argparse.ArgumentParser, spec: str) -> tuple[str, list[str]]:
  name, _, files = spec.partition('=')
  if not name or not files:
    p.error(f'--text {spec!r}: expected NAME=FILE[,FILE...]')
  return name, _split_list(files)


def _split_list(text: str | None) -> list[str] | None:
  return [t for t in text.split(',') if t] if text else None


def eval_main(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(
      prog='moescale eval', description='Loss, perplexity and bits per byte of a checkpoint '
      'on evaluation tasks, over whole splits by default.')
  _run_args(p)
  p.add_argument('--tasks', default=None,
                 help="comma-separated 'split' or 'task:split' (default: the run's evaluation "
                      "splits), e.g. validation,moescale_kjv:validation,moescale_pydoc:"
                      'validation')
  p.add_argument('--text', action='append', default=[], metavar='NAME=FILES',
                 help='a domain of your own: text files (comma-separated paths or globs; one '
                      'document per paragraph), evaluated as task NAME; repeat for more')
  p.add_argument('--max_batches', type=int, default=None,
                 help='at most N batches per task (default: the whole split)')
  p.add_argument('--batch_size', type=int, default=None, help='rows per batch')
  p.add_argument('--mem_len', type=int, default=None,
                 help='Transformer-XL memory in tokens (default: the run\'s evaluation memory)')
  args = parse(p, argv)
  from moescale.data import corpus
  from moescale.evaluate import lm
  texts = [_name_and_files(p, spec) for spec in args.text]
  for _, files in texts:   # a missing or empty file: refused before the checkpoint restore
    corpus.text_files_splits({'validation': files})
  run = load(args)
  tasks = _split_list(args.tasks) or ([] if args.text else None)
  for name, files in texts:
    tasks.append(lm.register_text_domain(run, name, files))
  results = lm.perplexity(run, tasks, max_batches=args.max_batches,
                          batch_size=args.batch_size, mem_len=args.mem_len,
                          progress=not args.json)
  path = None if args.no_save else lm.save(run, 'perplexity', results)
  if args.json:
    print(json.dumps({'run_dir': run.run_dir, 'step': run.step, 'results': results}, indent=1))
  else:
    print(f'{run.run_dir} at step {run.step}')
    print(lm.table(results))
    if path:
      print(f'written to {path}')
  return 0


def _prime_table(results: list[dict]) -> str:
  head = ['task', 'shots', 'draws', 'examples', 'chance', 'acc/token', 'acc/byte', 'acc/sum',
          'cut']
  cell = lambda a: f'{a["mean"]:.3f} ± {a["std"]:.3f}'
  rows = [[r['task'], r['shots'], r['draws'], r['examples'], f'{r["chance"]:.3f}',
           cell(r['accuracy']['per_token']), cell(r['accuracy']['per_byte']),
           cell(r['accuracy']['sum']), f'{r["truncated"]:.0%}'] for r in results]
  from moescale.evaluate import lm
  return lm.text_table(head, rows)


def prime_main(argv: Sequence[str]) -> int:
  from moescale.evaluate import tasks as tasks_lib
  p = argparse.ArgumentParser(
      prog='moescale prime', description='Zero- and few-shot multiple-choice accuracy of a '
      'checkpoint (log-likelihood scoring; few-shot averaged over draws of the shots).')
  _run_args(p)
  p.add_argument('--task', required=True, action='append',
                 help=f'a built-in task ({", ".join(tasks_lib.TASK_NAMES)}) or FORMAT:PATH '
                      f'with FORMAT one of {", ".join(tasks_lib.FORMATS)}; repeat for more')
  p.add_argument('--shots', default='0', help='comma-separated shot counts, e.g. 0,1,4')
  p.add_argument('--draws', type=int, default=None,
                 help='draws of the shots per few-shot count (default 25, as the paper)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--max_examples', type=int, default=None, help='evaluate the first N only')
  p.add_argument('--batch_size', type=int, default=None, help='prompts per batch')
  args = parse(p, argv)
  from moescale.evaluate import lm, priming
  shots = _split_list(args.shots) or []
  if not all(s.isdigit() for s in shots):
    p.error(f'--shots={args.shots!r}: valid are counts >= 0, comma-separated, e.g. 0,1,4')
  shots = [int(s) for s in shots]
  # The task files first: a bad one is refused before the slow checkpoint restore.
  loaded = [tasks_lib.load_task(spec) for spec in args.task]
  run = load(args)
  results = []
  for task in loaded:
    for k in shots:
      results.append(priming.prime(run, task, shots=k, draws=args.draws, seed=args.seed,
                                   max_examples=args.max_examples, batch_size=args.batch_size,
                                   progress=not args.json))
  keyed = {f'{r["task"]}/{r["shots"]}shot': r for r in results}
  path = None if args.no_save else lm.save(run, 'priming', keyed)
  if args.json:
    print(json.dumps({'run_dir': run.run_dir, 'step': run.step, 'results': keyed}, indent=1))
  else:
    print(f'{run.run_dir} at step {run.step}')
    print(_prime_table(results))
    if path:
      print(f'written to {path}')
  return 0


def finetune_main(argv: Sequence[str]) -> int:
  from moescale.evaluate import finetune as ft
  from moescale.evaluate import tasks as tasks_lib
  p = argparse.ArgumentParser(
      prog='moescale finetune', description='Fine-tune a pretrained run on a task (the LM '
      'learns the correct continuation) into a new run directory, and compare its accuracy '
      'with the pretrained model\'s zero- and few-shot accuracy.')
  _run_args(p)
  p.add_argument('--task', required=True, help='a built-in task or FORMAT:PATH (see prime)')
  p.add_argument('--out', required=True, help='the new run directory (must not exist yet)')
  d = ft.FinetuneConfig()
  p.add_argument('--steps', type=int, default=d.steps)
  p.add_argument('--batch_size', type=int, default=d.batch_size)
  p.add_argument('--learning_rate', type=float, default=d.learning_rate)
  p.add_argument('--warmup_steps', type=int, default=d.warmup_steps)
  p.add_argument('--freeze_router', action='store_true', help='keep the routers as pretrained')
  p.add_argument('--router_lr_scale', type=float, default=1.0)
  p.add_argument('--expert_lr_scale', type=float, default=1.0)
  p.add_argument('--expert_dropout', type=float, default=None,
                 help="the MoE layers' expert dropout (TopKMoE: on the experts' hidden "
                      "units; σ-MoE: whole experts)")
  p.add_argument('--head', default='label_words', choices=('label_words', 'classifier'),
                 help='learn the label words (as the paper), or a linear head on the last '
                      'context token (classification tasks)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--shots', type=int, default=4, help='the pretrained few-shot comparison')
  p.add_argument('--draws', type=int, default=5)
  p.add_argument('--max_examples', type=int, default=None)
  args = parse(p, argv)
  cfg = ft.FinetuneConfig(
      steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
      warmup_steps=args.warmup_steps, freeze_router=args.freeze_router,
      router_lr_scale=args.router_lr_scale, expert_lr_scale=args.expert_lr_scale,
      expert_dropout=args.expert_dropout, seed=args.seed, head=args.head)
  run = load(args)
  result = ft.finetune(run, tasks_lib.load_task(args.task), args.out, cfg, shots=args.shots,
                       draws=args.draws, max_examples=args.max_examples)
  if args.json:
    print(json.dumps(result, indent=1))
    return 0
  rows = [{**r, 'task': f'{r["task"]} (pretrained)'} for r in result['pretrained'].values()]
  tuned = result['finetuned']
  if args.head == 'classifier':
    print(_prime_table(rows))
    print(f'{result["task"]} (fine-tuned, classification head): accuracy '
          f'{tuned["accuracy"]:.3f} on {tuned["examples"]} examples (chance '
          f'{tuned["chance"]:.3f})')
  else:
    print(_prime_table(rows + [{**tuned, 'task': f'{result["task"]} (fine-tuned)'}]))
  print(f'fine-tuned run: {args.out} (finetune.json)')
  return 0
