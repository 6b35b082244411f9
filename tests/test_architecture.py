"""The package's shape, measured with ast: where formats are named, who imports what.

* Each block format is named (outside docstrings and comments) by at most 3 modules, and
  at most 6 modules name any block format: the format table, the enum and the kernels.
* No import cycles between modules, counting imports inside functions too.
* No module imports another module's private (``_``-prefixed) names.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import jquant
from jquant._formats.registry import formats

PACKAGE = Path(jquant.__file__).parent
MAX_MODULES_PER_FORMAT = 3
MAX_MODULES_NAMING_FORMATS = 6
# llama.cpp's ftype table (a port of llama_tensor_get_type): which GGML type each tensor of
# a Q4_K_M file gets is what that module is, so it names formats the way the format table
# does; it is counted apart. The weighted Q4_0/Q4_1/Q5_0/Q5_1 encoders live beside the
# K-quant searches they share, so a legacy format is also named by that kernel module.
MIX_TABLE = "jquant._llama.mixes"
FORMAT_PACKAGE = "jquant._formats"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
        if isinstance(node, (ast.Module, ast.ClassDef)):  # attribute docstrings
            for a, b in zip(node.body, node.body[1:], strict=False):
                if isinstance(a, (ast.Assign, ast.AnnAssign)) and isinstance(b, ast.Expr):
                    if isinstance(b.value, ast.Constant) and isinstance(b.value.value, str):
                        ids.add(id(b.value))
    return ids


def _words(tree: ast.Module) -> list[str]:
    """Identifiers, attribute names and string constants of the code (docstrings excluded)."""
    skip = _docstrings(tree)
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append(node.name)
        elif isinstance(node, ast.alias):
            words.append(node.asname or node.name)
        elif isinstance(node, ast.keyword) and node.arg:
            words.append(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in skip:
                words.append(node.value)
    return words


def format_mentions() -> dict[str, set[str]]:
    """Block format name -> the modules whose code names it (case-insensitive)."""
    names = [s.name.lower() for s in formats() if s.is_block_quantized and s.qtype is not None]
    pattern = {n: re.compile(rf"(?<![a-z0-9]){n}(?![a-z0-9])") for n in names}
    out: dict[str, set[str]] = {n.upper(): set() for n in names}
    for module, tree in MODULES.items():
        text = "\n".join(_words(tree)).lower()
        for n, pat in pattern.items():
            if pat.search(text):
                out[n.upper()].add(module)
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> jquant modules it imports, private cross-module imports)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    private = []
    for module, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("jquant") and a.name in MODULES and a.name != module:
                        graph[module].add(a.name)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                if not target.startswith("jquant"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    dest = sub if sub in MODULES else target
                    if dest != module and dest in MODULES:
                        graph[module].add(dest)
                    if (
                        sub not in MODULES
                        and a.name.startswith("_")
                        and not a.name.startswith("__")
                    ):
                        private.append(f"{module}: from {target} import {a.name}")
    return graph, private


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles between modules (a package's ``__init__`` importing its own modules is fine)."""
    edges = {
        m: {d for d in ds if not (_is_package(m) and d.startswith(m + "."))}
        for m, ds in graph.items()
    }
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_each_block_format_is_named_by_few_modules():
    """Only the format table, the kernels and llama.cpp's mix table name formats.

    Measured today: each format is named by the enum, its record and its kernel module
    (3), plus the weighted-legacy kernel for Q4_0/Q4_1/Q5_0/Q5_1 (4), plus the mix table;
    6 modules of ``jquant._formats`` name any format, plus the mix table. No engine
    (tensor, model, sharded, dot, I/O, CLI, export) names one.
    """
    mentions = format_mentions()
    assert mentions, "no block formats found"
    legacy_weighted = {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}
    for fmt, modules in mentions.items():
        outside = {m for m in modules if m != MIX_TABLE}
        limit = MAX_MODULES_PER_FORMAT + (fmt in legacy_weighted)
        assert len(outside) <= limit, (fmt, sorted(modules))
        assert all(m.startswith(FORMAT_PACKAGE) for m in outside), (fmt, sorted(modules))
    naming = set().union(*mentions.values()) - {MIX_TABLE}
    assert len(naming) <= MAX_MODULES_NAMING_FORMATS, sorted(naming)


def test_no_import_cycles():
    graph, _ = import_graph()
    assert import_cycles(graph) == []


def test_no_private_imports_across_modules():
    _, private = import_graph()
    assert private == []


if __name__ == "__main__":  # the numbers, for the README and reviews
    m = format_mentions()
    print({k: sorted(v) for k, v in m.items()})
    print("modules naming a block format:", len(set().union(*m.values())))
    g, p = import_graph()
    print("cycles:", import_cycles(g))
    print("private imports:", p)
