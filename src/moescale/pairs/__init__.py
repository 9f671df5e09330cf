"""Experiment pairs: two models that must match in one quantity, checked from abstract counts.

A pair file is a gin file that binds only `Pair` (registered by `moescale.gin_config`):

    Pair.dense = ['models/artetxe2022/dense_125m.gin']     # gin files of each member
    Pair.sparse = ['models/artetxe2022/moe_15b.gin']
    Pair.sparse_bindings = ['EXPERT_SIZE = 1408']          # optional extra bindings
    Pair.match = 'train_flops'                             # what must match (MATCHES)
    Pair.convention = 'standard'                           # for train_flops (CONVENTIONS)
    Pair.expected_ratio = 1.0                              # sparse / dense, the target
    Pair.tolerance = 0.01                                  # |ratio / expected - 1| allowed

Member files are looked up like `--gin_file` (the pair file's folder, the working directory,
then the shipped gin/). Bindings are literal gin bindings, applied after the files.

    moescale pairs check [PAIR.gin ...]   the table below; exit 1 if a pair is off (no
                                          arguments: every shipped pair, gin/pairs/**)
    moescale pairs make --dense F.. --sparse F.. --vary SIDE:NAME --match Q [--write P.gin]
                                          the integer value of NAME (a macro or
                                          Configurable.param) on SIDE that matches Q
    moescale pairs list                   the shipped pair files

Counting is abstract (`moescale.accounting`), so even the 1.1T-parameter MoE checks in about
a second. Attention FLOPs use the members' own lengths (`context_lengths`).
"""

from __future__ import annotations

# The modules, by concern (names re-exported here: `pairs.X` is the public API):
#   spec      `Pair` (what gin binds in a pair file) and its vocabularies; `to_gin`
#   matching  pure arithmetic: counted quantities, ratios, `solve_integer`, the table
#   members   gin: reading pair files, counting members (`check`), deriving partners
#   cli       `moescale pairs check|make|list`
from moescale.pairs.cli import main
from moescale.pairs.matching import (MemberCount, PairResult, compare, format_table, human,
                                     solve_integer)
from moescale.pairs.members import (Derivation, check, context_lengths, count_member, derive,
                                    load, shipped_pair_files)
from moescale.pairs.spec import CONVENTIONS, MATCHES, SIDES, Pair, to_gin

__all__ = ['CONVENTIONS', 'MATCHES', 'SIDES', 'Derivation', 'MemberCount', 'Pair', 'PairResult',
           'check', 'compare', 'context_lengths', 'count_member', 'derive', 'format_table',
           'human', 'load', 'main', 'shipped_pair_files', 'solve_integer', 'to_gin']
