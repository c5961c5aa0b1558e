"""The library core (diffusion, nets, experts, composition, world model) stands alone: it imports nothing from the
environments, the planners or the agents, not even lazily inside a function, so it can be used and tested without them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ["come_rl/diffusion", "come_rl/nets", "come_rl/data", "come_rl/experts", "come_rl/composition.py", "come_rl/world_model.py",
        "come_rl/conventions.py", "come_rl/devices.py", "come_rl/checkpoint.py", "come_rl/interfaces.py"]
OUTSIDE = ("envs", "planners", "agents")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def core_files() -> list[Path]:
    files = []
    for entry in CORE:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_core_imports_nothing_from_envs_planners_or_agents(path):
    leaks = sorted(name for name in imported_modules(path) if name.split(".")[0] in OUTSIDE)
    assert not leaks, f"{path.relative_to(ROOT)} imports {leaks}: the core must not depend on {OUTSIDE}"


def test_the_walk_finds_an_import_hidden_in_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from envs.memory_cards import MemoryCardsEnv\n    return MemoryCardsEnv\n")
    assert "envs.memory_cards" in imported_modules(module)
    assert len(core_files()) > 10


PACKAGES = ("come_rl", "agents", "planners", "envs")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets (each as the modules around it, the first repeated at the end)."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                cycles.append([*stack[stack.index(other):], other])
            elif other not in state:
                visit(other, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_no_two_project_modules_import_each_other_even_lazily():
    """No import circle anywhere in the project, counting imports inside functions (which only hide a circle)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for module in imported_modules(path):
            imported |= {candidate for candidate in (module, *(module + "." + alias for alias in _imported_names(path, module)))
                         if candidate in modules and candidate != name}
        graph[name] = imported
    assert not import_cycles(graph), import_cycles(graph)
    # the walk can fail: a circle made by hand is found
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def _imported_names(path: Path, module: str) -> set[str]:
    """The names taken ``from module import ...`` in ``path`` (a name may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == module and node.level == 0:
            names.update(alias.name for alias in node.names)
    return names
