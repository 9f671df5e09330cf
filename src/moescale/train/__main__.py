"""`python -m moescale.train ARGS` runs `moescale train ARGS` (t5x's `python -m t5x.train`).

An entry point, so it may import the command line above this package; nothing imports it.
"""

import sys

from moescale.cli import main

sys.exit(main(['train', *sys.argv[1:]]))
