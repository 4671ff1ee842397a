"""The package's module-level imports form no cycle (each module can be imported alone, in any order), and the
quantizers do not reach into the runtime kernels."""
from __future__ import annotations

import ast
from pathlib import Path

import bitsmith

ROOT = Path(bitsmith.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (imports inside functions are lazy on purpose)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ("bitsmith", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([base] if base else [])])
                imported |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_module_imports_itself_through_others():
    graph = module_imports()
    assert len(graph) > 50 and "bitsmith.cli.main" in graph["bitsmith.__main__"]
    assert [m for m in graph if m in reachable(graph, m)] == []


def test_quantizers_do_not_import_kernels_or_the_api():
    graph = module_imports()
    for name in (m for m in graph if m.startswith("bitsmith.quantize")):
        assert not {m for m in graph[name] if m.startswith(("bitsmith.kernels", "bitsmith.api"))}, name
