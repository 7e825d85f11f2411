"""Architecture rules that keep the packages apart: one-way layers, no import cycles, discord and torch fenced in."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Floors, top to bottom: a module may import its own floor and the floors below it, never one above. Each
# top-level package lives on exactly one floor, so where a file is placed decides what it may import
# (docs/architecture.md explains each floor).
LAYERS = ("shell", "control", "registry", "consent", "store", "child", "contract", "core")
FLOOR = {
    "doppel": "shell",
    "bot": "shell",
    "jobs": "control",
    "inference": "control",
    "models": "registry",
    "consent": "consent",
    "data": "store",
    "trainer": "child",
    "jobspec": "contract",
    "core": "core",
}
PACKAGES = tuple(FLOOR)
# Folders at the top of the checkout that hold no product code.
NOT_PACKAGES = {"tests", "scripts", "docs"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imported(path: Path) -> Iterator[str]:
    """Every module name an import statement names, at any depth (functions, TYPE_CHECKING blocks included)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _imported(path)}


def layer_of(module: str) -> str:
    """The floor a project module lives on: its top-level package's."""
    return FLOOR[module.partition(".")[0]]


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (a `from pkg import name` counts as pkg.name if a module)."""
    modules = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in _imported(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges[module].add(name)
    return edges


def package_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages its modules import."""
    packages: dict[str, set[str]] = {}
    for a, targets in edges.items():
        top = a.partition(".")[0]
        packages.setdefault(top, set()).update(b.partition(".")[0] for b in targets)
        packages[top].discard(top)
    return packages


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a layer into a higher one."""
    return sorted(
        f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})"
        for a, targets in edges.items()
        for b in targets
        if LAYERS.index(layer_of(b)) < LAYERS.index(layer_of(a))
    )


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_goes_up_a_layer() -> None:
    assert upward_edges(graph()) == []


def test_no_import_cycles_between_modules() -> None:
    assert cycles(graph()) == []


def test_no_import_cycles_between_packages() -> None:
    assert cycles(package_graph(graph())) == []


def test_every_package_has_a_floor() -> None:
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in NOT_PACKAGES}
    assert tops == set(FLOOR)
    assert set(FLOOR.values()) == set(LAYERS)


def test_the_checks_see_a_cycle_and_an_upward_import() -> None:
    edges = {"data.a": {"data.b"}, "data.b": {"data.a"}, "core.x": {"data.a"}}
    assert cycles(edges) == [["data.a", "data.b"]]
    assert upward_edges(edges) == ["core.x (core) -> data.a (store)"]


def test_the_checks_see_a_package_spanning_floors() -> None:
    # The old layout: the control plane inside the trainer package, the registry gating on the trainer's evaluation.
    edges = {
        "trainer.supervisor": {"models.registry", "trainer.config"},
        "models.registry": {"trainer.evaluation"},
        "trainer.evaluation": set(),
        "trainer.config": set(),
    }
    assert cycles(edges) == []
    assert cycles(package_graph(edges)) == [["models", "trainer"]]
    assert upward_edges(edges) == ["trainer.supervisor (child) -> models.registry (registry)"]


def test_the_architecture_doc_draws_the_package_graph() -> None:
    """docs/architecture.md's package graph is the code's: each line `package -> what it imports`."""
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = doc.split("<!-- package-graph -->")[1].split("```")[1]
    drawn = {
        line.split("->")[0].strip(): set(line.split("->")[1].split()) if "->" in line else set()
        for line in block.strip().splitlines()[1:]
    }
    assert drawn == package_graph(graph())


def test_only_bot_imports_discord() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for module, path in _modules().items()
        if not module.startswith("bot") and "discord" in _imports(path)
    ]
    assert offenders == []


# The retrieval encoder (sentence-transformers, so torch) runs beside llama.cpp and must size torch's thread pool. The
# benchmarks' torch work runs in the trainer child (`python -m trainer bench-train ...`, trainer/bench.py).
TORCH_OUTSIDE_THE_CHILD = {"inference.retrieval"}


def test_only_the_trainer_child_imports_torch() -> None:
    offenders = [
        module
        for module, path in _modules().items()
        if layer_of(module) != "child" and module not in TORCH_OUTSIDE_THE_CHILD and "torch" in _imports(path)
    ]
    assert offenders == []


def test_the_job_contract_does_not_import_torch() -> None:
    """Both sides read `jobspec`: the control plane, in the bot's process, must not load torch by reading a config."""
    assert [
        module
        for module, path in _modules().items()
        if module.startswith("jobspec") and "torch" in _imports(path)
    ] == []


