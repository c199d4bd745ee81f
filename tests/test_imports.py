"""What importing a part of the package loads: the datamodules never load the memory."""
from __future__ import annotations

import subprocess
import sys


def loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return set(out.split())


def test_the_datamodules_load_neither_the_memory_nor_the_model():
    loaded = loaded_after("import datamodules")
    assert "titans_lightning.sampling" in loaded
    assert not {"titans_lightning.memory", "titans_lightning.model", "titans_lightning.module",
                "titans_lightning.strategy"} & loaded


def test_the_package_exports_its_names_on_first_use():
    import titans_lightning
    from titans_lightning.memory import NeuralMemory

    assert titans_lightning.NeuralMemory is NeuralMemory
    assert set(titans_lightning.__all__) <= set(dir(titans_lightning))
    loaded = loaded_after("import titans_lightning")
    assert "titans_lightning.memory" not in loaded


def package_imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in its code (a function's import too),
    except under ``if TYPE_CHECKING:``."""
    import ast
    from pathlib import Path

    import titans_lightning

    root = Path(titans_lightning.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, name if is_package else name.rsplit(".", 1)[0])
    graph = {}
    for name, (path, package) in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        found = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
                found |= {t for t in [target, *(f"{target}.{a.name}" for a in node.names)]
                          if t in modules}
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                found |= {n for n in names if n in modules}
        graph[name] = found - {name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = package_imports()
    assert graph["titans_lightning.contract"] == set()  # the contract imports nothing of ours
    assert "titans_lightning.strategy" not in graph["titans_lightning.memory"]
    done, path = set(), []

    def visit(module):
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            if not imported.endswith(".__init__"):
                visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
