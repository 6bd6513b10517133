"""The pipeline's machinery: registry, custom stages, sharding, report, model card, atomic output."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_peft_adapter, build_tiny_base, load_output, model_logits, run_export
from exporter.errors import ExportError
from exporter.context import ExportPlan, parse_size
from exporter.pipeline import default_registry, run_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    base = build_tiny_base(root / "base")
    adapter = build_peft_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    return base, adapter


def test_registry_refuses_duplicates_and_lists_names():
    registry = default_registry()
    assert {"load", "merge", "export", "parity"} <= set(registry.names())
    with pytest.raises(ValueError, match="already registered"):
        registry.register("merge", object)
    with pytest.raises(ExportError, match="load, merge"):
        registry.create("mrege")


def test_custom_stage_runs_in_order_and_its_check_can_fail(tiny, tmp_path):
    base, adapter = tiny
    seen = []

    class Audit:
        name = "audit"

        def run(self, ctx):
            seen.append([a.format for a in ctx.artifacts])

        def check(self, ctx):
            if ctx.plan.dtype == "float16":
                from exporter.errors import StageCheckError

                raise StageCheckError("audit", "float16 is not allowed here.", "use bfloat16.")

    registry = default_registry()
    registry.register("audit", Audit)
    stages = ("load", "merge", "export", "audit", "parity")
    run_pipeline(ExportPlan(str(base), str(adapter), tmp_path / "a", stages=stages, progress=False), registry)
    assert seen == [["safetensors"]]
    with pytest.raises(ExportError, match="float16 is not allowed"):
        run_pipeline(ExportPlan(str(base), str(adapter), tmp_path / "b", stages=stages, dtype="float16",
                                progress=False), registry)
    assert not (tmp_path / "b").exists()


def test_sharded_output_has_index_and_loads(tiny, tmp_path, probe_ids):
    base, adapter = tiny
    run_export(base, adapter, tmp_path / "out", max_shard_size=parse_size("40kB"))
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(load_output(out))
    single = run_export(base, adapter, tmp_path / "single")
    assert single.artifacts[0].parity.passed
    assert torch.equal(model_logits(out, probe_ids), model_logits(tmp_path / "single", probe_ids))


def test_report_and_model_card(tiny, tmp_path):
    base, adapter = tiny
    run_export(base, adapter, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    import hashlib

    expected = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    assert report["inputs"]["base_sha256"] == {"model.safetensors": expected}
    assert report["merge"]["lora_modules"] == 4 and report["merge"]["scales"] == [2.0]
    assert all(m["relative_change"] > 0 for m in report["merge"]["per_tensor"])
    assert not any("changes nothing" in n for n in report["notes"])  # said only of an adapter that changes nothing
    # merged into the base itself: one reference, no second one for --merge-into original
    assert report["parity_reference"] == "the base + the adapter applied on the fly, float32"
    assert all(a["parity"].get("vs_training_reference") is None for a in report["artifacts"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(adapter) in card and expected in card and "lora_alpha/r" in card


def test_untrained_adapter_is_flagged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build_tiny_base(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")  # default init: B = 0, a no-op
    ctx = run_export(base, tmp_path / "adapter", tmp_path / "out")
    assert any("changes nothing" in n for n in ctx.notes)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("123") == 123
    with pytest.raises(ExportError):
        parse_size("big")


def test_merged_config_updates_every_text_config_key():
    """A multimodal config repeats vocab_size and tie_word_embeddings in text_config: both must follow the output."""
    import torch

    from exporter.model_files import merged_config

    base = {"vocab_size": 10, "tie_word_embeddings": True, "dtype": "bfloat16",
            "text_config": {"vocab_size": 10, "tie_word_embeddings": True, "hidden_size": 8}}
    config = merged_config(base, {"vocab_size": 12, "tie_word_embeddings": False}, torch.float32)
    assert config["text_config"] == {"vocab_size": 12, "tie_word_embeddings": False, "hidden_size": 8}
    assert config["vocab_size"] == 12 and config["tie_word_embeddings"] is False and config["dtype"] == "float32"


def test_an_output_moved_aside_by_a_killed_overwrite_is_restored_not_lost(tiny, tmp_path):
    """--overwrite moves the previous output to .NAME.replaced-PID before moving the new one in; a run killed between
    the two leaves no --out. The next run puts the previous output back first, so without --overwrite it is refused
    as any non-empty --out is, and the user's files are still there."""
    base, adapter = tiny
    out = tmp_path / "out"
    aside = tmp_path / ".out.replaced-999999"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the previous output")
    with pytest.raises(ExportError, match="exists and is not empty"):
        run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=out, parity=False, progress=False))
    assert (out / "model.safetensors").read_bytes() == b"the previous output" and not aside.exists()
    ctx = run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=out, parity=False, progress=False,
                                  overwrite=True))
    assert load_output(out) and ctx.artifacts and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("field, value, expected", [
    ("parity", "maybe", "True or False (or \"on\" / \"off\")"),
    ("parity", 1, "True or False"),
    ("overwrite", "yes", "True or False"),
    ("check_finite", None, "True or False"),
    ("dtype", "float8", "one of float32, bfloat16, float16"),
    ("dtype", torch.int8, "one of float32, bfloat16, float16"),
    ("device", "gpu", "one of auto, cpu, cuda"),
    ("parity_memory", "half", "one of auto, whole, streamed"),
    ("merge_into", "base", "one of dequantized, original"),
    ("formats", (), "a non-empty tuple of format names"),
    ("formats", ("safetensors", 3), "a non-empty tuple of format names"),
    ("max_shard_size", 0, "a positive number of bytes"),
    ("max_shard_size", "lots", "a size"),
    ("max_kl", -1.0, "None or a number at least 0"),
    ("max_abs", "0.1", "None or a number at least 0"),
    ("min_top1", 1.5, "None or a number between 0 and 1"),
    ("min_effect_kept", 2.0, "a number at most 1"),
    ("stages", "load", "None or a tuple of stage names"),
    ("out", None, "an output folder path"),
    ("base", "", "a folder path or a Hub id"),
    ("gguf_pre", "", "None or a pre-tokenizer name"),
])
def test_the_plan_checks_each_field_when_it_is_built(field, value, expected):
    """A Python caller gets what the CLI's choices give its users: a wrong type or value is refused when the plan is
    built, naming the field, the value and what it takes, never read as something else later (a non-empty string was
    once a true ``parity``)."""
    kwargs = {**dict(base="b", adapter="a", out="o"), field: value}
    with pytest.raises(ExportError, match="ExportPlan") as error:
        ExportPlan(**kwargs)
    assert field in str(error.value) and expected in str(error.value), str(error.value)