def trainer_importers(edges: dict[str, set[str]]) -> list[str]:
    """Modules outside `trainer/` that import a `trainer` module (the child is started as a process, never imported)."""
    return sorted(
        a
        for a, targets in edges.items()
        if a.partition(".")[0] != "trainer" and any(b.partition(".")[0] == "trainer" for b in targets)
    )


def test_nothing_outside_the_trainer_imports_it() -> None:
    """The benchmarks too: their torch work is `python -m trainer bench-...` (trainer/bench.py), a process."""
    assert trainer_importers(graph()) == []


def test_the_trainer_check_sees_an_importer() -> None:
    edges = {
        "jobs.runner": {"jobspec.config"},
        "models.registry": {"trainer.evaluation"},
        "trainer.child": {"trainer.x"},
    }
    assert trainer_importers(edges) == ["models.registry"]


def test_boundary_check_sees_an_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from discord import app_commands\n", encoding="utf-8")
    assert "discord" in _imports(probe)


def test_every_module_uses_postponed_annotations() -> None:
    missing = [
        str(path.relative_to(ROOT))
        for path in _modules().values()
        if path.read_text(encoding="utf-8").strip()
        and "from __future__ import annotations" not in path.read_text(encoding="utf-8")
    ]
    assert missing == []


# One owner per table: only these modules write these tables (migrations create them).
OWNERS = {
    "jobs": "jobs/table.py",
    "adapters": "models/registry.py",
    "adapter_lineage": "models/registry.py",
}
_WRITE = re.compile(r"\b(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)\b", re.I)


def table_writers(root: Path = ROOT) -> dict[str, set[str]]:
    """Table -> the project files whose SQL writes it."""
    writers: dict[str, set[str]] = {}
    for path in _modules(root).values():
        rel = path.relative_to(root).as_posix()
        if rel == "data/migrations.py":
            continue
        for table in _WRITE.findall(path.read_text(encoding="utf-8")):
            writers.setdefault(table.lower(), set()).add(rel)
    return writers


def test_each_control_table_has_one_writer() -> None:
    writers = table_writers()
    assert {t: writers.get(t, set()) for t in OWNERS} == {t: {owner} for t, owner in OWNERS.items()}


def _levels_up(node: ast.AST) -> int | None:
    """How many folders above `__file__` a `Path(__file__)[.resolve()].parents[n].parent...` chain reaches."""
    levels = 0
    while True:
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            levels, node = levels + 1, node.value
        elif (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            levels, node = levels + node.slice.value + 1, node.value.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "resolve"
        ):
            node = node.func.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "Path"
            and [a.id for a in node.args if isinstance(a, ast.Name)] == ["__file__"]
        ):
            return levels or None
        else:
            return None


