"""`moescale COMMAND ...`: the command line. Heavy modules are imported inside each command, so
`moescale --help` and every command that reads no data never import TensorFlow.

    moescale train --gin_file=F [--gin_file=G] [--gin.NAME=VALUE] [--gin_search_paths=a,b]
    moescale demo                      the tiny run on the embedded corpus (`make demo`: a study)
    moescale vocab --input F [F ...] --model_prefix P --vocab_size N
    moescale bench [--quick] [--json]  layer and training-step benchmarks (no gin, no data)
    moescale pairs check|make|list     matched experiment pairs (see `moescale pairs --help`)
    moescale families                  the registered FFN families and their arguments
    moescale eval RUN_DIR [--tasks ...]  perplexity by domain of a checkpoint (moescale.evaluate)
    moescale prime RUN_DIR --task T [--shots 0,4] [--draws 25]  zero- / few-shot accuracy
    moescale finetune RUN_DIR --task T --out NEW_DIR [--freeze_router]  fine-tune, compare
    moescale collect RUN_DIR... --out FILE  one record per (run, domain): counts, compute, ppl
    moescale speedup FILE [--json] [--fit powerlaw] [--plot DIR]  speedup factors by domain
    moescale report RUN_DIRS... --out DIR   report.md with PNG plots (a study root: all its runs)
    moescale plan --gin_file=F --platform=tpu_v5p --mesh=D,F,T,E  memory, collectives, time

Bad input (an unknown gin name, an unused macro, an impossible size) exits with status 2 and one
paragraph naming the value, no traceback: `--debug` anywhere on the line (`moescale train ...
--debug`), or MOESCALE_DEBUG=1, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from moescale import distributed

_COMMANDS = {}


def command(name: str, help: str):
  def wrap(fn):
    _COMMANDS[name] = (fn, help)
    return fn
  return wrap


def _gin_args(argv: Sequence[str]):
  from moescale import gin_config
  files, bindings, paths, rest = gin_config.split_gin_flags(argv)
  return files, bindings, paths, rest


@command('train', 'train (or resume) a model from gin files, t5x style')
def _train(argv: Sequence[str]) -> int:
  files, bindings, paths, rest = _gin_args(argv)
  p = argparse.ArgumentParser(prog='moescale train', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  distributed.add_flags(p)
  p.add_argument('--allow_config_change', action='store_true',
                 help='resume a MODEL_DIR whose checkpoints were trained under another config')
  args = p.parse_args(rest)
  distributed.check_flags(p, args)
  if not files:
    p.error('at least one --gin_file is required, e.g. --gin_file=runs/tiny.gin')
  distributed.initialize(args)
  from moescale import gin_config
  gin_config.parse(files, bindings, paths, check_bindings=True)
  extra = {'allow_config_change': True} if args.allow_config_change else {}
  summary = gin_config.configured('run_training')(**extra)
  print(summary)
  return 0


@command('demo', 'train the tiny default model on the embedded corpus (make demo runs a study)')
def _demo(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog='moescale demo')
  p.add_argument('--model_dir', default='runs/tiny')  # runs/demo is make demo's study
  p.add_argument('--steps', type=int, default=None)
  args, extra = p.parse_known_args(argv)
  flags = ['--gin_file=runs/tiny.gin', f"--gin.MODEL_DIR='{args.model_dir}'", *extra]
  if args.steps is not None:
    flags.append(f'--gin.TRAIN_STEPS={args.steps}')
  return _train(flags)


@command('count', 'parameters and FLOPs of a gin-configured model, from abstract shapes')
def _count(argv: Sequence[str]) -> int:
  files, bindings, paths, rest = _gin_args(argv)
  p = argparse.ArgumentParser(prog='moescale count')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument('--context_length', type=int, default=None,
                 help='keys per query for attention FLOPs (default: TASK_FEATURE_LENGTHS '
                      'targets, else MAX_LENGTH)')
  args = p.parse_args(rest)
  if not files:
    p.error('at least one --gin_file is required, e.g. --gin_file=models/decoder.gin')
  import json
  import gin
  from moescale import accounting, gin_config
  gin_config.parse(files, bindings, paths, finalize=False, check_bindings=True)
  lengths = gin_config.query('TASK_FEATURE_LENGTHS') or {}
  context = args.context_length or lengths.get('targets') or gin_config.query('MAX_LENGTH')
  if not context:
    p.error('no context length: pass --context_length or bind TASK_FEATURE_LENGTHS')
  if int(context) < 1:   # else negative attention FLOPs, printed as if they were counts
    raise ValueError(f'context length {context} must be >= 1 (--context_length, or '
                     "TASK_FEATURE_LENGTHS['targets'])")
  model_fn = gin_config.query('MODEL')
  if model_fn is None:
    p.error('the gin files bind no MODEL (include a models/*.gin file)')
  c = accounting.count(model_fn, int(context))
  if args.json:
    print(json.dumps(c.as_dict(), indent=1))
    return 0
  print(f'total params        {c.total_params:>18,}')
  print(f'active params/token {c.active_params:>18,}')
  print(f'embedding params    {c.embedding_params:>18,}')
  print(f'context length      {c.context_length:>18,}')
  print(f'forward FLOPs/token {c.flops_per_token:>18,.0f}')
  for conv, v in c.train_flops_per_token.items():
    print(f'train FLOPs/token   {v:>18,.0f}  ({conv})')
  for k, v in sorted(c.flops_breakdown.items(), key=lambda kv: -kv[1]):
    print(f'  {k:<17} {v:>18,.0f}  {100 * v / c.flops_per_token:5.1f}%')
  del gin
  return 0


@command('families', 'the FFN families gin and the study API know, with their arguments')
def _families(argv: Sequence[str]) -> int:
  argparse.ArgumentParser(prog='moescale families',
                          description='the registered FFN families').parse_args(argv)
  import inspect
  from moescale.layers import registry
  given = ('self', 'd_model', 'dtype', 'param_dtype', 'rngs')  # the model passes these
  for name, cls in registry.families().items():
    args = [p for p in inspect.signature(cls.__init__).parameters if p not in given]
    doc = (cls.__doc__ or '').strip().split('\n')[0]
    print(f'{name}  ({cls.__module__})\n  {doc}\n  arguments: {", ".join(args)}')
  return 0


@command('pairs', 'check experiment pairs (matched FLOPs or parameters), derive partners')
def _pairs(argv: Sequence[str]) -> int:
  from moescale import pairs
  return pairs.main(list(argv)) or 0


@command('vocab', 'train a SentencePiece vocabulary from text files')
def _vocab(argv: Sequence[str]) -> int:
  p = argparse.ArgumentParser(prog='moescale vocab')
  p.add_argument('--input', nargs='+', required=True, help='text files')
  p.add_argument('--model_prefix', required=True, help='writes PREFIX.model and PREFIX.vocab')
  p.add_argument('--vocab_size', type=int, default=8000)
  p.add_argument('--model_type', default='unigram', choices=['unigram', 'bpe', 'char', 'word'])
  args = p.parse_args(argv)
  from moescale.data import vocab
  path = vocab.train_sentencepiece(args.input, args.model_prefix, args.vocab_size,
                                   model_type=args.model_type)
  print(path)
  return 0


@command('eval', 'loss, perplexity and bits per byte of a checkpoint, task by task')
def _eval(argv: Sequence[str]) -> int:
  from moescale.evaluate import cli
  return cli.eval_main(argv)


@command('prime', 'zero- and few-shot multiple-choice accuracy of a checkpoint')
def _prime(argv: Sequence[str]) -> int:
  from moescale.evaluate import cli
  return cli.prime_main(argv)


@command('finetune', 'fine-tune a pretrained run on a task into a new run directory')
def _finetune(argv: Sequence[str]) -> int:
  from moescale.evaluate import cli
  return cli.finetune_main(argv)


@command('collect', 'gather runs into one CSV / JSON-lines file: family, counts, compute, ppl')
def _collect(argv: Sequence[str]) -> int:
  from moescale.analysis import cli
  return cli.collect_main(argv)


@command('speedup', 'speedup factors over the dense curve per domain, and parameter-matched pairs')
def _speedup(argv: Sequence[str]) -> int:
  from moescale.analysis import cli
  return cli.speedup_main(argv)


@command('report', 'report.md with plots: speedups, matched pairs, curves, usage, priming')
def _report(argv: Sequence[str]) -> int:
  from moescale.analysis import cli
  return cli.report_main(argv)


@command('plan', 'compile the training step for a mesh of simulated devices: will it fit, '
                 'how fast')
def _plan(argv: Sequence[str]) -> int:
  from moescale.plan import cli
  return cli.main(argv)


@command('bench', 'benchmark sparse layers against FLOP-matched dense layers')
def _bench(argv: Sequence[str]) -> int:
  from moescale import bench
  bench.main(list(argv))  # returns its records (for Python callers), not an exit status
  return 0


def _user_error(e: Exception) -> str | None:
  """The message to print for an error bad input caused, or None for a bug (a traceback).
  A TypeError counts only out of a gin-configured call: a bound value of the wrong type."""
  if not isinstance(e, (ValueError, FileNotFoundError, TypeError)):
    return None
  from moescale import gin_checks
  return gin_checks.call_error_message(e)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = '--debug' in argv or os.environ.get('MOESCALE_DEBUG', '') not in ('', '0')
  argv = [a for a in argv if a != '--debug']  # taken anywhere: users append it after an error
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  logging.getLogger('moescale').setLevel(logging.INFO)
  if not debug:  # a failed checkpoint write is reported once, by moescale.train.checkpoint
    from moescale import quiet
    quiet.checkpoint_write_failures()
  if not argv or argv[0] in ('-h', '--help', 'help'):
    width = max(map(len, _COMMANDS))
    print('usage: moescale COMMAND [ARGS...]\n\ncommands:')
    for name, (_, help_) in _COMMANDS.items():
      print(f'  {name:<{width}}  {help_}')
    print('\n`moescale COMMAND --help` for a command\'s flags; --debug (anywhere) shows the '
          'traceback of an error.')
    return 0
  name, rest = argv[0], argv[1:]
  if name not in _COMMANDS:
    print(f"moescale: unknown command {name!r}; valid: {', '.join(_COMMANDS)}", file=sys.stderr)
    return 2
  from moescale.cpu import heap
  heap.keep_heap()  # before JAX starts its CPU client: see moescale.cpu.heap
  try:
    return _COMMANDS[name][0](rest)
  except Exception as e:  # pylint: disable=broad-except
    # Bad input: one clear paragraph, not a traceback (--debug for the traceback).
    message = None if debug else _user_error(e)
    if message is None:
      raise
    print(f'moescale {name}: error: {message}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
