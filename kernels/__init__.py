"""Triton kernels of lfi (installed as the subpackage ``lfi.kernels``).

INTERPRET records whether the kernels were defined under the Triton CPU interpreter
(TRITON_INTERPRET=1 must be set before this package is imported).
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

from . import interaction_attention  # noqa: E402,F401
