"""Architecture rules (README.md, "Layout") that a reviewer would otherwise have to remember: converters know nothing of the
pipeline, no stage imports another, and no module of the project imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("exporter", "converters")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for type hints only, never executed)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_modules(path: Path, type_only_too: bool = False) -> set[str]:
    """Every module the file imports, at the top or inside a function (a lazy import is still a dependency);
    ``type_only_too``: also those under `if TYPE_CHECKING:`."""
    names = set()
    tree = ast.parse(path.read_text())
    for node in (ast.walk(tree) if type_only_too else _runtime_nodes(tree)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # "from pkg import module"
    return names


def project_graph(type_only_too: bool = False) -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in imported_modules(path, type_only_too) if m in files and m != name}
            for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of the import graph meets, as the modules around it."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(graph[name]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return cycles


def test_converters_never_import_exporter():
    offenders = {name: sorted(m for m in deps if m.startswith("exporter"))
                 for name, deps in project_graph().items() if name.startswith("converters")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_stage_imports_another():
    graph = project_graph()
    stages = {name for name in graph if name.startswith("exporter.stages.")}
    assert {"exporter.stages.load", "exporter.stages.merge", "exporter.stages.export", "exporter.stages.parity"} <= stages
    offenders = {name: sorted(graph[name] & stages) for name in stages if graph[name] & stages}
    assert not offenders


def test_formats_import_no_stage_and_no_pipeline():
    graph = project_graph()
    offenders = {name: sorted(m for m in deps if m.startswith("exporter.stages") or m == "exporter.pipeline")
                 for name, deps in graph.items() if name.startswith("exporter.formats")}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_circles():
    """Package __init__ modules that only re-export are left out: importing a package's submodule does not run a
    cycle back through it."""
    cycles = import_cycles(project_graph())
    assert not cycles, cycles[:5]


def _private_names(tree: ast.AST) -> set[str]:
    """The _names a module defines: module-level functions, classes and variables, dataclass fields, self._x."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" and \
                isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reaches_into_another_modules_private_members():
    """A leading underscore means "this module's business": another module reading `obj._name` or importing `_name`
    couples to what the owner may change at will (a merge stage reading the adapter's `_tensors` did). Names torch
    itself exposes with an underscore (`module._parameters`) are not the project's and are not counted."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    own = {name: _private_names(tree) for name, tree in trees.items()}
    project_private = set().union(*own.values())
    offenders = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in project_private - own[name] and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                offenders.append(f"{name}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and node.module in files and node.module != name:
                offenders += [f"{name}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, offenders


def test_every_converter_error_is_a_converter_error():
    """The export stage tells a writer's refusal (bad input: exit 2) from a bug (exit 1) by one type,
    converters.errors.ConverterError: every error class under converters/ must derive from it."""
    from converters.errors import ConverterError

    found = {}
    for path in (ROOT / "converters").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found[node.name] = module_name(path)
    assert len(found) >= 6, found
    import importlib

    wrong = [name for name, module in found.items()
             if not issubclass(getattr(importlib.import_module(module), name), ConverterError)]
    assert not wrong, wrong


def test_no_import_circles_counting_type_only_imports():
    """An import under `if TYPE_CHECKING:` still ties two modules together for a reader and a type checker: the
    pipeline's modules form no circle even counting those (the context once named the formats' behaviour type)."""
    cycles = import_cycles(project_graph(type_only_too=True))
    assert not cycles, cycles[:5]


# Who writes each field of the run's Context (exporter/context.py): the stage whose result it is, or the runner.
CONTEXT_OWNERS = {
    "exporter.stages.load": {"formats", "base", "original_base", "merge_base", "adapter", "combination",
                             "reference_adapters", "combined_deltas", "separate_adapters", "device", "out_dtype",
                             "layout", "config_updates", "merged_config", "model_files", "tokenizer_dir",
                             "tokenizer_json", "base_hashes", "inputs"},
    "exporter.stages.dequantize": {"dequantized"},
    "exporter.stages.merge": {"merge"},
    "exporter.stages.export": {"artifacts"},
    "exporter.stages.parity": {"parity_mode", "parity"},
    "exporter.stages.publish": {"published"},
    "exporter.pipeline": {"staging", "timings", "report"},
    "exporter.context": {"notes"},  # through Context.note
}
_MUTATORS = {"append", "extend", "update", "clear", "pop", "popitem", "setdefault", "insert", "remove", "add",
             "discard"}


def _context_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, field) for every write to ctx.<field> / self.ctx.<field>: assigned, item-assigned, or changed in place."""

    def field_of(node: ast.AST) -> str | None:
        if isinstance(node, ast.Attribute) and (
                (isinstance(node.value, ast.Name) and node.value.id == "ctx")
                or (isinstance(node.value, ast.Attribute) and node.value.attr == "ctx")):
            return node.attr
        return None

    writes = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Subscript) and field_of(part.value):
                    writes.append((node.lineno, field_of(part.value)))
                elif isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store) and field_of(part):
                    writes.append((node.lineno, field_of(part)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS \
                and field_of(node.func.value):
            writes.append((node.lineno, field_of(node.func.value)))
    return writes


def test_each_context_field_is_written_by_its_owner_only():
    """The stages hand results on through the Context, each writing only its own fields: a field set by one stage
    and rewritten by another (or by a format) is a side channel no one can follow."""
    from exporter.context import Context

    owned = set().union(*CONTEXT_OWNERS.values())
    fields = set(Context.__dataclass_fields__) - {"plan"}
    assert owned == fields, f"give every Context field one owner: {sorted(fields ^ owned)}"
    owner_of = {f: module for module, fs in CONTEXT_OWNERS.items() for f in fs}
    offenders = []
    for path in (ROOT / "exporter").rglob("*.py"):
        name = module_name(path)
        for line, field in _context_writes(ast.parse(path.read_text())):
            if owner_of.get(field) != name:
                offenders.append(f"{name}:{line} writes ctx.{field} (owned by {owner_of.get(field, 'nobody')})")
    assert not offenders, offenders
