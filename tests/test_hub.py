"""Hub in and out through real Hub-protocol servers on 127.0.0.1, with huggingface_hub's own client doing the talking.

- tests/hub_server.py (ours: the upload side no PyPI server has) takes the push: `lora-export run --base org/base
  --adapter org/lora --to safetensors,gguf:q4_k_m,onnx --push-to me/model`, then every pushed repository is downloaded
  back and run; a gated base, a wrong revision, a missing repository, a parity failure and an upload killed midway
  (then resumed by the same command) each end as the README says.
- tests/olah_mirror.py (olah, a Hub mirror on PyPI, serving git repositories) serves the downloads of a run, then the
  same run again offline from the cache.

huggingface_hub reads its settings at import (huggingface_hub.constants): the fixtures patch the constants and the
environment both (tests/hub_server.py: point_hub_client).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import build_bf16_llama, break_merge_scale, model_logits, train_adapter
from exporter.cli import main
from hub_server import HubServer, point_hub_client

pytestmark = [pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]


def _point_client_at(monkeypatch, endpoint: str, cache: Path) -> None:
    point_hub_client(monkeypatch, endpoint, cache, token="hf_test_token")
    # huggingface_hub retries a failed LFS upload 5 times, sleeping 23 s in all: no sleeping in tests
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A bf16 llama with its tokenizer, and an adapter trained on it whose config names the base by its Hub id."""
    root = tmp_path_factory.mktemp("hub-parts")
    base = build_bf16_llama(root / "base")
    adapter = train_adapter(root / "lora", base, target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/base"}))
    (base / "README.md").write_text("---\nlicense: llama3.2\nbase_model: meta-llama/Llama-3.2-1B\n---\n# base\n")
    return base, adapter


@pytest.fixture
def hub(tmp_path, monkeypatch, parts):
    server = HubServer(tmp_path / "hub-store")
    _point_client_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    base, adapter = parts
    server.add_repo_from_folder("org/base", base)
    server.add_repo_from_folder("org/lora", adapter)
    yield server
    server.stop()
    assert not server.errors, server.errors[0]


def cli(*args: str):
    return CliRunner().invoke(main, ["run", "--no-progress", *args])


def test_hub_ids_in_and_every_format_pushed_round_trip(hub, parts, tmp_path):
    from huggingface_hub import ModelCard, snapshot_download

    out = tmp_path / "out"
    result = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors,gguf:q4_k_m,onnx",
                 "--push-to", "me/model", "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["base_hub"] == {"repo_id": "org/base", "revision": None, "commit": hub.head("org/base")}
    assert report["inputs"]["adapter_hub"]["commit"] == hub.head("org/lora")

    published = {p["repo_id"]: p for p in json.loads((out / "published.json").read_text())}
    assert sorted(published) == ["me/model", "me/model-GGUF", "me/model-ONNX"]
    for repo_id, pushed in published.items():
        assert pushed["commit"] == hub.head(repo_id)
        remote = set(hub.files(repo_id)) - {".gitattributes"}  # the Hub's own, made with the repository
        assert sorted(remote) == pushed["files"]
        card = ModelCard(hub.read(repo_id, "README.md").decode())
        data = card.data.to_dict()
        assert data["license"] == "llama3.2"  # the base card's, never invented
        assert data["pipeline_tag"] == "text-generation"
        body = card.text
        for name in remote:  # every file's sha256 in the card, equal to the bytes the Hub holds
            if name != "README.md":
                assert hashlib.sha256(hub.read(repo_id, name)).hexdigest() in body, (repo_id, name)
        assert hub.head("org/base")[:12] in body and "org/lora" in body
    merged = ModelCard(hub.read("me/model", "README.md").decode()).data.to_dict()
    assert (merged["base_model"], merged["base_model_relation"], merged["library_name"]) == \
        ("org/base", "merge", "transformers")
    gguf = ModelCard(hub.read("me/model-GGUF", "README.md").decode()).data.to_dict()
    assert (gguf["base_model"], gguf["base_model_relation"], gguf["library_name"]) == ("me/model", "quantized", "gguf")
    assert "model-Q4_K_M.gguf" in hub.files("me/model-GGUF")  # the type in the name: Ollama's hf.co/…:Q4_K_M
    assert "hf.co/me/model-GGUF:Q4_K_M" in ModelCard(hub.read("me/model-GGUF", "README.md").decode()).text
    onnx = ModelCard(hub.read("me/model-ONNX", "README.md").decode()).data.to_dict()
    assert onnx["library_name"] == "onnx"

    # Downloaded back: the merged repository runs in transformers exactly as the output folder does.
    back = Path(snapshot_download("me/model", cache_dir=tmp_path / "back"))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model_logits(back, ids), model_logits(out, ids))
    assert not (back / "model-Q4_K_M.gguf").exists()  # the GGUF is in its own repository
    gguf_back = Path(snapshot_download("me/model-GGUF", allow_patterns=["*Q4_K_M.gguf"], cache_dir=tmp_path / "back"))
    assert [p.name for p in gguf_back.iterdir()] == ["model-Q4_K_M.gguf"]
    assert (gguf_back / "model-Q4_K_M.gguf").read_bytes() == (out / "model-Q4_K_M.gguf").read_bytes()

    # The ONNX card's own snippet, run: the downloaded folder generates in onnxruntime-genai what the local one does.
    import onnxruntime_genai as og

    snippet = ModelCard(hub.read("me/model-ONNX", "README.md").decode()).text.split("```python")[1].split("```")[0]
    scope: dict = {}
    exec(snippet.replace('snapshot_download("me/model-ONNX"',
                         f'snapshot_download("me/model-ONNX", cache_dir={str(tmp_path / "back")!r}'), scope)

    def greedy(model) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=14)
        generator = og.Generator(model, params)
        generator.append_tokens(list(range(3, 11)))
        while not generator.is_done():
            generator.generate_next_token()
        return list(generator.get_sequence(0))

    assert greedy(scope["model"]) == greedy(og.Model(str(out / "onnx")))


