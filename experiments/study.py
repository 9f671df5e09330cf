"""The study `make study` runs: the demo's models (experiments/demo.py) at more sizes, trained
longer, each configuration with several seeds, about an hour on 2 CPU cores, so that its
comparisons can be read against the seed spread.

- dense models at five sizes (d_model 32 ... 160; 4 layers; d_ff = 4 d_model): the dense curve;
- top-2 MoEs of 16 experts compute-matched (training FLOPs per token) to d32 and d64: Artetxe
  et al.'s question, the speedup factor, in-domain (SOTU) and out of domain (KJV, CPython docs);
- at d96, parameter-matched to the dense model: a σ-MoE, a PKM with ReLU scores, the same PKM
  with softmax scores (Lample et al.'s), and a Top-K activation model: Csordás et al.'s
  questions, is σ-MoE within a few percent of dense, does PKM's ReLU beat its softmax?

Every configuration trains with SEEDS (initialisation and data order); the report gives each
configuration's mean and spread (min..max over seeds) and the answers to both papers'
questions (`moescale.analysis.questions`), which this script also prints at the end.

    python experiments/study.py                      # into runs/study (see --root)
    python experiments/study.py --dry_run            # write the runs, check the pairs, counts
    python experiments/study.py --quick --root DIR   # the same grid, tiny, in seconds

Run again, it continues (finished runs and evaluations reused, a stopped run resumed); a
directory holding a different grid is left alone and the study goes to DIR-2, DIR-3, ...
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')  # as experiments/demo.py, before JAX loads

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo  # noqa: E402  (the models, training settings and evaluation of the demo)

from moescale.study import Family, ScalingStudy, script  # noqa: E402

TRAIN_STEPS = 600
SEEDS = (0, 1, 2)
# The learning rate of every family at a size (README.md, "The study": measured at 600 steps,
# seed 0, SOTU validation perplexity): d32 1.5e-3 / 3e-3 / 6e-3 6.97 / 6.23 / 6.43; d64
# 1.5e-3 / 3e-3 5.42 / 5.36; d128 1e-3 / 1.5e-3 / 3e-3 4.73 / 4.70 / 4.99; d160 4.68 / 4.69 /
# 5.06. 3e-3 up to d64, then 3e-3 x 64 / d_model (d96 interpolated): with the demo's 3e-3
# everywhere the dense curve stopped improving after d96, which inflated every speedup.
LEARNING_RATES = {'d32': 3e-3, 'd64': 3e-3, 'd96': 2e-3, 'd128': 1.5e-3, 'd160': 1.2e-3}
SIZES = {
    **demo.SIZES,
    'd160': dict(demo.SIZES['d128'], d_model=160, d_ff=640),
}
QUICK_SIZES = {k: demo.QUICK_SIZES[k] for k in ('d8', 'd24', 'd32')}


def pkm_softmax(size):
  """The PKM with Lample et al.'s softmax over the top-k scores instead of Csordás et al.'s
  ReLU: the same keys and values (so the same parameters as `pkm`)."""
  spec = demo.pkm(size)
  return None if spec is None else spec.replace(
      sparse_ffn=spec['sparse_ffn'].replace(score_fn='softmax'))


def _size_lr(name: str, size) -> dict:
  """Every family's learning rate at a size (--quick sizes: the demo's)."""
  return {'optimizer': {'learning_rate': LEARNING_RATES.get(name, demo.LEARNING_RATES['dense'])}}


FAMILIES = tuple(dataclasses.replace(f, train=_size_lr) for f in demo.FAMILIES) + (
    Family('pkm_softmax', pkm_softmax, knob='pkm_keys', train=_size_lr, matching=demo.PARAMS),
)


def make_study(train_steps: int = TRAIN_STEPS, quick: bool = False, seeds=None
               ) -> ScalingStudy:
  """The study's grid (quick: the demo's tiny sizes, 2 seeds)."""
  return demo.make_study(train_steps, quick, seeds or (SEEDS[:2] if quick else SEEDS),
                         sizes=QUICK_SIZES if quick else SIZES, families=FAMILIES,
                         name='study')


def answers(result) -> str:
  from moescale.analysis import questions
  return questions.render_text(questions.answer(result.report))


def main(argv=None) -> int:
  return script.main(argv, make_study, demo.evaluation, doc=__doc__, root='runs/study',
                     steps=TRAIN_STEPS, after=answers)


if __name__ == '__main__':
  script.exit(main())
