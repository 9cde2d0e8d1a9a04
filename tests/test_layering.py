"""Layering: the attention library never imports the application built on it.

The core (lfi/ops, lfi/nn, lfi/backends, lfi/integrations, lfi/capture.py, the private lfi/_x.py
modules, lfi/__init__.py and the Triton kernels in kernels/, installed as lfi.kernels) must not
import the training layer (lfi.train, lfi.models, lfi.teachers, lfi.data), the console script
(lfi.cli) or the benchmark harness (lfi.benchmark), neither at module level nor lazily inside a
function. Checked on the AST of every module, so imports in functions that no test runs count too:
``import x``, ``from x import y`` (relative ones resolved; ``from lfi import train`` is lfi.train),
``importlib.import_module`` / ``__import__`` calls, and any other string constant that names such a
module (lazy-import tables such as ``{"Name": "lfi.train.x"}``). The harness and the training
layer are checked the same way against the console script (and each other where it matters).
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CORE = ["lfi/ops", "lfi/nn", "lfi/backends", "lfi/integrations", "lfi/capture.py", "lfi/_[!_]*.py", "kernels",
        "lfi/__init__.py"]
APPLICATION = ("lfi.train", "lfi.models", "lfi.teachers", "lfi.data", "lfi.cli", "lfi.benchmark",
               "lfi.bench")  # lfi.bench: the harness's old name
# (files, modules they must not import)
RULES = [
    (CORE, APPLICATION),
    # the harness measures the library only; the training layer is driven by the CLI, not the reverse
    (["lfi/benchmark"], ("lfi.train", "lfi.models", "lfi.teachers", "lfi.data", "lfi.cli")),
    (["lfi/train", "lfi/models", "lfi/teachers", "lfi/data"], ("lfi.cli", "lfi.benchmark", "lfi.bench")),
]
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.\w+)+$")


def _files(patterns) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):
            out += sorted(ROOT.glob(pat))
        elif (ROOT / pat).is_dir():
            out += sorted((ROOT / pat).rglob("*.py"))
        else:
            out.append(ROOT / pat)
    return out


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as lfi.kernels (setup.py package_dir)
        parts = ["lfi"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every module that ``path`` imports or names as an import target."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    docstrings = _docstring_nodes(tree)
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add((node.lineno, mod))
            found.update((node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if fname in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.add((node.lineno, arg.value))
                elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    found.add((node.lineno, str(arg.values[0].value).rstrip(".")))  # f"lfi.x.{name}": its prefix
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and _DOTTED.match(node.value)):
            found.add((node.lineno, node.value))
    return sorted(found)


def _violations(patterns, forbidden) -> list[str]:
    bad = []
    for path in _files(patterns):
        for line, mod in imported_modules(path):
            hit = next((f for f in forbidden if mod == f or mod.startswith(f + ".")), None)
            if hit is not None:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("patterns,forbidden", RULES, ids=["core", "benchmark", "training"])
def test_layers_do_not_import_what_sits_above_them(patterns, forbidden):
    files = _files(patterns)
    assert files and all(p.is_file() for p in files), patterns
    assert _violations(patterns, forbidden) == []


def test_core_file_set():
    """The core globs cover what the layering promises (a moved or renamed folder fails here)."""
    names = {module_name(p) for p in _files(CORE)}
    for mod in ("lfi", "lfi._dispatch", "lfi.capture", "lfi.ops", "lfi.nn.interaction_loss", "lfi.backends.triton",
                "lfi.integrations.timm", "lfi.kernels", "lfi.kernels.interaction_attention"):
        assert mod in names, mod


def test_checker_sees_every_import_form(tmp_path, monkeypatch):
    src = '''"""Docstring naming lfi.train.trainer is fine."""
import importlib
import lfi.models
from lfi import data
from lfi.teachers.clip import CLIPTeacher
from ..cli import main

def lazy():
    from lfi.benchmark import env
    importlib.import_module("lfi.train.demo")
    importlib.import_module(f"lfi.train.{1}")
    return __import__("lfi.cli")

_LAZY = {"Trainer": "lfi.train.trainer", "ok": "lfi.ops.x"}
'''
    pkg = tmp_path / "lfi" / "nn"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(src)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {m for _, m in imported_modules(pkg / "bad.py")}
    for mod in ("lfi.models", "lfi.data", "lfi.teachers.clip", "lfi.cli", "lfi.cli.main", "lfi.benchmark",
                "lfi.train.demo", "lfi.train", "lfi.train.trainer"):
        assert mod in found, mod
    assert "lfi.train.trainer" not in {m for line, m in imported_modules(pkg / "bad.py") if line == 1}
    lines = {int(v.split(":")[1].split()[0]) for v in _violations(["lfi/nn"], APPLICATION)}
    assert lines == {3, 4, 5, 6, 9, 10, 11, 12, 14}  # not the docstring (line 1)


def test_lazy_attributes_of_the_core_load_no_application_module():
    """At run time too: importing the core and resolving its lazy names (lfi.*, lfi.nn.*,
    lfi.integrations.*) leaves no application module in sys.modules."""
    code = f"""
