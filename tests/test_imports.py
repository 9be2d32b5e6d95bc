"""Every module of every package imports in the test environment, and every third-party module the code
imports is declared in pyproject.toml, in the extra that the importing package is installed with.

CI runs in a fresh virtual environment without the system's site-packages, so a module that imports an
undeclared package fails the first test there; the second one fails on any machine, installed or not."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import shutil
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of tomli, which every venv has
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("imedsam_core", "imedsam_deploy", "imedsam_export", "imedsam_train", "imedsam_cuda")

# Which extras each package may draw on: the base runtime only the base install; training and export the
# [train] extra; the GPU paths the extras that only a GPU machine installs (imported lazily, behind a
# clear error where missing).
# The most specific path prefix applies. The PyTorch GPU runtime runs the PyTorch model, so it needs [train] (and
# [cuda], which declares its torch and triton again).
ALLOWED_EXTRAS = {
    "imedsam_core": {""},
    "imedsam_deploy": {"", "gpu", "tensorrt", "serve"},
    "imedsam_export": {"", "train", "gpu", "tensorrt"},
    "imedsam_train": {"", "train"},
    "imedsam_cuda": {"", "train", "cuda"},
    "benchmarks": {"", "train", "test", "serve"},
    "tests": {"", "train", "test", "gpu", "tensorrt", "serve"},
}
# What every virtual environment has without a declaration.
ALWAYS_THERE = {"pip"}
# Import names whose distribution is not installed with the test environment: cuda-python and TensorRT
# install on GPU machines only; the serve extra's PyTriton pins numpy < 2, so it has an environment of its own.
PROVIDED = {"cuda": "cuda-python", "tensorrt": "tensorrt", "pytriton": "nvidia-pytriton",
            "tritonclient": "tritonclient"}


def _modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    names = _modules(package)
    assert len(names) > 5
    for name in names:
        importlib.import_module(name)


def test_every_benchmark_script_imports():
    scripts = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    assert "lite_speed" in scripts
    for stem in scripts:
        importlib.import_module(f"benchmarks.{stem}")


def _declared(repo: Path) -> dict[str, set[str]]:
    """Distribution name (normalised) -> the extras that declare it ('' for the base install)."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    out: dict[str, set[str]] = {}
    groups = {"": project["dependencies"], **project["optional-dependencies"]}
    for extra, reqs in groups.items():
        for req in reqs:
            name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0]
            out.setdefault(_norm(name), set()).add(extra)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(repo: Path, package: str) -> dict[str, set[str]]:
    """Top-level module name -> files (relative to the repo) that import it, at module level or inside
    functions (``ast``: a module imported by name through importlib is not an import)."""
    found: dict[str, set[str]] = {}
    for f in (repo / package).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                found.setdefault(top, set()).add(str(f.relative_to(repo)))
    return found


def _third_party_imports(repo: Path, package: str) -> dict[str, set[str]]:
    """Top-level module name -> files (relative to the repo) that import it, at module level or inside
    functions."""
    return {top: files for top, files in _imports(repo, package).items()
            if top not in sys.stdlib_module_names
            and top not in (*PACKAGES, "benchmarks", "tests", "conftest", "__future__")}


def _allowed(file: str) -> set[str]:
    return ALLOWED_EXTRAS[max((k for k in ALLOWED_EXTRAS if file.startswith(k)), key=len)]


def _undeclared(package: str, repo: Path) -> list[str]:
    declared = _declared(repo)
    by_module = importlib.metadata.packages_distributions()
    imports = _third_party_imports(repo, package)
    assert imports, package
    problems = []
    for top, files in sorted(imports.items()):
        if top in ALWAYS_THERE:
            continue
        dists = [PROVIDED[top]] if top in PROVIDED else by_module.get(top, [])
        if not dists:
            problems.append(f"{top} (imported by {sorted(files)[0]}) is not installed and not declared")
            continue
        extras = set().union(*(declared.get(_norm(d), set()) for d in dists))
        for f in sorted(files):
            if not extras & _allowed(f):
                problems.append(f"{top} (imported by {f}, distribution {dists}) is declared in "
                                f"{sorted(extras) or 'no extra'}, not in one of {sorted(_allowed(f))}")
    return problems


