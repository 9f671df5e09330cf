"""Experiments in Python, without gin: the same models, data and training settings the gin files
describe, expanded into grids of runs (sizes x FFN families x a matching rule).

    Component('TopKMoE', num_experts=512, expert_size=3072)   a constructor by name + kwargs
    ModelSpec(vocab_size=..., ffn=Component('DenseFFN', d_ff=3072), sparse_ffn=..., ...)
        TransformerLM's keyword arguments, FFNs as Components
    DataSpec('seqio', mixture_or_task_name=..., task_feature_lengths={'targets': 2048})
    Experiment(name, model, data, train={TrainConfig kwargs; mesh/optimizer/step as dicts})
    ScalingStudy(name, sizes, families, data, train, matching).expand() -> [Experiment]

Every run gets a directory with its operative configuration written twice: `config.gin`
(runnable as `moescale train --gin_file=DIR/config.gin`, and parsed back to the same model:
tests/test_study.py) and `config.json` (the specs plus the model's counts). `ScalingStudy.run`
trains the runs one after another in this process (`moescale.train.trainer.train`);
`run_study(study, root, Evaluation(...))` does the whole study: pairs checked, runs trained
(finished ones reused, stopped ones resumed), evaluated by domain and priming, and reported
(experiments/demo.py, what `make demo` runs).

Matching: a `Matching(quantity='train_flops')` makes every family with a `knob` (a key of the
size dict its builder reads, e.g. 'expert_size' or 'd_ff') match the reference family in
that quantity, solving for the knob's integer value (`moescale.pairs.solve_integer`); a
family's own `Family(matching=...)` overrides the study's (e.g. parameter-matched families in
a compute-matched study).
Counting is abstract (`moescale.accounting`), so a grid of 1T-parameter models expands in
seconds and nothing here imports TensorFlow until a seqio run trains.
"""

from __future__ import annotations

# The modules, by concern (names re-exported here: `study.X` is the public API):
#   specs       Component, ModelSpec, DataSpec, REQUIRED, train_config; gin / JSON writers
#   experiment  Experiment: one run's counts, run directory and launch
#   grid        Family, Matching, ScalingStudy; table and run_from_args for the scripts
#   evaluation  evaluate_runs: trained runs evaluated from their checkpoints (ScalingStudy.evaluate)
#   session     run_study, Evaluation: a study end to end; choose_root, check_pairs
#   progress    StudyProgress: one progress display for a whole study
from moescale.study.experiment import Experiment
from moescale.study.grid import Family, Matching, ScalingStudy, run_from_args, table
from moescale.study.session import Evaluation, run_study
from moescale.study.specs import (REQUIRED, Component, DataSpec, ModelSpec, _gin_value,
                                  _json_value, train_config)

__all__ = ['REQUIRED', 'Component', 'DataSpec', 'Evaluation', 'Experiment', 'Family', 'Matching',
           'ModelSpec', 'ScalingStudy', 'run_from_args', 'run_study', 'table', 'train_config']
