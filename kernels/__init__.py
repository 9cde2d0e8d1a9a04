"""Triton kernels of lfi (installed as the subpackage ``lfi.kernels``).

INTERPRET records whether the kernels were defined under the Triton CPU interpreter
(TRITON_INTERPRET=1 must be set before this package is imported).
"""
import os
import sys
from importlib.machinery import PathFinder
from importlib.util import module_from_spec


def _installed_kernels_spec():
    """The spec of a `kernels` package found on sys.path outside this repository, or None. This folder
    is importable as the top-level `kernels` only when the repository root is on sys.path (`python -m`
    run from it); `kernels` is also a PyPI package (Hugging Face's, which transformers >= 5.25 requires
    and imports), which it must not shadow."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return PathFinder.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != root])


_installed = _installed_kernels_spec() if __name__ == "kernels" else None
if _installed is not None:
    # Hand the name over: the import system returns what sys.modules holds once this module has run.
    sys.modules[__name__] = module_from_spec(_installed)
    _installed.loader.exec_module(sys.modules[__name__])
else:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

    from . import interaction_attention  # noqa: F401
