"""tests/olah_mirror.py (olah 0.5.4, a real Hub mirror server, serving local git repositories offline on 127.0.0.1)
driven by huggingface_hub's own client and by exporter.hub: what snapshot_download fetches (only the allowed files,
byte for byte, plain git blobs and LFS pointers alike), revisions by commit sha, branch and tag, and the errors olah
answers — where they differ from huggingface.co's, the test says so and pins olah's answer.

huggingface_hub reads its settings at import time (huggingface_hub.constants): the ``client`` fixture patches
ENDPOINT *and* HUGGINGFACE_CO_URL_TEMPLATE (hf_hub_url formats the template), HF_HUB_OFFLINE (scripts/_venv.sh sets it
for the suite; exporter.hub also reads the environment variable at call time), HF_HUB_DISABLE_XET and HF_HUB_CACHE.
One test runs exporter.hub in a subprocess configured by environment variables only, as a CLI run would be.

The first run builds .venv-olah (scripts/olah_venv.sh, about 15 s with a warm pip cache); olah starts in under 1 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hub_server import point_hub_client
from olah_mirror import ROOT, OlahMirror

from huggingface_hub import snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
)


@pytest.fixture(scope="module")
def olah(tmp_path_factory):
    with OlahMirror(tmp_path_factory.mktemp("olah")) as mirror:
        yield mirror


@pytest.fixture
def client(olah, tmp_path, monkeypatch):
    """huggingface_hub (and exporter.hub) pointed at olah for this test, with a fresh cache."""
    point_hub_client(monkeypatch, olah.endpoint, tmp_path / "hf-cache")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return olah


def make_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def tiny_model(folder: Path, seed: int = 0, shards: int = 1, extras: bool = True) -> Path:
    """config.json + safetensors weights (a few MB; sharded with an index when shards > 1), and, with ``extras``,
    files a base download must leave on the server (a pickle, a second copy of the weights, a GGUF)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 512, "seed": seed}))
    tensors = {f"model.layers.{i}.weight": rng.standard_normal((512, 512), dtype=np.float32) for i in range(4)}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(folder / shard))
            weight_map |= {n: shard for n in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if extras:
        make_folder(folder, {"pytorch_model.bin": b"pickle" * 1000, "consolidated.safetensors": b"copy" * 1000,
                             "gguf/model.Q4_K_M.gguf": b"GGUF" * 1000})
    return folder


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# -- huggingface_hub's snapshot_download ----------------------------------------------------------------------------

@pytest.mark.parametrize("lfs", [(), ("*.safetensors",)], ids=["git-blobs", "lfs-pointers"])
def test_snapshot_download_fetches_exactly_the_allowed_files_byte_for_byte(client, tmp_path, lfs):
    src = tiny_model(tmp_path / "src")
    make_folder(src, {"README.md": b"---\nlicense: mit\n---\n# tiny\n", "sub/notes.txt": b"not asked for"})
    repo = f"org/allowed-{len(lfs)}"
    sha = client.add_repo(repo, src, lfs=lfs)
    path = Path(snapshot_download(repo, allow_patterns=["*.json", "model.safetensors"], cache_dir=tmp_path / "c",
                                  endpoint=client.endpoint))
    assert path.name == sha  # <cache>/models--org--name/snapshots/<commit>
    expected = {name: data for name, data in files_under(src).items() if name in ("config.json", "model.safetensors")}
    assert files_under(path) == expected
    assert len(expected["model.safetensors"]) > 4 * 2**20  # a real multi-MB weight file went through
    # and without patterns: every file, subfolders included
    everything = Path(snapshot_download(repo, cache_dir=tmp_path / "c", endpoint=client.endpoint))
    assert files_under(everything) == files_under(src)


def test_revisions_by_commit_sha_branch_and_tag(client, tmp_path):
    repo = "org/revisions"
    v1 = client.add_repo(repo, make_folder(tmp_path / "v1", {"config.json": b'{"v": 1}', "a.txt": b"one"}))
    v2 = client.add_repo(repo, make_folder(tmp_path / "v2", {"config.json": b'{"v": 2}', "b.txt": b"two"}))
    client.add_ref(repo, "stable", v1)  # refs made after main moved on
    client.add_ref(repo, "refs/tags/v1.0", v1)
    dev = client.add_repo(repo, make_folder(tmp_path / "dev", {"config.json": b'{"v": 3}'}), branch="dev")
    assert len({v1, v2, dev}) == 3

    def get(revision):
        return Path(snapshot_download(repo, revision=revision, cache_dir=tmp_path / "c", endpoint=client.endpoint))

    for revision, commit, files in [(None, v2, {"config.json": b'{"v": 2}', "b.txt": b"two"}),
                                    ("main", v2, {"config.json": b'{"v": 2}', "b.txt": b"two"}),
                                    (v1, v1, {"config.json": b'{"v": 1}', "a.txt": b"one"}),
                                    ("stable", v1, {"config.json": b'{"v": 1}', "a.txt": b"one"}),
                                    ("v1.0", v1, {"config.json": b'{"v": 1}', "a.txt": b"one"}),
                                    ("dev", dev, {"config.json": b'{"v": 3}'})]:
        path = get(revision)
        assert (path.name, files_under(path)) == (commit, files), revision
    # a branch that moves: the next download follows it
    v3 = client.add_repo(repo, make_folder(tmp_path / "v3", {"config.json": b'{"v": 4}'}), branch="stable")
    assert get("stable").name == v3 and files_under(get("stable")) == {"config.json": b'{"v": 4}'}


def test_a_missing_repository_is_repository_not_found(client, tmp_path):
    # olah answers 401 RepoNotFound (huggingface.co: 401 too, for a missing or private repo without a token).
    with pytest.raises(RepositoryNotFoundError) as info:
        snapshot_download("org/no-such-repo", cache_dir=tmp_path / "c", endpoint=client.endpoint)
    assert info.value.response.status_code == 401


def test_a_missing_revision_differs_from_the_hub(client, tmp_path):
    """huggingface.co answers 404 RevisionNotFound for both; olah's mirror does not know that error:
    - a branch or tag name it cannot resolve: 401 RepoNotFound, so RepositoryNotFoundError;
    - a well-formed commit sha that is not in the repository: snapshot_download skips repo_info for a sha and lists
      the tree, which olah answers 404 EntryNotFound, so LocalEntryNotFoundError ("check your internet connection").
    exporter.hub therefore reports "no repository" and "cannot be reached" where the Hub would give "no revision"."""
    repo = "org/has-main"
    client.add_repo(repo, make_folder(tmp_path / "src", {"config.json": b"{}"}))
    with pytest.raises(RepositoryNotFoundError) as info:
        snapshot_download(repo, revision="no-such-branch", cache_dir=tmp_path / "c", endpoint=client.endpoint)
    assert not isinstance(info.value, RevisionNotFoundError)
    with pytest.raises(LocalEntryNotFoundError, match="EntryNotFound"):
        snapshot_download(repo, revision="0123456789abcdef0123456789abcdef01234567", cache_dir=tmp_path / "c",
                          endpoint=client.endpoint)


# -- exporter.hub -----------------------------------------------------------------------------------------------------

def test_download_base_fetches_config_and_weights_only(client, tmp_path):
    from exporter.hub import HubRef, download_base

    src = tiny_model(tmp_path / "src")
    sha = client.add_repo("org/tiny-base", src, lfs=["*.safetensors"])
    got = download_base(HubRef("org/tiny-base"), progress=False)
    assert got.commit == sha and got.path.name == sha
    assert Path(got.path).is_relative_to(tmp_path / "hf-cache")  # HF_HUB_CACHE honoured
    assert files_under(got.path) == {n: d for n, d in files_under(src).items()
                                     if n in ("config.json", "model.safetensors")}


def test_download_base_sharded_at_a_branch(client, tmp_path):
    from exporter.hub import HubRef, download_base

    main_src = tiny_model(tmp_path / "main", seed=1)
    sharded = tiny_model(tmp_path / "sharded", seed=2, shards=2)
    client.add_repo("org/tiny-sharded", main_src)
    sha = client.add_repo("org/tiny-sharded", sharded, branch="sharded")
    got = download_base(HubRef("org/tiny-sharded", "sharded"), progress=False)
    assert got.commit == sha and got.as_report()["revision"] == "sharded"
    assert sorted(files_under(got.path)) == ["config.json", "model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert files_under(got.path).items() <= files_under(sharded).items()


def test_download_base_errors_are_input_errors(client, tmp_path):
    from exporter.errors import InputError
    from exporter.hub import HubRef, download_base

    with pytest.raises(InputError, match="no base model repository"):
        download_base(HubRef("org/nothing-here"), progress=False)
    client.add_repo("org/bin-only", make_folder(tmp_path / "bin", {"config.json": b"{}", "pytorch_model.bin": b"x"}))
    with pytest.raises(InputError, match="has no model.safetensors"):
        download_base(HubRef("org/bin-only"), progress=False)


def test_exporter_hub_configured_by_environment_alone(olah, tmp_path):
    """A fresh interpreter (as the CLI would run) with HF_ENDPOINT / HF_HUB_OFFLINE=0 in its environment."""
    sha = olah.add_repo("org/env-only", tiny_model(tmp_path / "src", extras=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env |= {"HF_ENDPOINT": olah.endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    code = ("from exporter.hub import download_base, HubRef\n"
            "d = download_base(HubRef('org/env-only'), progress=False)\nprint(d.commit, d.path)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    commit, path = out.stdout.split()
    assert commit == sha and files_under(Path(path)) == files_under(tmp_path / "src")