def test_the_plan_takes_the_cli_words_that_mean_one_thing(tiny, tmp_path):
    from pathlib import Path

    plan = ExportPlan(base=Path("b"), adapter="a", out="o", parity="off", dtype="bf16", formats="safetensors, gguf:q8_0",
                      max_shard_size="2GB", min_top1=1)
    assert (plan.parity, plan.dtype, plan.formats, plan.max_shard_size) == (False, "bfloat16",
                                                                            ("safetensors", "gguf:q8_0"), 2 * 10**9)
    assert plan.base == "b" and plan.out == Path("o") and plan.min_top1 == 1.0
    assert ExportPlan(base="b", adapter="a", out="o", parity="ON", dtype=torch.float16).dtype == "float16"
    assert "parity" not in plan.stage_names()
    base, adapter = tiny
    ctx = run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "out", parity="off",
                                  progress=False))
    assert "parity" not in ctx.timings and all(a.parity is None for a in ctx.artifacts)  # parity really did not run


def test_a_format_installed_through_an_entry_point_runs_like_a_built_in_one(tiny, tmp_path, monkeypatch):
    """A package adds a format through the entry-point group lora_export.formats, as a stage comes through
    lora_export.stages: `--to` finds it, its pre-flight's result reaches its sink, its file lands in the output."""
    import exporter.formats as formats
    from exporter.context import Artifact
    from exporter.formats.base import Format
    from exporter.registry import Registry

    class NamesSink:
        consumes_stream = False

        def __init__(self, ctx, prepared):
            self.ctx, self.prepared = ctx, prepared

        def close(self):
            path = self.ctx.staging / "names.txt"
            path.write_text("\n".join([self.prepared] + [t.name for t in self.ctx.layout.tensors]) + "\n")
            return [Artifact("names", self.ctx.plan.out / path.name, path)]

        def abort(self):
            pass

    class NamesFormat(Format):
        name = "names"

        def prepare(self, ctx, variant):
            return f"{len(ctx.layout.tensors)} tensors"

        def output_bytes(self, ctx, request):
            return 4096, 0

        def open_sink(self, ctx, request):
            return NamesSink(ctx, request.prepared)

    class EntryPoint:
        name, value = "names", "tests:NamesFormat"

        @staticmethod
        def load():
            return NamesFormat

    monkeypatch.setattr(formats, "entry_points", lambda group: [EntryPoint] if group == formats.ENTRY_POINT_GROUP
                        else [])
    registry: Registry = Registry("format")
    for fmt in formats.FORMATS.values():
        registry.register(fmt.name, fmt)
    formats.add_installed_formats(registry)
    monkeypatch.setattr(formats, "FORMATS", registry)
    base, adapter = tiny
    run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "out", formats="safetensors,names",
                            parity=False, progress=False))
    lines = (tmp_path / "out" / "names.txt").read_text().splitlines()
    assert lines[0] == f"{len(lines) - 1} tensors" and "model.layers.0.self_attn.q_proj.weight" in lines
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_failed_run_does_not_wait_for_the_base_hashes(tmp_path):
    """The base shards are hashed on a background thread while the merge runs: a run that fails (or is interrupted)
    must exit at once, not after hashing 140 GB. A shard that never yields a byte (a FIFO nobody writes) stands in for
    a huge one: the process still exits."""
    import os
    import subprocess
    import sys

    fifo = tmp_path / "model-00001-of-00002.safetensors"
    os.mkfifo(fifo)
    code = ("import sys; from pathlib import Path; from exporter.stages.load import _BackgroundHashes; "
            f"_BackgroundHashes([Path({str(fifo)!r})]); sys.exit(0)")
    try:
        done = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True, text=True)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        pytest.fail("the process waited for the background hashing thread")
    assert done.returncode == 0, done.stderr


