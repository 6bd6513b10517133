"""Mutation testing of the core modules: would the fast tests notice if this code were wrong?

    .venv/bin/python scripts/mutation.py                 # every target module: ~1,600 mutants, about 4 hours on 2 cores
    .venv/bin/python scripts/mutation.py exporter/merge_math.py --limit 20
    .venv/bin/python scripts/mutation.py --sample 12 --seed 0   # 12 mutants drawn at random from each module
    .venv/bin/python scripts/mutation.py exporter/stages/load.py --only _original_base   # the mutants of one function

Each mutant changes one thing in one target module: an arithmetic or comparison operator, `and`/`or`, a `not` or a
unary minus dropped, a number nudged (n → n+1, x → 2x), a boolean flipped, an in-place call such as `w.mul_(…)`
dropped. The module's fast tests (-m "not slow") then run against the mutant in a copy of the project (the working
tree is never touched), stopping at the first failure: a failure, an error or a timeout kills the mutant; a green run
means it survived. The tests run with pytest's warnings plugin on, so their filterwarnings marks hold: where a test
module turns warnings into errors (the merge's and the writers' do), a mutant that only makes torch or numpy warn
(an out= buffer resized, a lossy cast) is killed. Error messages, logging and docstrings are not mutated.

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
import random
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

# Target module -> the fast tests that should notice a change in it, quickest first (pytest arguments: files, node ids,
# a --deselect). Each comment: the mutants the module gives, then how long its tests take unmutated (a surviving
# mutant costs that much, a killed one less: -x stops at the first failure), measured with `pytest --durations` on the
# 2-core machine with OMP_NUM_THREADS=1 as run_tests sets, torch's import (~3 s) included. Modules whose only tests
# take minutes are left out: the run would take hours.
ONNX_UNIT = ["tests/converters/test_onnx.py",
             # 14 s writing 2.4 GB of placeholder weights: the external-data writer's test, not the tracer's
             "--deselect=tests/converters/test_onnx.py::test_external_data_past_2gb"]
TARGETS: dict[str, list[str]] = {
    # 69 mutants; 11 s (these two files) + 7 s + 8 s + 18 s
    "exporter/merge_math.py": ["tests/test_merge_math.py", "tests/test_merge_vs_peft.py", "tests/test_golden.py",
                               "tests/test_parity.py", "tests/test_cli_options.py"],
    # 61 mutants; 9 s + 8 s + 8 s
    "exporter/adapter.py": ["tests/test_bad_input.py", "tests/test_merge_vs_peft.py", "tests/test_parity.py"],
    # 48 mutants; 8 s + 7 s + 8 s + 9 s
    "exporter/parity/reference.py": ["tests/test_parity.py", "tests/test_golden.py", "tests/test_merge_vs_peft.py",
                              "tests/test_bad_input.py"],
    # 3 mutants; 8 s + 2 s
    "exporter/parity/tolerances.py": ["tests/test_parity.py", "tests/test_docs.py"],
    # 100 mutants; 3 s + 3 s + 35 s
    "converters/gguf/quants.py": ["tests/converters/test_gguf_quants.py", "tests/converters/test_gguf_writer.py",
                                  "tests/test_gguf.py"],
    # 73 mutants; 3 s + 35 s + 5 s
    "converters/gguf/writer.py": ["tests/converters/test_gguf_writer.py", "tests/test_gguf.py",
                                  "tests/test_cli_options.py::test_values_float16_cannot_hold_are_refused_in_every_"
                                  "format_unless_no_check_finite"],
    # 24 mutants; 9-28 s (see dequantize below) + 14 s
    "converters/bnb/quantize.py": ["tests/converters/test_bnb.py", "tests/test_quantized.py"],
    # -- ONNX: the converter's own tests (graph vs transformers in ONNX Runtime), then the pipeline's
    # 93 mutants; 22 s + 33 s
    "converters/onnx/trace.py": ["tests/converters/test_onnx_graph_details.py", *ONNX_UNIT,
                                 "tests/test_onnx_export.py"],
    # 66 mutants; 36 s (the 2.4 GB external-data test included: it is this module's) + 33 s
    "converters/onnx/weights.py": ["tests/converters/test_onnx_graph_details.py", "tests/converters/test_onnx.py",
                                   "tests/test_onnx_export.py"],
    # 39 mutants; 36 s + 33 s
    "converters/onnx/writer.py": ["tests/converters/test_onnx_graph_details.py", "tests/converters/test_onnx.py",
                                  "tests/test_onnx_export.py"],
    # 47 mutants; 8 s (onnxruntime-genai generating, and the refused type)
    "converters/onnx/genai.py": ["tests/converters/test_onnx.py::test_genai_config_needs_a_known_type",
                                 "tests/converters/test_onnx.py::test_genai_head_size_is_the_configs_head_dim_or_an_"
                                 "integer_share_of_the_width",
                                 "tests/converters/test_onnx.py::test_genai_generates_what_transformers_generates",
                                 "tests/converters/test_onnx.py::test_genai_search_options_are_the_generation_configs_"
                                 "or_transformers_defaults",
                                 "tests/converters/test_onnx.py::test_genai_config_refuses_a_graph_whose_cache_is_not_"
                                 "the_configs",
                                 "tests/test_onnx_export.py::test_onnxruntime_genai_generates_what_transformers_"
                                 "generates"],
    # -- bitsandbytes: bit for bit against bitsandbytes, then QLoRA bases through the pipeline
    # 146 mutants; 9-28 s (one 5x7 FP4 case measured 1.5 s alone, 18 s once under load) + 14 s
    "converters/bnb/dequantize.py": ["tests/converters/test_bnb_validate.py", "tests/converters/test_bnb.py",
                                     "tests/test_quantized.py"],
    # 139 mutants; 9-28 s + 14 s
    "converters/bnb/format.py": ["tests/converters/test_bnb.py", "tests/test_quantized.py"],
    # -- GGUF: byte for byte against gguf-py, then llama.cpp running the file
    # 105 mutants; 3 s + 35 s
    "converters/gguf/arch.py": ["tests/converters/test_gguf_writer.py", "tests/test_gguf.py"],
    # 65 mutants; 4 s + 35 s
    "converters/gguf/vocab.py": ["tests/converters/test_gguf_vocab_scores.py", "tests/converters/test_gguf_vocab.py",
                                 "tests/test_gguf.py"],
    # 43 mutants; 4 s (Go's text/template and apply_chat_template on the derived TEMPLATE)
    "converters/gguf/modelfile.py": ["tests/converters/test_modelfile.py", "tests/test_modelfile_run.py"],
    # -- the stages (exporter/stages/__init__.py has no mutant)
    # 45 mutants; 9 s + 8 s
    "exporter/stages/load.py": ["tests/test_stage_boundaries.py", "tests/test_bad_input.py", "tests/test_pipeline.py",
                                "tests/test_quantized.py::test_an_original_missing_a_tensor_or_of_another_shape_is_"
                                "refused_naming_exactly_those",
                                # Hub ids: a local Hub server (tests/hub_server.py), ~3 s
                                "tests/test_hub.py::test_a_base_other_than_the_adapters_is_a_warning_naming_both"],
    # 22 mutants; 14 s
    "exporter/stages/dequantize.py": ["tests/test_quantized.py"],
    # 22 mutants; 10 s + 8 s
    "exporter/stages/merge.py": ["tests/test_merge_vs_peft.py", "tests/test_pipeline.py"],
    # 11 mutants; 8 s + 33 s (the Ctrl-C and full-disk paths)
    "exporter/stages/export.py": ["tests/test_pipeline.py", "tests/test_faults.py"],
    # 71 mutants; 8 s + 8 s + 61 s (parity held whole or streamed module by module)
    "exporter/stages/parity.py": ["tests/test_stage_boundaries.py", "tests/test_parity.py", "tests/test_pipeline.py",
                                  "tests/test_layerwise.py",
                                  # a GELU model's GGUF F32: judged by its architecture's own tolerance (ggml's
                                  # fp16 GELU table), so the architecture must reach the lookup
                                  "tests/test_gguf.py::test_every_architecture_runs_in_llama_cpp_like_the_"
                                  "unmerged_model[gemma3]"],
    # -- the formats (tests/test_docs.py first: README's tolerance table must show each declared tolerance, ~2 s)
    # 9 mutants; 8 s + 18 s
    "exporter/formats/__init__.py": ["tests/test_docs.py", "tests/test_pipeline.py", "tests/test_cli_options.py"],
    # 8 mutants; 14 s + 33 s (the gathered cast: bitsandbytes' float tensors, ONNX's weights)
    "exporter/formats/base.py": ["tests/test_quantized.py", "tests/test_onnx_export.py",
                                 "tests/test_cli_options.py::test_values_float16_cannot_hold_are_refused_in_every_"
                                 "format_unless_no_check_finite"],
    # 38 mutants; 8 s + 10 s + 18 s
    "exporter/formats/safetensors.py": ["tests/test_docs.py", "tests/test_small_blocks.py",
                                        "tests/test_disk_estimates.py", "tests/test_pipeline.py",
                                        "tests/test_merge_vs_peft.py", "tests/test_cli_options.py"],
    # 86 mutants; 14 s
    "exporter/formats/bnb.py": ["tests/test_disk_estimates.py", "tests/test_quantized.py"],
    # 47 mutants; 35 s + 17 s
    "exporter/formats/gguf.py": ["tests/test_docs.py", "tests/test_gguf_modelfile_name.py",
                                 "tests/test_disk_estimates.py", "tests/test_gguf.py",
                                 "tests/test_one_pass.py", "tests/test_failure_branches.py"],
    # 21 mutants; 35 s
    "exporter/formats/gguf_lora.py": ["tests/test_docs.py", "tests/test_disk_estimates.py", "tests/test_gguf.py",
                                      "tests/test_failure_branches.py"],
    # 69 mutants; 33 s
    "exporter/formats/onnx.py": ["tests/test_docs.py", "tests/test_onnx_feed.py", "tests/test_disk_estimates.py",
                                 "tests/test_onnx_export.py"],
    # -- several adapters: PEFT's add_weighted_adapter and mergekit as oracles (~25 s + ~10 s)
    "exporter/combine.py": ["tests/test_combine_delta.py", "tests/test_combine.py"],
    "exporter/formats/peft.py": ["tests/test_combine.py"],
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


def run_tests(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """(killed | survived | timeout, seconds, the end of pytest's output)"""
    # No bytecode caches: a mutant of the same length written within the second of the last run would otherwise be
    # served from the stale .pyc (its check is source mtime + size) and "survive" untested.
    env = {**os.environ, "PYTHONPATH": str(workdir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    for cache in workdir.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    try:
        # The warnings plugin stays on: without it, filterwarnings("error") marks are ignored and a mutant that only
        # warns survives.
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                               *tests], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, ""
    return ("survived" if proc.returncode == 0 else "killed"), time.perf_counter() - start, proc.stdout[-3000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(TARGETS), help="target modules (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many mutants per module (the first)")
    parser.add_argument("--sample", type=int, default=None, help="this many mutants per module, drawn at random "
                        "(an unbiased estimate of the score in a fraction of the time; --limit takes the first ones, "
                        "which cluster in a module's first functions)")
    parser.add_argument("--seed", type=int, default=0, help="the draw of --sample")
    parser.add_argument("--only", default=None, help="only the mutants whose key (as printed for survivors) contains "
                        "this text: to check that a new test kills the mutants it was written for")
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
            status, baseline, output = run_tests(copies[0], tests, timeout=1800)
            if status != "survived":
                sys.exit(f"the tests for {module} fail without any mutation: fix them first\n{output}")
            print(f"{module}: tests pass unmutated in {baseline:.0f} s", flush=True)
            original = (ROOT / module).read_text()
            generated = generate(module)[: args.limit]
            if args.only is not None:
                generated = [g for g in generated if args.only in g[0].key]
            if args.sample is not None and args.sample < len(generated):
                drawn = sorted(random.Random(f"{args.seed}:{module}").sample(range(len(generated)), args.sample))
                generated = [generated[i] for i in drawn]

            def judge(item: tuple[int, tuple[Mutant, str]]) -> Mutant:
                i, (mutant, source) = item
                if mutant.key in equivalent:
                    mutant.status = "equivalent"
                else:
                    copy_dir = free.get()
                    try:
                        (copy_dir / module).write_text(source)
                        mutant.status, mutant.seconds, _ = run_tests(copy_dir, tests, timeout=3 * baseline + 60)
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
