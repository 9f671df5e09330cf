"""Evaluating trained runs: what the papers' evaluation sections report, from a run directory.

    from moescale import evaluate
    run = evaluate.load_run('runs/tiny')                       # its latest checkpoint
    evaluate.perplexity(run, ['validation', 'moescale_kjv:validation'])
    evaluate.prime(run, evaluate.load_task('sotu_next_sentence'), shots=4, draws=25)
    evaluate.finetune(run, evaluate.load_task('corpus_source'), 'runs/tiny_ft',
                      evaluate.FinetuneConfig(freeze_router=True))

Modules: run (load a run directory), lm (perplexity by domain), priming (zero- / few-shot
multiple choice), finetune (fine-tuning with MoE options), tasks / formats / builtin (task
data: the public releases' files, tasks built from the embedded corpus), cli (`moescale eval`,
`prime`, `finetune`). The commands, the study code and notebooks all call these. Names load
on first use, so `moescale.evaluate.tasks` alone imports no JAX.
"""

from moescale import lazy

_LAZY = {
    'Run': 'run', 'RunError': 'run', 'load_run': 'run',
    'perplexity': 'lm',
    'prime': 'priming', 'score': 'priming',
    'finetune': 'finetune', 'FinetuneConfig': 'finetune',
    'load_task': 'tasks', 'Task': 'tasks', 'Example': 'tasks', 'Choice': 'tasks',
}

__getattr__, __dir__, __all__ = lazy.names(__name__, _LAZY)
