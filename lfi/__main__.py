"""``python -m lfi`` == the ``lfi`` console script."""
import sys

from lfi.cli import main

sys.exit(main())