def test_a_parity_failure_pushes_nothing(hub, tmp_path, monkeypatch):
    break_merge_scale(monkeypatch, lambda scale, rank: scale * 1.5)
    out = tmp_path / "out"
    result = cli("--base", "org/base", "--adapter", "org/lora", "--push-to", "me/model", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert not any("/api/repos/create" in path for _, path in hub.requests)
    assert not (out / "published.json").exists()
    # --accept-parity-failure keeps the output; publishing still refuses it
    kept = cli("--base", "org/base", "--adapter", "org/lora", "--push-to", "me/model", "--out", str(out),
               "--accept-parity-failure")
    assert kept.exit_code == 2 and "parity failed for safetensors" in kept.output, kept.output
    assert (out / "report.json").exists() and not (out / "published.json").exists()
    assert not any("/api/repos/create" in path for _, path in hub.requests)


def test_an_upload_killed_midway_is_resumed_by_the_same_command(hub, tmp_path):
    """Four safetensors shards: the push dies after the first LFS object. Nothing is committed; the same command again
    does not rebuild the output, sends only the three missing objects, and commits once."""
    out = tmp_path / "out"
    args = ("--base", "org/base", "--adapter", "org/lora", "--max-shard-size", "50KB", "--push-to", "me/model",
            "--out", str(out))
    hub.fail_lfs_uploads_after(1)
    first = cli(*args)
    assert first.exit_code == 2, first.output
    assert "run the same command again" in first.output
    assert "main" not in hub.refs("me/model") or len(hub.history("me/model")) == 1  # created, nothing committed
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 4 and len(hub.lfs_uploads) == 1
    built = (out / "report.json").stat().st_mtime_ns

    hub.clear_faults()
    hub.reset_log()
    second = cli(*args)
    assert second.exit_code == 0, second.output
    assert (out / "report.json").stat().st_mtime_ns == built
    assert len(hub.lfs_uploads) == len(shards) - 1  # the one sent before the failure is not sent again
    assert sorted(n for n in hub.files("me/model") if n.endswith(".safetensors")) == shards
    for name in shards:
        assert hub.read("me/model", name) == (out / name).read_bytes()


@pytest.mark.parametrize("spec, words", [
    ("org/gated", "is a gated repository"),
    ("org/base@no-such-branch", "has no revision 'no-such-branch'"),
    ("org/nothing-here", "the Hub has no base model repository by that id"),
])
def test_a_base_that_cannot_be_downloaded_is_one_line_and_exit_2(hub, parts, tmp_path, spec, words):
    hub.add_repo_from_folder("org/gated", parts[0])
    hub.gate("org/gated")
    result = cli("--base", spec, "--adapter", "org/lora", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Fix:" in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_base_other_than_the_adapters_is_a_warning_naming_both(hub, parts, tmp_path):
    hub.add_repo_from_folder("org/other-base", parts[0])
    result = cli("--base", "org/other-base", "--adapter", "org/lora", "--to", "safetensors", "--parity", "off",
                 "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "out" / "report.json").read_text())["notes"]  # each also logged as a warning
    assert [n for n in notes if "--base org/other-base is not the base the adapter names (org/base" in n], notes


def test_only_what_the_run_needs_is_downloaded(hub, parts, tmp_path):
    """A repository that also holds pickles, a consolidated copy and a GGUF: only the config, tokenizer, card and the
    safetensors the index lists are fetched."""
    extra = Path(shutil.copytree(parts[0], tmp_path / "full"))
    for name in ("pytorch_model.bin", "consolidated.safetensors", "model-Q8_0.gguf", "optimizer.pt"):
        (extra / name).write_bytes(b"\0" * 2048)
    hub.add_repo_from_folder("org/full", extra)
    hub.reset_log()
    result = cli("--base", "org/full", "--adapter", "org/lora", "--to", "safetensors", "--parity", "off",
                 "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path
               and path.startswith("/org/full/")}
    assert fetched and not fetched & {"pytorch_model.bin", "consolidated.safetensors", "model-Q8_0.gguf",
                                      "optimizer.pt"}, fetched
    assert "model.safetensors" in fetched and "config.json" in fetched


def test_downloads_from_an_olah_mirror_then_offline_from_the_cache(parts, tmp_path, monkeypatch):
    from olah_mirror import OlahMirror

    base, adapter = parts
    with OlahMirror(tmp_path / "mirror") as mirror:
        base_commit = mirror.add_repo("org/base", base, lfs=["*.safetensors"])
        mirror.add_repo("org/lora", adapter, lfs=["*.safetensors"])
        _point_client_at(monkeypatch, mirror.endpoint, tmp_path / "hf-cache")
        result = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--out",
                     str(tmp_path / "out"))
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["inputs"]["base_hub"]["commit"] == base_commit
    assert all(a["parity"]["passed"] for a in report["artifacts"])

    # The mirror is gone: offline mode runs from the cache; without the cache it says so, in one line.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--out", str(tmp_path / "again"))
    assert again.exit_code == 0, again.output
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    missing = cli("--base", "org/base", "--adapter", "org/lora", "--out", str(tmp_path / "never"))
    assert missing.exit_code == 2 and "offline mode is on" in missing.output, missing.output


def test_push_to_a_branch_or_as_a_pull_request_leaves_main_alone(hub, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    first = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--push-to", "me/model",
                "--private", "--revision", "dev", "--out", str(out))
    assert first.exit_code == 0, first.output
    main_files = set(hub.files("me/model", "main"))
    assert "model.safetensors" in hub.files("me/model", "dev") and "model.safetensors" not in main_files
    assert hub._meta("me/model")["private"] is True
    pushed = json.loads((out / "published.json").read_text())[0]
    assert pushed["commit"] == hub.head("me/model", "dev")

    again = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--push-to", "me/model",
                "--create-pr", "--out", str(out))
    assert again.exit_code == 0, again.output
    pr = json.loads((out / "published.json").read_text())[0]
    assert pr["pr_url"] and set(hub.files("me/model", "main")) == main_files  # main untouched
    assert hub.files("me/model", "refs/pr/1")["model.safetensors"] == hub.files("me/model", "dev")["model.safetensors"]
    # the card the PR carries is one huggingface_hub reads, and it names the adapter and the base commit
    card = ModelCard(hub.read("me/model", "README.md", "refs/pr/1").decode())
    card.validate()  # huggingface_hub's own validation (its POST /api/validate-yaml reaches this server)
    assert card.data.to_dict()["base_model"] == "org/base" and "org/lora" in card.text


def test_a_push_without_a_token_that_can_write_is_one_line_and_keeps_the_output(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub.require_token = True
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    out = tmp_path / "out"
    result = cli("--base", "org/base", "--adapter", "org/lora", "--to", "safetensors", "--parity", "off",
                 "--push-to", "me/model", "--out", str(out))
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the token is missing or invalid" in errors[0] and "HF_TOKEN" in errors[0], errors
    assert (out / "report.json").is_file() and not (out / "published.json").exists()
