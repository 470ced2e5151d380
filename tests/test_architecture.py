"""The code's shape, checked: small files, no reaching into another module's privates, no import cycles at
import time, no benchmark code inside the package, and every citation of the design document resolves."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "coala"
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, *, top_level_only: bool) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of ``path``'s ImportFrom / Import nodes, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_no_file_is_over_the_line_limit():
    lines = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_no_module_imports_another_modules_privates():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for module, names in _imports(name, path, top_level_only=False):
            if not module or not module.startswith("coala"):
                continue
            own = module == package  # a package's private submodules are its own business
            private = [n for n in names if n.startswith("_") and n != "__version__" and not own]
            # a private module (coala.cli._common) is for its own package only
            parts = module.split(".")
            if any(p.startswith("_") for p in parts) and not module.startswith(package + "."):
                private.append(module)
            if private:
                bad.append(f"{name} imports {private} from {module}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_import_time():
    modules = _modules()
    graph = {name: {m for m, _ in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # a package importing its own submodules is how packages export; cycles through that edge are not cycles
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_benchmark_code_in_the_package():
    assert not (PACKAGE / "bench").exists()
    for name, path in _modules().items():  # matplotlib is an extra: only coala.plotting imports it (lazily)
        uses = [m for m, _ in _imports(name, path, top_level_only=False) if m and m.startswith("matplotlib")]
        assert not uses or name == "coala.plotting", f"{name} imports {uses}"


def test_design_citations_resolve():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", design, flags=re.M)) | set(re.findall(r"^## (\d+)\.", design, flags=re.M))
    assert sections, "docs/design.md has no numbered sections"
    cited = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = path.read_text()
        for match in re.finditer(r"(\S*)design\.md(?: §(\d+))?", text):
            if path.name == "test_architecture.py":
                continue
            assert match.group(1).endswith("docs/"), f"{path}: cites {match.group(0)!r}, not docs/design.md"
            if match.group(2):
                cited.append((path.name, match.group(2)))
    missing = [c for c in cited if c[1] not in sections]
    assert not missing, f"citations of sections that docs/design.md lacks: {missing}"
