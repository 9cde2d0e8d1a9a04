"""``python -m lfi.train [demo|train|eval|maps] ...``; without a subcommand it trains, so that
``torchrun --nproc_per_node=4 -m lfi.train --data ...`` works."""
import sys

from lfi.train.cli import main

sys.exit(main())