def test_each_merged_base_weight_is_released_row_block_by_row_block_over_its_whole_bytes(tiny, tmp_path, monkeypatch):
    """Memory stays at a few tensors because the merge hands back the base's pages as it goes: for every LoRA-merged
    weight (square or not), the byte ranges released are consecutive row blocks covering exactly its stored bytes."""
    from exporter.base import BaseModel

    base, adapter = tiny
    released: dict[str, list[tuple[int, int | None]]] = {}
    original = BaseModel.release

    def record(self, name, begin=0, end=None):
        released.setdefault(name, []).append((begin, end))
        return original(self, name, begin, end)

    monkeypatch.setattr(BaseModel, "release", record)
    ctx = run_export(base, adapter, tmp_path / "out", parity=False, formats=("safetensors",))
    merged = [t for t in ctx.layout.tensors if t.module is not None and not t.adapter_key]
    shapes = {t.base_name: tuple(ctx.base.info(t.base_name).shape) for t in merged}
    assert len(set(shapes.values())) > 1 and any(r != c for r, c in shapes.values())  # square and not
    for t in merged:
        info = ctx.base.info(t.base_name)
        ranges = [r for r in released[t.base_name] if r != (0, None)]
        assert ranges[0][0] == 0 and ranges[-1][1] == info.nbytes, (t.base_name, ranges)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (t.base_name, ranges)


@pytest.mark.parametrize("progress", [False, True])
def test_the_merge_bar_shows_only_with_progress_and_the_cpu_merge_uses_one_worker_a_core(tiny, tmp_path, monkeypatch,
                                                                                        capfd, progress):
    """--no-progress (progress=False) writes no bar to stderr, progress=True the merge's; on the CPU the stream runs
    converters/ordered_pool.default_workers() tensors at once (one per core, up to 4)."""
    from converters.ordered_pool import default_workers
    from exporter.merge_stream import MergeStream

    base, adapter = tiny
    workers_used = []
    original = MergeStream.pump

    def pump(self, writers, workers, **kwargs):
        workers_used.append(workers)
        return original(self, writers, workers, **kwargs)

    monkeypatch.setattr(MergeStream, "pump", pump)
    from exporter.context import ExportPlan

    run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "out", parity=False,
                            progress=progress))
    assert workers_used == [default_workers()]
    err = capfd.readouterr().err
    assert ("merge:" in err) is progress, err[-500:]
    if progress:
        # The bar counts the bytes the writers received: the data section of the safetensors written (each shard's
        # size less its 8-byte length and JSON header), its total shown in scaled units as tqdm prints them ("107k").
        from tqdm import tqdm

        data = 0
        for shard in (tmp_path / "out").glob("*.safetensors"):
            raw = shard.read_bytes()
            data += len(raw) - 8 - int.from_bytes(raw[:8], "little")
        shown = tqdm.format_sizeof(data)
        assert f"/{shown} [" in err, (shown, err[-500:])


def test_a_cuda_merge_pumps_one_tensor_at_a_time(monkeypatch):
    """On a GPU the stream is not split across threads (one device, its own parallelism): one worker."""
    from types import SimpleNamespace

    from exporter.stages.export import ExportStage

    seen = []
    merge = SimpleNamespace(tensors=[], pump=lambda writers, workers, on_written: seen.append(workers))
    ctx = SimpleNamespace(device=torch.device("cuda"), merge=merge, plan=SimpleNamespace(progress=False))
    ExportStage._pump(ctx, [])
    assert seen == [1]


def test_the_output_dtype_is_the_flag_then_the_config_then_the_stored_tensors(tmp_path):
    """choose_dtype: --dtype wins; else config.json's dtype (even where the shards hold another, as a float16 config
    over bf16 shards); else, with no dtype in the config, the first floating-point tensor's dtype, as stored."""
    from exporter.base import load_base
    from exporter.stages.load import choose_dtype

    folder = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "float16"
    config_path.write_text(json.dumps(config))
    assert choose_dtype(None, load_base(folder)) == torch.float16
    assert choose_dtype("float32", load_base(folder)) == torch.float32
    del config["dtype"]
    config_path.write_text(json.dumps(config))
    assert choose_dtype(None, load_base(folder)) == torch.bfloat16


def test_the_device_is_cpu_when_asked_or_when_no_gpu_and_anything_else_is_refused(monkeypatch):
    """--device cpu is the CPU; auto is CUDA only where torch sees one; cuda without one, or another name, is one
    error naming the flag."""
    from exporter.stages.load import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("cpu") == torch.device("cpu") and choose_device("auto") == torch.device("cpu")
    with pytest.raises(ExportError, match="--device cuda"):
        choose_device("cuda")
    with pytest.raises(ExportError, match="--device tpu.*not a device"):
        choose_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_device("auto") == torch.device("cuda") and choose_device("cuda") == torch.device("cuda")
