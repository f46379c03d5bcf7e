"""Every module of megaseg imports, and the packages import each other without a cycle.

Nodes of the package graph are the subpackages of megaseg (``megaseg.ops``,
``megaseg.training``, ...) and its top-level modules (``megaseg.config``,
``megaseg.segment_options``, ...), each its own node. An edge is any import of a megaseg
module found anywhere in a file (module level, inside a function, under TYPE_CHECKING):
a lazy import hides a cycle from the interpreter but not from the reader.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "megaseg"

# Packages megaseg uses only when present (setup.py extras, megatron-core's own optional
# backends): a module may fail to import for their absence and is then skipped.
OPTIONAL = ("transformers", "tokenizers", "triton", "deepspeed", "transformer_engine", "apex", "flash_attn",
            "lm_eval", "matplotlib", "tqdm", "pyarrow", "datasets", "zstandard")
CYCLE_LIMIT = 200

_IMPORT_ALL = """
import importlib, json, sys, traceback
names, optional, out = json.loads(sys.argv[1]), set(json.loads(sys.argv[2])), sys.argv[3]
result = {"failed": {}, "skipped": {}}
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] in optional:
            result["skipped"][name] = e.name
        else:
            result["failed"][name] = traceback.format_exc()
    except (Exception, SystemExit):
        result["failed"][name] = traceback.format_exc()
with open(out, "w") as f:
    json.dump(result, f)
"""


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module under ``root``/megaseg."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def node_of(module: str) -> str:
    """The graph node of a module: its subpackage of megaseg, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def imported_modules(module: str, path: Path, modules: dict[str, Path]):
    """(megaseg module, line) of every import in the file, at any depth."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            if source != PACKAGE or len(submodules) < len(node.names):
                yield source, node.lineno
            for sub in submodules:
                yield sub, node.lineno


def package_edges(root: Path = ROOT) -> dict[tuple[str, str], list[str]]:
    """(node, node it imports) -> the import sites ("megaseg/x/y.py:12")."""
    modules = module_names(root)
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        for target, line in imported_modules(module, path, modules):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            a, b = node_of(module), node_of(target)
            site = f"{path.relative_to(root).as_posix()}:{line}"
            if a != b and site not in edges[a, b]:
                edges[a, b].append(site)
    return dict(edges)


def simple_cycles(edges, limit: int = CYCLE_LIMIT) -> list[list[str]]:
    """Every simple cycle [a, b, ..., a] of the graph, each once (from its smallest node);
    at most ``limit`` of them."""
    succ = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    nodes = sorted(set(succ) | {b for bs in succ.values() for b in bs})
    rank = {n: i for i, n in enumerate(nodes)}
    found: list[list[str]] = []

    def walk(start, path):
        for nxt in sorted(succ[path[-1]]):
            if len(found) >= limit:
                return
            if nxt == start:
                found.append(path + [start])
            elif rank[nxt] > rank[start] and nxt not in path:
                walk(start, path + [nxt])

    for start in nodes:
        walk(start, [start])
    return found


def describe(cycles, edges) -> str:
    count = f"{len(cycles)}{' or more' if len(cycles) >= CYCLE_LIMIT else ''}"
    lines = [f"{count} import cycle(s) between megaseg's packages (imports inside functions count too):"]
    for cycle in cycles:
        lines.append("  " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            sites = edges[a, b]
            lines.append(f"      {a} -> {b}: {', '.join(sites[:4])}{' ...' if len(sites) > 4 else ''}")
    return "\n".join(lines)


def test_every_module_imports_in_a_fresh_interpreter(tmp_path):
    names = list(module_names())
    out = tmp_path / "imports.json"
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL, json.dumps(names), json.dumps(OPTIONAL), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert not result["failed"], "\n".join(f"--- {name}\n{tb}" for name, tb in result["failed"].items())


def test_packages_import_each_other_without_a_cycle():
    edges = package_edges()
    cycles = simple_cycles(edges)
    assert not cycles, describe(cycles, edges)


def test_the_cycle_check_sees_lazy_and_relative_imports(tmp_path):
    files = {
        "megaseg/__init__.py": "",
        "megaseg/config.py": "",
        "megaseg/a/__init__.py": "",
        "megaseg/a/x.py": "from megaseg import config\n\ndef f():\n    from megaseg.b.y import g\n",
        "megaseg/b/__init__.py": "from . import y\n",
        "megaseg/b/y.py": "import typing\nif typing.TYPE_CHECKING:\n    from ..a import x\n\ndef g():\n    pass\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = package_edges(tmp_path)
    assert edges == {("megaseg.a", "megaseg.config"): ["megaseg/a/x.py:1"], ("megaseg.a", "megaseg.b"): ["megaseg/a/x.py:4"],
                     ("megaseg.b", "megaseg.a"): ["megaseg/b/y.py:3"]}
    cycles = simple_cycles(edges)
    assert cycles == [["megaseg.a", "megaseg.b", "megaseg.a"]]
    assert "megaseg.b -> megaseg.a: megaseg/b/y.py:3" in describe(cycles, edges)
