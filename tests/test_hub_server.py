"""tests/hub_server.py driven by huggingface_hub's own client (in-process): uploads (regular + LFS), downloads,
branches, pull requests, the errors the client maps to its exception classes, and an interrupted LFS upload that
resumes.

huggingface_hub reads its settings at import time (huggingface_hub.constants), so the fixture patches the constants
themselves: ENDPOINT *and* HUGGINGFACE_CO_URL_TEMPLATE (hf_hub_url formats the template, built from ENDPOINT at import,
and only swaps the prefix when it starts with constants.ENDPOINT), HF_HUB_OFFLINE (scripts/_venv.sh sets it for the
suite), HF_HUB_DISABLE_XET (hf_xet is installed: without it uploads and downloads would go the Xet way) and
HF_HUB_CACHE. Patching ENDPOINT also keeps the client's once-per-process GET {ENDPOINT}/api/agent-harnesses (user-agent
detection, on the first request it builds headers for) on this server instead of huggingface.co."""

from __future__ import annotations

import hashlib
import os
import types
from pathlib import Path

import pytest

from hub_server import HubServer, point_hub_client

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
)

TOKEN = "hf_test_token"
# huggingface_hub's LFS PUT passes a file object as `data=`, which httpx2 deprecates: the client's business, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "hub-store")
    point_hub_client(monkeypatch, server.endpoint, tmp_path / "hf-cache", token=TOKEN)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield server
    server.stop()
    assert not server.errors, server.errors[0]                    # no request HubServer itself choked on
    if not bars_were_off:
        enable_progress_bars()


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a failed LFS PUT 5 times (sleeping 1+2+4+8+8 s): keep the retries, drop the sleeps."""
    from huggingface_hub.utils import _http
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


def make_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def tree_bytes(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_regular_and_lfs_files(hub, api, tmp_path):
    weights = os.urandom(1_500_000)                               # > 1 MB, *.safetensors: an LFS file
    files = {"config.json": b'{"r": 8}\n', "model.safetensors": weights, "sub/notes.txt": b"notes\n"}
    folder = make_folder(tmp_path / "up", files)

    url = api.create_repo("me/lora", private=True)
    assert url.repo_id == "me/lora" and url.endpoint == hub.endpoint
    assert api.create_repo("me/lora", exist_ok=True).repo_id == "me/lora"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("me/lora")
    assert exc.value.response.status_code == 409

    info = api.upload_folder(repo_id="me/lora", folder_path=folder, commit_message="first upload")
    assert info.oid == hub.head("me/lora") and len(info.oid) == 40 and info.pr_url is None
    assert hub.lfs_uploads == [sha256(weights)]                 # the weights went through the LFS batch + PUT
    stored = hub.files("me/lora")
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    assert hub.read("me/lora", "model.safetensors") == weights
    assert hub.history("me/lora")[0]["message"] == "first upload"

    assert sorted(api.list_repo_files("me/lora")) == [".gitattributes", "config.json", "model.safetensors",
                                                      "sub/notes.txt"]
    top = {entry.path: entry for entry in api.list_repo_tree("me/lora")}
    assert set(top) == {".gitattributes", "config.json", "model.safetensors", "sub"}
    assert top["model.safetensors"].lfs.sha256 == sha256(weights) and top["model.safetensors"].size == len(weights)
    assert api.model_info("me/lora").sha == info.oid and api.model_info("me/lora").private is True

    path = snapshot_download("me/lora", token=TOKEN)            # endpoint and cache from the patched constants
    assert Path(path).name == info.oid                            # the commit the download resolved
    assert Path(path).is_relative_to(tmp_path / "hf-cache")
    assert {k: v for k, v in tree_bytes(path).items() if k != ".gitattributes"} == files

    hub.reset_log()
    only = snapshot_download("me/lora", allow_patterns=["*.json"], cache_dir=tmp_path / "cache2",
                             endpoint=hub.endpoint, token=TOKEN)
    assert tree_bytes(only) == {"config.json": files["config.json"]}
    assert not [p for m, p in hub.requests if m == "GET" and "/resolve/" in p and not p.endswith("config.json")]

    one = hf_hub_download("me/lora", "model.safetensors", revision=info.oid, cache_dir=tmp_path / "cache3",
                          token=TOKEN)
    assert Path(one).read_bytes() == weights

    same = api.upload_folder(repo_id="me/lora", folder_path=folder)  # unchanged: the client skips the commit, from
    assert same.oid == info.oid and len(hub.history("me/lora")) == 2  # the remote oids preupload answered

    with HubServer(hub.root) as restarted:                        # the store is plain files: a new server serves it
        again = hf_hub_download("me/lora", "sub/notes.txt", endpoint=restarted.endpoint, token=TOKEN,
                                cache_dir=tmp_path / "cache4")
        assert Path(again).read_bytes() == b"notes\n" and restarted.head("me/lora") == info.oid


def test_branch_upload_and_pull_request(hub, api, tmp_path):
    api.create_repo("me/lora")
    v1 = {"config.json": b"v1", "adapter.safetensors": os.urandom(4096)}
    main1 = api.upload_folder(repo_id="me/lora", folder_path=make_folder(tmp_path / "v1", v1)).oid

    api.create_branch("me/lora", branch="dev")
    api.create_branch("me/lora", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_branch("me/lora", branch="dev")
    assert exc.value.response.status_code == 409

    v2 = {"config.json": b"v2 on dev"}
    dev = api.upload_folder(repo_id="me/lora", folder_path=make_folder(tmp_path / "v2", v2), revision="dev")
    assert hub.head("me/lora", "dev") == dev.oid and hub.history("me/lora", "dev")[1]["oid"] == main1
    assert hub.head("me/lora") == main1                          # main unchanged
    dev_path = snapshot_download("me/lora", revision="dev", token=TOKEN)
    assert Path(dev_path).name == dev.oid
    assert tree_bytes(dev_path)["config.json"] == b"v2 on dev"
    assert tree_bytes(dev_path)["adapter.safetensors"] == v1["adapter.safetensors"]
    assert Path(hf_hub_download("me/lora", "config.json", token=TOKEN)).read_bytes() == b"v1"

    v3 = {"adapter.safetensors": os.urandom(4096)}
    pr = api.upload_folder(repo_id="me/lora", folder_path=make_folder(tmp_path / "v3", v3), create_pr=True)
    assert pr.pr_url == f"{hub.endpoint}/me/lora/discussions/1"
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1
    assert hub.head("me/lora") == main1                          # a PR leaves main alone
    assert hub.refs("me/lora")["refs/pr/1"] == pr.oid
    pr_path = snapshot_download("me/lora", revision=pr.pr_revision, token=TOKEN)
    assert Path(pr_path).name == pr.oid
    assert tree_bytes(pr_path)["adapter.safetensors"] == v3["adapter.safetensors"]
    by_sha = hf_hub_download("me/lora", "adapter.safetensors", revision=pr.oid, token=TOKEN)
    assert Path(by_sha).read_bytes() == v3["adapter.safetensors"]
    assert Path(hf_hub_download("me/lora", "adapter.safetensors", token=TOKEN, force_download=True)
                ).read_bytes() == v1["adapter.safetensors"]

    refs = api.list_repo_refs("me/lora", include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": main1, "dev": dev.oid}
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    assert [c.commit_id for c in api.list_repo_commits("me/lora", revision="dev")][:2] == [dev.oid, main1]
    pr2 = api.upload_folder(repo_id="me/lora", folder_path=tmp_path / "v2", create_pr=True)
    assert pr2.pr_revision == "refs/pr/2"


def test_errors_map_to_huggingface_hub_exceptions(hub, api, tmp_path):
    hub.add_repo_from_folder("me/open", make_folder(tmp_path / "seed", {"config.json": b"{}",
                                                                       "w.safetensors": b"\0" * 100}))
    assert hub.files("me/open")["w.safetensors"].lfs and not hub.files("me/open")["config.json"].lfs
    hub.add_repo_from_folder("me/gated", tmp_path / "seed")
    hub.gate("me/gated")

    with pytest.raises(GatedRepoError):
        hf_hub_download("me/gated", "config.json", token=TOKEN)
    with pytest.raises(GatedRepoError):
        snapshot_download("me/gated", token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("me/missing", token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/missing", "config.json", token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("me/missing")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("me/open", revision="no-such-branch", token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("me/open", "config.json", revision="0" * 40, token=TOKEN)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("me/open", revision="refs/pr/9")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("me/open", "missing.json", token=TOKEN)
    assert Path(hf_hub_download("me/open", "w.safetensors", token=TOKEN)).read_bytes() == b"\0" * 100

    hub.require_token = True                                      # writes without a token: 401
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.endpoint, token=False).upload_folder(repo_id="me/open", folder_path=tmp_path / "seed")
    assert exc.value.response.status_code == 401
    assert api.upload_folder(repo_id="me/open", folder_path=make_folder(tmp_path / "x", {"a.txt": b"a"})).oid


@pytest.mark.parametrize("fault", [500, "drop"])
def test_interrupted_lfs_upload_resumes_with_only_the_missing_objects(hub, api, tmp_path, no_backoff, fault):
    files = {f"model-{i:05d}-of-00004.safetensors": os.urandom(50_000 + i) for i in range(4)}
    files["config.json"] = b'{"shards": 4}'
    folder = make_folder(tmp_path / "up", files)
    all_oids = {sha256(data) for name, data in files.items() if name.endswith(".safetensors")}
    api.create_repo("me/big")
    before = hub.head("me/big")

    hub.fail_lfs_uploads_after(1, mode=fault)
    with pytest.raises(Exception) as exc:
        api.upload_folder(repo_id="me/big", folder_path=folder)
    assert "Error while uploading" in str(exc.value) or "Error while uploading" in repr(exc.value.__cause__)
    first = set(hub.lfs_uploads)
    assert len(hub.lfs_uploads) == 1 and first < all_oids         # exactly one object got through
    assert set(hub.lfs_failed) <= all_oids - first and len(hub.lfs_failed) > len(set(hub.lfs_failed))  # retried
    assert hub.head("me/big") == before                          # no commit was made
    assert set(hub.files("me/big")) == {".gitattributes"}
    assert not [p for m, p in hub.requests if m == "POST" and "/commit/" in p]

    hub.clear_faults()
    hub.reset_log()
    info = api.upload_folder(repo_id="me/big", folder_path=folder)
    assert sorted(hub.lfs_uploads) == sorted(all_oids - first)   # only what was missing was sent again
    assert sorted(p for m, p in hub.requests if m == "PUT") == sorted(f"/_lfs/upload/{o}" for o in hub.lfs_uploads)
    assert info.oid == hub.head("me/big") and hub.history("me/big")[1]["oid"] == before
    got = snapshot_download("me/big", token=TOKEN)
    assert {k: v for k, v in tree_bytes(got).items() if k != ".gitattributes"} == files


def test_a_subprocess_client_configured_by_environment(hub, api, tmp_path):
    """The way a CLI under test reaches the server: a fresh interpreter whose huggingface_hub reads HF_ENDPOINT,
    HF_HUB_OFFLINE=0, HF_HUB_DISABLE_XET=1, HF_HUB_CACHE and HF_TOKEN at import (the fixture set them)."""
    import subprocess
    import sys
    hub.add_repo_from_folder("me/base", make_folder(tmp_path / "seed", {"config.json": b"{}",
                                                                       "model.safetensors": b"w" * 2048}))
    folder = make_folder(tmp_path / "out", {"adapter_model.safetensors": b"a" * 4096, "README.md": b"# lora\n"})
    script = (
        "import sys; from huggingface_hub import HfApi, snapshot_download\n"
        "path = snapshot_download('me/base')\n"
        "assert open(path + '/model.safetensors', 'rb').read() == b'w' * 2048\n"
        "HfApi().create_repo('me/out', exist_ok=True)\n"
        "print(HfApi().upload_folder(repo_id='me/out', folder_path=sys.argv[1]).oid)\n")
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == hub.head("me/out")
    assert hub.read("me/out", "adapter_model.safetensors") == b"a" * 4096
    assert hub.files("me/out")["adapter_model.safetensors"].lfs