import importlib, sys
for mod in ("lfi", "lfi.nn", "lfi.integrations"):
    m = importlib.import_module(mod)
    for name in getattr(m, "__all__", []):
        try:
            getattr(m, name)
        except ImportError:
            pass  # an optional dependency that is not installed
bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {APPLICATION!r}))
print(bad)
sys.exit(1 if bad else 0)
"""
    # the environment is this process's: TRITON_INTERPRET as tests/conftest.py set it
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


LAZY_PACKAGES = ("lfi", "lfi.nn", "lfi.integrations", "lfi.teachers", "lfi.train")


def test_lazy_names_resolve_to_what_they_name_even_after_their_modules_load():
    """Every name in a lazy package's __all__ resolves, and to the same object however the package's
    submodules were imported before: a submodule named like a function it defines would shadow the
    function once imported (lfi.train.evaluate was such a module)."""
    code = f"""
import importlib, pkgutil, types
for pkg in {LAZY_PACKAGES!r}:
    p = importlib.import_module(pkg)
    for info in pkgutil.iter_modules(p.__path__):
        if info.name not in ("__main__", "cli"):
            importlib.import_module(pkg + "." + info.name)
    for name in p.__all__:
        value = getattr(p, name)
        assert name in dir(p), (pkg, name)
        assert not isinstance(value, types.ModuleType) or name in ("capture", "integrations", "nn", "timm",
            "open_clip", "transformers"), f"{{pkg}}.{{name}} is the module {{value.__name__}}, not what __all__ names"
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lazy_names_report_unknown_attributes():
    import lfi
    import lfi.train

    for pkg in (lfi, lfi.train):
        with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
            pkg.no_such_name


def _import_kernels_from_root(extra_path: Path | None) -> str:
    """`import kernels` in a Python started in the repository root (root on sys.path, as `python -m`
    puts it), with extra_path on PYTHONPATH; returns what it imported."""
    env = dict(os.environ, PYTHONPATH=str(extra_path) if extra_path else "")
    code = "import kernels; print(kernels.__file__, getattr(kernels, 'INTERPRET', None) is not None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_the_kernels_folder_does_not_shadow_an_installed_kernels_package(tmp_path):
    """kernels/ is importable as the top-level `kernels` from the repository root, a name PyPI's
    `kernels` (Hugging Face's, imported by transformers >= 5.25) also has: when such a package is
    installed, `import kernels` there gets it, not the Triton kernels (transformers failed to import
    under `python -m pytest` otherwise); without one, the folder imports as before."""
    other = tmp_path / "site"
    (other / "kernels").mkdir(parents=True)
    (other / "kernels" / "__init__.py").write_text("CUDAProperties = object\n")
    got = _import_kernels_from_root(other)
    assert got == f"{other / 'kernels' / '__init__.py'} False", got
    alone = tmp_path / "empty"
    alone.mkdir()
    own = _import_kernels_from_root(alone)
    if not own.startswith(str(ROOT / "kernels")):  # a `kernels` distribution is installed in this environment
        assert "/site-packages/" in own and own.endswith(" False"), own
    else:
        assert own == f"{ROOT / 'kernels' / '__init__.py'} True", own