def paths_above_the_checkout(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line` of each path built from `__file__` that climbs out of the checkout (e.g. to a sibling folder)."""
    depth = len(path.relative_to(root).parts)  # the file itself is this many steps below the root
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        levels = _levels_up(node)
        if levels is not None and levels > depth:
            found.add(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    return sorted(found)


def test_no_code_or_test_reads_outside_the_checkout() -> None:
    """Fixtures live in the repo (tests/fixtures): a fresh clone's tests read nothing beside it."""
    files = [p for top in (*PACKAGES, "tests", "scripts") for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 100
    assert [hit for path in files for hit in paths_above_the_checkout(path)] == []


def test_the_checkout_check_sees_a_sibling_folder(tmp_path: Path) -> None:
    probe = tmp_path / "tests" / "conftest.py"
    probe.parent.mkdir()
    probe.write_text(
        "from pathlib import Path\n"
        "INSIDE = Path(__file__).resolve().parents[1] / 'tests' / 'fixtures'\n"
        "OUTSIDE = Path(__file__).resolve().parents[1].parent / 'shared' / 'fixtures'\n"
        "ALSO = Path(__file__).parent.parent.parent / 'shared'\n",
        encoding="utf-8",
    )
    assert paths_above_the_checkout(probe, tmp_path) == ["tests/conftest.py:3", "tests/conftest.py:4"]


# Calls that import a module named by a string: the import graph above cannot see what they load.
_IMPORT_BY_NAME = {"import_module", "__import__", "find_spec"}


def _string_head(node: ast.AST) -> str | None:
    """The text of a string argument, or the literal start of an f-string (`f"doppel.commands.{name}"`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def module_name_strings(path: Path, module: str, modules: set[str]) -> list[str]:
    """`file:line name` of each string naming another package's module: handed to importlib, or a dotted module path.

    A string after `-m` in a command line starts a child process (`python -m inference.probe`), not an import.
    """
    own = module.partition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    entry_points = {
        id(after)
        for node in ast.walk(tree)
        if isinstance(node, ast.List | ast.Tuple)
        for before, after in zip(node.elts, node.elts[1:], strict=False)
        if isinstance(before, ast.Constant) and before.value == "-m"
    }
    found = set()
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            head = _string_head(node.args[0]) if called in _IMPORT_BY_NAME else None
            if head and head.partition(".")[0] in PACKAGES:
                name = head
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in entry_points:
            dotted = node.value.partition(":")[0]
            if "." in dotted and dotted in modules:
                name = dotted
        if name is not None and name.partition(".")[0] != own:
            where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
            found.add(f"{where}:{node.lineno} {name}")
    return sorted(found)


def test_no_module_names_another_packages_module_in_a_string() -> None:
    """Who imports whom is written as imports: the composition root imports the modules it wires (doppel.erasure)."""
    modules = _modules()
    names = set(modules)
    assert [hit for module, path in modules.items() for hit in module_name_strings(path, module, names)] == []


def test_the_module_name_check_sees_importlib_and_module_paths(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "PARTS = ('consent.parts', 'jobs.erasure')\n"
        "def load(name):\n"
        "    importlib.import_module('models.erasure')\n"
        "    importlib.import_module(f'inference.{name}')\n"
        "    importlib.import_module(f'consent.{name}')\n"
        "    return ['python', '-m', 'inference.probe'], 'data is stored'\n",
        encoding="utf-8",
    )
    names = set(_modules())
    assert module_name_strings(probe, "consent.probe", names) == [
        "probe.py:2 jobs.erasure",
        "probe.py:4 models.erasure",
        "probe.py:5 inference.",
    ]


# Who may read the consent tables: their owner (consent/) and the reads it keeps in the store's floor, where the upload
# rule lives once (data/consents.py). The scale benchmark counts what erasure left in every table, consent included.
CONSENT_READERS = {"data/consents.py", "data/migrations.py", "doppel/benchscale.py"}
# SQL keywords in capitals, as the project writes them (a Python `from consent.x import` is not a read).
_READ_CONSENT = re.compile(r"\b(?:FROM|JOIN)\s+(consent(?:_audit)?)\b")


def consent_readers(root: Path = ROOT) -> set[str]:
    """The project files outside consent/ whose SQL reads `consent` or `consent_audit`."""
    return {
        path.relative_to(root).as_posix()
        for module, path in _modules(root).items()
        if not module.startswith("consent") and _READ_CONSENT.search(path.read_text(encoding="utf-8"))
    }


def test_consent_is_read_through_its_owner() -> None:
    assert consent_readers() <= CONSENT_READERS


def test_the_consent_check_sees_a_stray_read(tmp_path: Path) -> None:
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "probe.py").write_text(
        'SQL = "SELECT 1 FROM messages m JOIN consent c ON c.member_id = m.author_id"\n', encoding="utf-8"
    )
    (tmp_path / "consent").mkdir()
    (tmp_path / "consent" / "own.py").write_text('SQL = "SELECT scope FROM consent"\n', encoding="utf-8")
    assert consent_readers(tmp_path) == {"bot/probe.py"}


# The bot runs no SQL: each query lives with its table's owner (data/, consent/, jobs/table.py, models/registry.py), and
# `bot.services.Services` hands out those owners.
_BOT_SQL = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE)\b|\.(?:fetchall|fetchone|execute|executemany)\(")


def sql_in_bot(root: Path = ROOT) -> set[str]:
    """The bot's files with SQL of their own: a query, or a call that runs one on the store's connection."""
    return {
        path.relative_to(root).as_posix()
        for module, path in _modules(root).items()
        if module.partition(".")[0] == "bot" and _BOT_SQL.search(path.read_text(encoding="utf-8"))
    }


def test_the_bot_runs_no_sql() -> None:
    assert sql_in_bot() == set()


def test_the_bot_sql_check_sees_a_query(tmp_path: Path) -> None:
    (tmp_path / "bot").mkdir()
    (tmp_path / "bot" / "probe.py").write_text(
        'async def rated(s):\n    return await s.store.fetchone("SELECT 1 FROM feedback")\n', encoding="utf-8"
    )
    (tmp_path / "bot" / "fine.py").write_text(
        'async def rated(s):\n    return await s.store.feedback.rated("1", "2")\n', encoding="utf-8"
    )
    assert sql_in_bot(tmp_path) == {"bot/probe.py"}
