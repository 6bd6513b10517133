"""The Hub features' local parts, no server: what counts as a Hub id, the plan's push fields, the base taken from the
adapter, and which repositories a push makes with which cards (read back by huggingface_hub's own ModelCard).
The round trips through a Hub-protocol server are in tests/test_hub.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_bf16_llama, run_export, train_adapter
from exporter.context import ExportPlan
from exporter.errors import ExportError
from exporter.hub import HubRef, parse_hub_ref


@pytest.mark.parametrize("spec, expected", [
    ("meta-llama/Llama-3.2-1B", HubRef("meta-llama/Llama-3.2-1B")),
    ("me/my-lora@v2", HubRef("me/my-lora", "v2")),
    ("me/my.lora_x@refs/pr/3", HubRef("me/my.lora_x", "refs/pr/3")),
    ("me/lora@0123456789abcdef0123456789abcdef01234567", HubRef("me/lora", "0123456789abcdef0123456789abcdef01234567")),
    ("./me/lora", None), ("/abs/me", None), ("~/me/lora", None), ("me/lora/extra", None), ("single", None),
    ("me/-bad", None), ("me/lo ra", None), ("me/lora@", None),
])
def test_what_is_a_hub_id(spec, expected):
    assert parse_hub_ref(spec) == expected


def test_an_existing_local_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "lora").mkdir(parents=True)
    assert parse_hub_ref("me/lora") is None  # the folder the user has, never a download
    assert parse_hub_ref("me/other") == HubRef("me/other")


@pytest.mark.parametrize("fields, words", [
    ({"push_to": "me/model@main"}, "push_to"),
    ({"push_to": "just-a-name"}, "push_to"),
    ({"push_to": "me/model", "create_pr": True, "push_revision": "dev"}, "create_pr"),
    ({"private": True}, "push_to"),
    ({"push_to": "me/model", "push_revision": " "}, "push_revision"),
])
def test_push_fields_are_checked_when_the_plan_is_built(fields, words):
    with pytest.raises(ExportError, match=words):
        ExportPlan(base="b", adapter="a", out=Path("o"), **fields)


def test_push_adds_the_publish_stage_after_parity():
    plan = ExportPlan(base="b", adapter="a", out=Path("o"), push_to="me/model")
    assert plan.stage_names()[-2:] == ("parity", "publish")
    assert "publish" not in ExportPlan(base="b", adapter="a", out=Path("o")).stage_names()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-offline")
    base = build_bf16_llama(root / "base")
    adapter = train_adapter(root / "adapter", base, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    return base, adapter


def test_without_base_the_adapters_base_model_name_or_path_is_used(trained, tmp_path):
    base, adapter = trained
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    ctx = run_export(None, adapter, tmp_path / "out")
    assert ctx.base.path == base and ctx.artifacts[0].parity.passed
    assert ctx.report["inputs"]["base"] == str(base) and ctx.report["inputs"]["base_hub"] is None


def test_without_base_an_adapter_that_names_none_is_refused(trained, tmp_path):
    _, adapter = trained
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": None}
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    (orphan / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="names no base model.*pass --base"):
        run_export(None, orphan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_local_path_that_is_not_there_names_both_ways_to_give_it(trained, tmp_path):
    _, adapter = trained
    with pytest.raises(ExportError, match="no such folder for the base model, and not a Hub id"):
        run_export(tmp_path / "missing", adapter, tmp_path / "out")


def test_the_request_fingerprint_ignores_only_where_and_how_the_output_goes(trained, tmp_path):
    """The same command run again (to resume a push) must find its output; any change to what is built must not."""
    from exporter.report import request_fingerprint

    base, adapter = trained
    plan = ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "a", push_to="me/x")
    same = ExportPlan(base=str(base), adapter=str(adapter), out=tmp_path / "b", progress=False, overwrite=True,
                      push_to="me/y", private=True, create_pr=True)
    assert request_fingerprint(plan) == request_fingerprint(same)
    for change in ({"dtype": "float32"}, {"formats": ("safetensors", "gguf:q8_0")}, {"max_kl": 1e-3},
                   {"adapter": str(base)}, {"parity": False}):
        other = ExportPlan(**({"base": str(base), "adapter": str(adapter), "out": tmp_path / "a"} | change))
        assert request_fingerprint(other) != request_fingerprint(plan), change
    json.dumps(request_fingerprint(plan))  # it goes into report.json


def _fake_output(out: Path) -> dict:
    """An output folder as a run with every format leaves it, and its report (only what publishing reads)."""
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.json", "README.md", "Modelfile",
                 "model-Q8_0.gguf", "model-Q4_K_M.gguf", "adapter.gguf", "published.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(name.encode())
    for name in ("nf4/config.json", "nf4/model.safetensors", "onnx/model.onnx", "onnx/model.onnx.data",
                 "onnx-fp16/model.onnx", "onnx-fp16/genai_config.json"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(name.encode())

    def parity(fmt: str, dtype: str, runtime: str, kept: float) -> dict:
        return {"format": fmt, "runtime": runtime, "dtype": dtype, "positions": 10, "max_abs": 0.01, "kl": 1e-5,
                "top1": 1.0, "top1_decisive": 1.0, "decisive_positions": 4, "passed": True, "failures": "",
                "adapter_effect_kept": kept}

    artifacts = [("safetensors", "bfloat16", out, "transformers", 0.999), ("safetensors", "nf4", out / "nf4",
                 "transformers", 0.3), ("gguf", "q8_0", out / "model-Q8_0.gguf", "llama.cpp", 0.97),
                 ("gguf", "q4_k_m", out / "model-Q4_K_M.gguf", "llama.cpp", 0.8),
                 ("gguf-lora", "f32", out / "adapter.gguf", "llama.cpp", 0.9999),
                 ("onnx", "fp32", out / "onnx", "onnxruntime", 1.0), ("onnx", "fp16", out / "onnx-fp16",
                                                                     "onnxruntime", 0.99)]
    return {
        "lora_export_version": "0.1.0", "created": "2026-12-05T00:00:00+00:00",
        "inputs": {"base": "/cache/snapshots/abc", "adapter": "/cache/snapshots/def",
                   "base_hub": {"repo_id": "org/base", "revision": None, "commit": "a" * 40},
                   "adapter_hub": {"repo_id": "me/lora", "revision": "v2", "commit": "b" * 40},
                   "base_card": {"license": "llama3.2"},
                   "adapter_sha256": {"adapter_model.safetensors": "c" * 64}, "base_sha256": {"model.safetensors": "d" * 64}},
        "artifacts": [{"format": f, "variant": v, "path": str(p), "parity": parity(f, v, r, k)}
                      for f, v, p, r, k in artifacts],
        "dequantize": None, "parity_reference": "base + adapter",
    }


def test_a_push_makes_one_repository_per_kind_each_with_its_files_and_model_tree(tmp_path):
    from exporter.hub_layout import base_model_id, plan_repos

    report = _fake_output(tmp_path)
    repos = {r.repo_id: r for r in plan_repos("me/model", report, tmp_path, base_model_id(report))}
    assert {rid: (r.library_name, r.base_model, r.relation, sorted(r.files)) for rid, r in repos.items()} == {
        "me/model": ("transformers", "org/base", "merge", ["config.json", "model.safetensors", "report.json",
                                                          "tokenizer.json"]),
        "me/model-bnb-nf4": ("transformers", "me/model", "quantized", ["config.json", "model.safetensors"]),
        "me/model-GGUF": ("gguf", "me/model", "quantized", ["Modelfile", "model-Q4_K_M.gguf", "model-Q8_0.gguf"]),
        "me/model-LoRA-GGUF": ("gguf", "org/base", "adapter", ["adapter.gguf"]),
        "me/model-ONNX": ("onnx", "me/model", "quantized", ["onnx-fp16/genai_config.json", "onnx-fp16/model.onnx",
                                                            "onnx/model.onnx", "onnx/model.onnx.data"]),
    }
    for r in repos.values():  # every file is the output's own, under the name it has in the repo
        assert all(source.read_bytes() == str(source.relative_to(tmp_path)).encode() for source in r.files.values())


def test_without_the_merged_repo_a_gguf_repo_points_at_the_base_as_a_finetune(tmp_path):
    from exporter.hub_layout import plan_repos

    report = _fake_output(tmp_path)
    report["artifacts"] = [a for a in report["artifacts"] if a["format"] == "gguf"]
    (repo,) = plan_repos("me/model", report, tmp_path, "org/base")
    assert (repo.repo_id, repo.base_model, repo.relation) == ("me/model-GGUF", "org/base", "finetune")


def test_a_bnb_base_names_the_model_its_card_says_it_was_quantized_from(tmp_path):
    from exporter.hub_layout import base_model_id

    report = _fake_output(tmp_path)
    report["inputs"]["base_hub"]["repo_id"] = "unsloth/base-bnb-4bit"
    report["inputs"]["base_card"] = {"base_model": ["org/base"], "license": "apache-2.0"}
    assert base_model_id(report) == "unsloth/base-bnb-4bit"  # not quantized as far as the run knows: its own id
    report["dequantize"] = {"type": "nf4"}
    assert base_model_id(report) == "org/base"


def test_cards_parse_with_huggingface_hub_and_say_what_the_hub_reads(tmp_path):
    from huggingface_hub import ModelCard

    from exporter.cards import hub_card
    from exporter.hub import sha256_file
    from exporter.hub_layout import base_model_id, plan_repos

    report = _fake_output(tmp_path)
    repos = plan_repos("me/model", report, tmp_path, base_model_id(report))
    for repo in repos:
        digests = {name: sha256_file(p) for name, p in repo.files.items()}
        text = hub_card(report, repo, repos, digests)
        card = ModelCard(text)
        data = card.data.to_dict()
        assert data["base_model"] == repo.base_model and data["base_model_relation"] == repo.relation
        assert data["library_name"] == repo.library_name and data["pipeline_tag"] == "text-generation"
        assert data["license"] == "llama3.2"  # the base card's, copied

        for name, source in repo.files.items():  # every file's sha256, computed here by hashlib
            assert f"| {name} | {source.stat().st_size} | `{hashlib.sha256(source.read_bytes()).hexdigest()}` |" \
                in card.text
        assert "`org/base`" in card.text and "`" + "a" * 40 + "`" in card.text and "`me/lora`" in card.text
        for artifact in repo.artifacts:  # its parity rows, with the runtime each file ran in
            p = artifact["parity"]
            assert any(line.startswith(p["format"]) and p["runtime"] in line and p["dtype"] in line
                       for line in card.text.splitlines())
            assert f"| {p['format']}:{p['dtype']} | {p['runtime']} | {p['adapter_effect_kept']:.1%} |" in card.text
    gguf = next(r for r in repos if r.kind == "gguf")
    assert "ollama run hf.co/me/model-GGUF:Q8_0" in hub_card(report, gguf, repos, {n: "" for n in gguf.files})


def test_a_base_without_a_license_gives_a_card_without_one(tmp_path):
    from huggingface_hub import ModelCard

    from exporter.cards import hub_card
    from exporter.hub_layout import plan_repos

    report = _fake_output(tmp_path)
    report["inputs"]["base_card"] = {}
    repo = plan_repos("me/model", report, tmp_path, "org/base")[0]
    data = ModelCard(hub_card(report, repo, [repo], {n: "0" for n in repo.files})).data.to_dict()
    assert "license" not in data


def test_the_base_card_metadata_goes_into_the_report(trained, tmp_path):
    base, adapter = trained
    card_base = tmp_path / "base"
    card_base.mkdir()
    for f in base.iterdir():
        (card_base / f.name).symlink_to(f)
    (card_base / "README.md").write_text("---\nlicense: other\nlicense_name: my-license\nbase_model: org/root\n"
                                         "tags: [x]\n---\n# card\n")
    ctx = run_export(card_base, adapter, tmp_path / "out", parity=False)
    assert ctx.report["inputs"]["base_card"] == {"license": "other", "license_name": "my-license",
                                                 "base_model": "org/root"}


# The CLI end to end with the Hub unreachable (a closed port): what happens before and instead of an upload.
CLOSED_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **CLOSED_HUB}, timeout=600)


def test_a_parity_failure_pushes_nothing(trained, tmp_path):
    """Exit 3 (parity), not 2 (an upload that could not reach the Hub): publishing never started."""
    base, adapter = trained
    out = tmp_path / "out"
    result = _cli("run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
                  "--max-kl", "1e-15", "--push-to", "me/model")
    assert result.returncode == 3, result.stderr
    assert "parity failed" in result.stderr and not out.exists()
    assert not (tmp_path / ".out.publish").exists() and "publish" not in result.stderr.split("error:")[0]


def test_an_output_kept_despite_failing_parity_is_not_published(trained, tmp_path):
    base, adapter = trained
    out = tmp_path / "out"
    result = _cli("run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
                  "--max-kl", "1e-15", "--accept-parity-failure", "--push-to", "me/model", "--private")
    assert result.returncode == 2, result.stderr
    assert "parity failed for safetensors" in result.stderr and "is not published" in result.stderr
    assert (out / "report.json").is_file() and not (out / "published.json").exists()


def test_an_upload_that_fails_leaves_the_output_and_the_same_command_resumes_without_rebuilding(trained, tmp_path):
    base, adapter = trained
    out = tmp_path / "out"
    command = ["run", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress",
               "--parity", "off", "--push-to", "me/model", "--revision", "dev"]
    first = _cli(*command)
    assert first.returncode == 2, first.stderr
    assert "me/model: the upload stopped" in first.stderr and "run the same command again" in first.stderr
    report = out / "report.json"
    built = report.stat().st_mtime_ns, (out / "model.safetensors").stat().st_mtime_ns
    second = _cli(*command)
    assert second.returncode == 2 and "the upload stopped" in second.stderr
    assert "already holds what this command builds" in second.stderr and "stage load" not in second.stderr
    assert (report.stat().st_mtime_ns, (out / "model.safetensors").stat().st_mtime_ns) == built  # not rebuilt
    # A different request is not taken for it: without --overwrite it is refused as a non-empty folder.
    third = _cli(*command[:-4], "--dtype", "float32", "--push-to", "me/model")
    assert third.returncode == 2 and "exists and is not empty" in third.stderr


def test_a_pull_request_goes_to_the_default_branch_so_a_revision_with_it_is_refused(trained, tmp_path):
    base, adapter = trained
    result = _cli("run", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"),
                  "--push-to", "me/model", "--create-pr", "--revision", "dev")
    assert result.returncode == 2 and "create_pr" in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, words", [
    (["--private"], "push_to"),
    (["--push-to", "me/model@dev"], "push_to"),
])
def test_push_flags_that_contradict_each_other_are_refused_before_anything_runs(trained, tmp_path, args, words):
    base, adapter = trained
    result = _cli("run", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2 and words in result.stderr and not (tmp_path / "o").exists()


def test_a_combined_adapter_gets_a_peft_repository_and_cards_name_every_adapter(tmp_path):
    """--to peft pushes to <push_to>-LoRA with PEFT's two files at the root (where the Hub and PeftModel look), library
    peft; every card names each input adapter, the method and the weights."""
    from huggingface_hub import ModelCard

    from exporter.cards import hub_card
    from exporter.hub_layout import base_model_id, plan_repos

    report = _fake_output(tmp_path)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    peft_parity = {**report["artifacts"][0]["parity"], "format": "peft", "dtype": "float32",
                   "runtime": "transformers+lora"}
    report["artifacts"] = [report["artifacts"][0],
                           {"format": "peft", "variant": "float32", "path": str(tmp_path / "adapter"),
                            "parity": peft_parity}]
    report["request"] = {"adapter": "me/task-lora", "more_adapters": ["me/style-lora"]}
    report["combination"] = {"method": "ties", "space": "adapter", "weights": [1.0, 0.5]}
    repos = {r.repo_id: r for r in plan_repos("me/model", report, tmp_path, base_model_id(report))}
    peft = repos["me/model-LoRA"]
    assert (peft.library_name, peft.base_model, peft.relation) == ("peft", "org/base", "adapter")
    assert sorted(peft.files) == ["adapter_config.json", "adapter_model.safetensors"]
    for repo in repos.values():
        card = ModelCard(hub_card(report, repo, list(repos.values()), {n: "" for n in repo.files}))
        assert "`me/task-lora`, `me/style-lora` combined by ties (adapter space, weights 1, 0.5)" in card.text
    assert "PeftModel.from_pretrained" in hub_card(report, peft, list(repos.values()), {n: "" for n in peft.files})
