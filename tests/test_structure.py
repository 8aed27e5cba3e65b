"""The shape of the source tree: imports point one way, files stay small, comments point only
inside the repository. Read from the checkout's files (they are what is installed)."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Source folder -> the package it installs as (setup.py's package_dir).
PACKAGES = {"nllfused": "nllfused", "kernels": "nllfused.kernels", "bench": "nllfused.bench"}


def python_modules():
    """{module name: path} for every installed Python module of the checkout."""
    modules = {}
    for folder, package in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    modules[name] = os.path.join(dirpath, f)
    return modules


def imported_modules(name, path, known):
    """The package modules `name` imports anywhere in its file (module level or inside a
    function: a lazy import is still an edge), resolved against `known`."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(parent + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            # "from . import ops" names a module; "from .ops import x" names its module.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycle():
    modules = python_modules()
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    # A package's __init__ is imported before any of its modules: a module's import of its
    # own package's __init__ is implied, not an edge of its own making.
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt in stack[:-1] and node.startswith(nxt + "."):
                continue  # a submodule importing from its parent package
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


SOURCE_DIRS = ("nllfused", "kernels", "csrc")
SOURCE_EXTS = (".py", ".cpp", ".cu", ".cuh", ".h")


def source_files():
    for folder in SOURCE_DIRS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(SOURCE_EXTS):
                    yield os.path.join(dirpath, f)


def test_source_files_stay_small():
    too_long = {os.path.relpath(p, ROOT): n for p in source_files()
                if (n := sum(1 for _ in open(p))) > 700}
    assert not too_long, f"over 700 lines: {too_long}"


def test_no_reference_to_documents_outside_the_repository():
    pattern = re.compile(r"GUIDE\b|shared/|STYLE\.md")
    hits = []
    for folder in SOURCE_DIRS + ("bench", "tests", "docs", "examples"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                path = os.path.join(dirpath, f)
                if path == os.path.abspath(__file__) or not f.endswith(
                        SOURCE_EXTS + (".md", ".cu", "gpu_check")):
                    continue
                for i, line in enumerate(open(path, errors="replace"), 1):
                    if pattern.search(line):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_availability_uses_no_private_dispatcher_api():
    for path in source_files():
        if path.endswith(".py"):
            assert "_dispatch_has_kernel" not in open(path).read(), path
