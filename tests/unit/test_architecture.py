"""The house rules of farm/, measured (`make lint` runs this module too):

- packages by responsibility, dependencies pointing inward: no import cycle between farm
  modules, and no package importing one above it (LAYERS);
- no function-local import of a farm module unless its line says why (`# local import: ...`);
- no module over MAX_LINES lines;
- the Docker SDK imported in farm/engine/ only;
- the README's layout names every module, and nothing that is not there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FARM = REPO / "farm"
MAX_LINES = 420  # "a few hundred lines": the largest modules are the zip reader's and cache's
# Lower layers never import higher ones (a package may import its own layer or below).
LAYERS = {"core": 0, "kernels": 1, "trust": 1, "engine": 2, "discovery": 3, "endpoint": 3,
          "manual": 4}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(FARM.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def farm_imports(path: Path, package: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(farm modules PATH imports at module level, function-local farm imports as (line,
    module))."""
    tree = ast.parse(path.read_text())
    known = set(modules())
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("farm")]
        base = node.module or ""
        if node.level:
            parts = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        if not base.startswith("farm"):
            return []
        found = []
        for a in node.names:
            full = f"{base}.{a.name}"
            found.append(full if full in known else base)
        return found

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(targets(node))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    local += [(inner.lineno, t) for t in targets(inner)]
    return top, local


def graph() -> dict[str, set[str]]:
    mods = modules()
    out = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        top, _ = farm_imports(path, package)
        out[name] = {t for t in top if t in mods and t != name}
    return out


def test_no_import_cycle() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 2 else None


def test_dependencies_point_inward() -> None:
    wrong = []
    for module, deps in graph().items():
        mine = _layer(module)
        for dep in deps:
            theirs = _layer(dep)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "a lower layer imports a higher one:\n  " + "\n  ".join(sorted(wrong))


def test_no_unexplained_function_local_import() -> None:
    found = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for lineno, target in farm_imports(path, package)[1]:
            if "# local import:" not in lines[lineno - 1]:
                found.append(f"{path.relative_to(REPO)}:{lineno}: {target}")
    assert not found, "function-local farm imports without a reason:\n  " + "\n  ".join(found)


def test_no_module_is_too_long() -> None:
    long = {str(p.relative_to(REPO)): n for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_docker_sdk_is_imported_in_the_engine_package_only() -> None:
    found = []
    for name, path in modules().items():
        if name.startswith("farm.engine"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "docker"
                                                    for a in node.names):
                found.append(name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == \
                    "docker" and not node.level:
                found.append(name)
    assert not found, f"the Docker SDK imported outside farm/engine/: {sorted(set(found))}"


def test_the_readme_layout_names_every_module() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    package = ""
    for line in section.splitlines():  # `farm/pkg/  ...` heads, then indented `file.py  ...`
        head = re.match(r"(farm/\w+/)\s", line + " ")
        if head:
            package = head.group(1)
        elif package and line.startswith("  "):
            named |= {package + f for f in re.findall(r"\b\w+\.(?:py|sh)\b", line)}
        else:
            package = ""
    files = {str(p.relative_to(REPO)) for p in FARM.rglob("*") if p.suffix in (".py", ".sh")
             and p.name != "__init__.py" and p.name != "__main__.py"}
    assert not files - named, f"README's layout does not name: {sorted(files - named)}"
    assert not named - files, f"README's layout names missing files: {sorted(named - files)}"