@pytest.mark.parametrize("package", [*PACKAGES, "benchmarks", "tests"])
def test_every_import_is_declared_in_the_right_extra(package):
    problems = _undeclared(package, REPO)
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_missing_declaration(tmp_path):
    """The declaration check is not vacuous: scipy, imported by the metrics, is caught once undeclared."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^\s*"scipy', text, re.M)
    (tmp_path / "pyproject.toml").write_text(re.sub(r'^\s*"scipy[^\n]*\n', "", text, flags=re.M))
    shutil.copytree(REPO / "imedsam_train", tmp_path / "imedsam_train", ignore=shutil.ignore_patterns("*.pt"))
    problems = _undeclared("imedsam_train", tmp_path)
    assert any(p.startswith("scipy (imported by imedsam_train/metrics.py") for p in problems), problems
    assert _undeclared("imedsam_train", REPO) == []


# Which other imedsam packages each package may import (module level or inside functions; a module found by
# name through importlib is not an import): the foundation none, the runtime and the training code only the
# foundation, the exporter the training code, the PyTorch GPU runtime any of them.
MAY_IMPORT = {
    "imedsam_core": set(),
    "imedsam_deploy": {"imedsam_core"},
    "imedsam_train": {"imedsam_core"},
    "imedsam_export": {"imedsam_core", "imedsam_train"},
    "imedsam_cuda": {"imedsam_core", "imedsam_train", "imedsam_export", "imedsam_deploy"},
}


def _package_imports(repo: Path, package: str) -> dict[str, set[str]]:
    """Other imedsam package -> files of ``package`` that import it (module level or in functions)."""
    return {top: files for top, files in _imports(repo, package).items()
            if top.startswith("imedsam_") and top != package}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its nodes in order, the first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_package_is_in_the_dependency_map():
    on_disk = {p.parent.name for p in REPO.glob("imedsam_*/__init__.py")}
    assert on_disk == set(MAY_IMPORT) == set(PACKAGES)


def test_packages_import_each_other_only_in_the_intended_directions():
    graph = {p: set(_package_imports(REPO, p)) for p in PACKAGES}
    assert _cycle(graph) is None, f"import cycle between packages: {' -> '.join(_cycle(graph) or [])}"
    problems = [f"{p} imports {q} ({', '.join(sorted(files))})"
                for p in PACKAGES for q, files in sorted(_package_imports(REPO, p).items())
                if q not in MAY_IMPORT[p]]
    assert not problems, "\n".join(problems)


def test_the_package_check_sees_a_function_level_import_and_a_cycle(tmp_path):
    """Not vacuous: an import inside a function counts, and two packages importing each other are a cycle."""
    for name, body in [("imedsam_a", "def f():\n    from imedsam_b.x import y\n"),
                       ("imedsam_b", "import importlib\nimportlib.import_module('imedsam_c')\nimport imedsam_a.m\n")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(body)
    graph = {p: set(_package_imports(tmp_path, p)) for p in ("imedsam_a", "imedsam_b")}
    assert graph == {"imedsam_a": {"imedsam_b"}, "imedsam_b": {"imedsam_a"}}
    assert _cycle(graph) == ["imedsam_a", "imedsam_b", "imedsam_a"]
    assert _cycle({"imedsam_a": {"imedsam_b"}, "imedsam_b": set()}) is None


def test_the_runtime_never_imports_torch():
    """imedsam_deploy (and its foundation) import neither torch nor triton anywhere, not even inside a function:
    the torch-cuda backend and the bench's torch models live in imedsam_cuda, found by name."""
    for package in ("imedsam_core", "imedsam_deploy"):
        found = _third_party_imports(REPO, package)
        assert not {"torch", "torchvision", "triton"} & set(found), {k: found[k] for k in ("torch", "triton")
                                                                      if k in found}
