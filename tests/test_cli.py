"""The CLI commands other than run (run is covered in test_bad_input.py)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import build_peft_adapter, build_tiny_base
from exporter.cli import main


def test_inspect_shows_per_module_scale_and_size(tmp_path):
    base = build_tiny_base(tmp_path / "base", "gemma3")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, use_rslora=True,
                                 target_modules=["q_proj", "lm_head"])
    result = CliRunner().invoke(main, ["inspect", str(adapter), "--base", str(base), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {m["module"] for m in info["modules"]} == {"lm_head", "model.layers.0.self_attn.q_proj",
                                                     "model.layers.1.self_attn.q_proj"}
    assert all(abs(m["scale"] - 16 / 8**0.5) < 1e-12 for m in info["modules"])
    # tied model + lm_head LoRA: the output gains a 128×32 fp32 lm_head beside the embedding
    base_bytes = (base / "model.safetensors").stat().st_size
    assert base_bytes < info["output_bytes"] + 1e4 and info["output_bytes"] - base_bytes > 128 * 32 * 4 - 1e4
    assert info["config_updates"] == {"tie_word_embeddings": False}
    table = CliRunner().invoke(main, ["inspect", str(adapter)])
    assert table.exit_code == 0 and "lm_head" in table.output and "5.657" in table.output


def test_demo_runs_end_to_end(tmp_path):
    result = CliRunner().invoke(main, ["-q", "demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "FAIL" not in result.output
    report = json.loads((tmp_path / "merged" / "report.json").read_text())
    ran = {(a["format"], a["parity"]["runtime"]) for a in report["artifacts"] if a["parity"]["passed"]}
    # llama_cpp is in the test extra, so the demo's GGUF runs here
    assert ran == {("safetensors", "transformers"), ("gguf", "llama.cpp"), ("onnx", "onnxruntime")}, report


def test_every_command_help_has_an_example():
    for command in ("run", "inspect", "demo"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output and "lora-export" in result.output


def test_stage_from_entry_point_is_registered(monkeypatch):
    import exporter.pipeline as pipeline

    class Hello:
        name = "hello"

        def run(self, ctx): ...

        def check(self, ctx): ...

    class FakeEntryPoint:
        name = "hello"

        def load(self):
            return Hello

    monkeypatch.setattr(pipeline, "entry_points", lambda group: [FakeEntryPoint()] if group == pipeline.ENTRY_POINT_GROUP else [])
    registry = pipeline.default_registry()
    assert "hello" in registry.names() and isinstance(registry.create("hello"), Hello)


def test_gguf_writer_chatter_is_kept_out_of_the_log():
    import logging

    from exporter.cli import _setup_logging

    root, gguf_log = logging.getLogger(), logging.getLogger("gguf")
    saved = root.level, gguf_log.level
    try:
        root.setLevel(logging.INFO)  # as a default-verbosity run leaves the root logger
        gguf_log.setLevel(logging.NOTSET)
        _setup_logging(verbose=0, quiet=False)
        writer_log = logging.getLogger("gguf.gguf_writer")  # logs endianness and temporary file names at INFO
        assert writer_log.isEnabledFor(logging.WARNING) and not writer_log.isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        gguf_log.setLevel(saved[1])
