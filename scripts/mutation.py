"""Mutation testing of the core modules: would the fast tests notice if this code were wrong?

    .venv/bin/python scripts/mutation.py                 # every target module (about 15 minutes on 2 cores)
    .venv/bin/python scripts/mutation.py exporter/merge_math.py --limit 20

Each mutant changes one thing in one target module: an arithmetic or comparison operator, `and`/`or`, a `not` or a
unary minus dropped, a number nudged (n → n+1, x → 2x), a boolean flipped, an in-place call such as `w.mul_(…)`
dropped. The module's fast tests (-m "not slow") then run against the mutant in a copy of the project (the working
tree is never touched), stopping at the first failure: a failure, an error or a timeout kills the mutant; a green run
means it survived. Error messages, logging and docstrings are not mutated.

Some survivors cannot be killed because the mutant behaves exactly like the original (a bound that is never reached,
an equivalent rounding): each is listed, with the reason, in scripts/mutation_equivalent.txt and left out of the
score. The goal is ≥ 90% of the non-equivalent mutants killed. Results also go to <workdir>/mutation.json. This is a
benchmark, not part of scripts/test.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "scripts" / "mutation_equivalent.txt"

# Target module -> the fast tests that should notice a change in it, quickest first.
TARGETS: dict[str, list[str]] = {
    "exporter/merge_math.py": ["tests/test_merge_math.py", "tests/test_merge_vs_peft.py", "tests/test_golden.py",
                               "tests/test_parity.py", "tests/test_cli_options.py"],
    "exporter/adapter.py": ["tests/test_bad_input.py", "tests/test_merge_vs_peft.py", "tests/test_parity.py"],
    "exporter/reference.py": ["tests/test_parity.py", "tests/test_golden.py", "tests/test_merge_vs_peft.py",
                              "tests/test_bad_input.py"],
    "exporter/tolerances.py": ["tests/test_parity.py", "tests/test_docs.py"],
    "converters/gguf/quants.py": ["tests/converters/test_gguf_quants.py", "tests/converters/test_gguf_writer.py",
                                  "tests/test_gguf.py"],
    "converters/gguf/writer.py": ["tests/converters/test_gguf_writer.py", "tests/test_gguf.py",
                                  "tests/test_cli_options.py::test_values_float16_cannot_hold_are_refused_in_every_"
                                  "format_unless_no_check_finite"],
    "converters/bnb/quantize.py": ["tests/converters/test_bnb.py", "tests/test_quantized.py"],
}

_SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
               ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.MatMult: ast.Mult, ast.BitAnd: ast.BitOr,
               ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift, ast.RShift: ast.LShift}
_SWAP_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                 ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    path: str
    line: int
    function: str
    original: str  # the source of the mutated node, as unparsed
    mutated: str
    col: int = 0
    status: str = "pending"  # killed | survived | equivalent | timeout
    seconds: float = 0.0
    occurrence: str = ""  # "[2 of 3]" when the same change fits several places in one function, in source order

    @property
    def key(self) -> str:
        """Stable across edits elsewhere in the file: where (function) and what, not the line number."""
        return f"{self.path}::{self.function}: {self.original} -> {self.mutated}" + \
            (f" {self.occurrence}" if self.occurrence else "")


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)))


def _skipped_regions(tree: ast.Module) -> set[int]:
    """ids of nodes never mutated: docstrings, annotations, error messages, log calls, raise statements."""
    skipped: set[int] = set()

    def skip(node: ast.AST | None) -> None:
        if node is not None:
            skipped.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)) and node.body and \
                isinstance(node.body[0], ast.Expr) and _is_text(node.body[0].value):
            skip(node.body[0])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            skip(node.returns)
            for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
                skip(arg.annotation)
        if isinstance(node, ast.AnnAssign):
            skip(node.annotation)
        if isinstance(node, ast.Raise):
            skip(node)  # what is raised and its message; the condition that raises is mutated
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logging", "warnings"):
            skip(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip(node)
    return skipped


def _variants(node: ast.AST) -> list[ast.AST]:
    """The mutated copies of one node (possibly none)."""
    out: list[ast.AST] = []
    if isinstance(node, ast.BinOp) and type(node.op) in _SWAP_BINOP and not (_is_text(node.left) or _is_text(node.right)):
        mutant = copy.deepcopy(node)
        mutant.op = _SWAP_BINOP[type(node.op)]()
        out.append(mutant)
    elif isinstance(node, ast.AugAssign) and type(node.op) in _SWAP_BINOP:
        mutant = copy.deepcopy(node)
        mutant.op = _SWAP_BINOP[type(node.op)]()
        out.append(mutant)
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in _SWAP_COMPARE:
                mutant = copy.deepcopy(node)
                mutant.ops[i] = _SWAP_COMPARE[type(op)]()
                out.append(mutant)
    elif isinstance(node, ast.BoolOp):
        mutant = copy.deepcopy(node)
        mutant.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        out.append(mutant)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append(copy.deepcopy(node.operand))
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        out.append(ast.Constant(not node.value))
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        out.append(ast.Constant(node.value + 1))
    elif isinstance(node, ast.Constant) and type(node.value) is float:
        out.append(ast.Constant(node.value * 2 if node.value else 1.0))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
            isinstance(node.value.func, ast.Attribute) and node.value.func.attr.endswith("_"):
        out.append(ast.Pass())  # an in-place tensor operation dropped
    return out


def _enclosing_functions(tree: ast.Module) -> dict[int, str]:
    names: dict[int, str] = {}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = f"{scope}.{child.name}" if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else scope
            names[id(child)] = inner.lstrip(".") or "<module>"
            visit(child, inner)

    visit(tree, "")
    return names


def generate(path: str) -> list[tuple[Mutant, str]]:
    """Every mutant of the file with its full mutated source."""
    source = (ROOT / path).read_text()
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line.encode()))
    data = source.encode()
    tree = ast.parse(source)
    skipped, scopes = _skipped_regions(tree), _enclosing_functions(tree)
    mutants = []
    for node in ast.walk(tree):
        if id(node) in skipped or not hasattr(node, "end_lineno"):
            continue
        for variant in _variants(node):
            start = offsets[node.lineno - 1] + node.col_offset
            end = offsets[node.end_lineno - 1] + node.end_col_offset
            text = ast.unparse(variant)
            if isinstance(node, ast.expr):
                text = f"({text})"  # keep precedence wherever it lands
            mutated = (data[:start] + text.encode() + data[end:]).decode()
            try:
                compile(mutated, path, "exec")
            except SyntaxError:
                continue
            mutants.append((Mutant(path, node.lineno, scopes.get(id(node), "<module>"), ast.unparse(node),
                                   ast.unparse(variant), col=node.col_offset), mutated))
    mutants.sort(key=lambda m: (m[0].line, m[0].col, m[0].mutated))
    same = Counter(m.key for m, _ in mutants)
    seen: Counter = Counter()
    for mutant, _ in mutants:
        if same[mutant.key] > 1:
            base = mutant.key
            seen[base] += 1
            mutant.occurrence = f"[{seen[base]} of {same[base]}]"
    return mutants


def read_equivalent() -> dict[str, str]:
    """key -> reason, from lines 'key  # reason'."""
    known = {}
    if EQUIVALENT_FILE.is_file():
        for line in EQUIVALENT_FILE.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, reason = line.partition("  # ")
                known[key.strip()] = reason.strip()
    return known


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    # No bytecode caches: a mutant of the same length written within the second of the last run would otherwise be
    # served from the stale .pyc (its check is source mtime + size) and "survive" untested.
    env = {**os.environ, "PYTHONPATH": str(workdir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    for cache in workdir.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               "-p", "no:warnings", *tests], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start
    return ("survived" if proc.returncode == 0 else "killed"), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(TARGETS), help="target modules (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many mutants per module")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "mutation")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once, each in its own project copy "
                        "with single-threaded torch (default 2: the CI machine's cores)")
    args = parser.parse_args()

    equivalent = read_equivalent()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[Mutant] = []
    with tempfile.TemporaryDirectory(prefix="lora-export-mutation-") as tmp:
        copies = [Path(tmp) / f"copy-{j}" for j in range(args.jobs)]  # one project copy per parallel job
        for copy_dir in copies:
            copy_project(copy_dir)
        free: queue.Queue[Path] = queue.Queue()
        for copy_dir in copies:
            free.put(copy_dir)
        for module in args.modules:
            tests = TARGETS[module]
            status, baseline = run_tests(copies[0], tests, timeout=1800)
            if status != "survived":
                sys.exit(f"the tests for {module} fail without any mutation: fix them first")
            print(f"{module}: tests pass unmutated in {baseline:.0f} s", flush=True)
            original = (ROOT / module).read_text()
            generated = generate(module)[: args.limit]

            def judge(item: tuple[int, tuple[Mutant, str]]) -> Mutant:
                i, (mutant, source) = item
                if mutant.key in equivalent:
                    mutant.status = "equivalent"
                else:
                    copy_dir = free.get()
                    try:
                        (copy_dir / module).write_text(source)
                        mutant.status, mutant.seconds = run_tests(copy_dir, tests, timeout=3 * baseline + 60)
                    finally:
                        (copy_dir / module).write_text(original)
                        free.put(copy_dir)
                print(f"  [{i}/{len(generated)}] {mutant.status:<10} {module}:{mutant.line} "
                      f"{mutant.original} -> {mutant.mutated}", flush=True)
                return mutant

            with ThreadPoolExecutor(args.jobs) as pool:
                results.extend(pool.map(judge, enumerate(generated, 1)))

    judged = [m for m in results if m.status != "equivalent"]
    killed = [m for m in judged if m.status in ("killed", "timeout")]
    survivors = [m for m in judged if m.status == "survived"]
    score = len(killed) / len(judged) if judged else 1.0
    print(f"\n{len(results)} mutants: {len(killed)} killed, {len(survivors)} survived, "
          f"{len(results) - len(judged)} equivalent (listed in {EQUIVALENT_FILE.relative_to(ROOT)})")
    for module in args.modules:
        mine = [m for m in judged if m.path == module]
        if mine:
            print(f"  {module}: {sum(m.status != 'survived' for m in mine)}/{len(mine)} killed")
    print(f"score: {score:.1%} of non-equivalent mutants killed (goal ≥ 90%)")
    for m in survivors:
        print(f"  survived: {m.key}  (line {m.line})")
    (args.workdir / "mutation.json").write_text(json.dumps(
        {"score": score, "mutants": [asdict(m) | {"key": m.key} for m in results]}, indent=1))


if __name__ == "__main__":
    main()
