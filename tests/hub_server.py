"""A small Hugging Face Hub-protocol HTTP server for tests (stdlib only) that huggingface_hub 2.4.0's client accepts.

Start it with ``HubServer(root)`` (or ``with HubServer(root) as hub:``): it listens on 127.0.0.1, free port, in a daemon
thread; ``hub.endpoint`` is the URL to give ``HfApi(endpoint=...)`` / ``snapshot_download(endpoint=...)``. Model repos
only. Everything is stored as plain files under ``root``::

    root/repos/<ns>/<name>/repo.json        {"private", "gated", "refs": {"main": sha, "b": sha, "refs/pr/1": sha}, ...}
    root/repos/<ns>/<name>/commits/<sha>.json  {"oid", "parent", "message", "description", "date", "files"}
    root/lfs/<sha256>                       LFS objects (content addressed, shared by every repo)
    root/blobs/<git blob sha1>              regular (non-LFS) file contents

A file entry is ``{"size", "sha256", "oid" (git blob id; for an LFS file the id of its pointer file), "lfs", "storage"
(path relative to root)}``. Every commit gets a fresh 40-hex sha; each branch / ``refs/pr/N`` ref points at its head
commit and the history is the ``parent`` chain.

Endpoints (what huggingface_hub 2.4.0 calls; ``{repo}`` is ``<namespace>/<name>``, ``{rev}`` a branch, ``refs/pr/N`` or
a commit sha, URL-quoted into one path segment as the client does):

    GET  /api/whoami-v2                                 whoami (401 without a Bearer token)
    GET  /api/agent-harnesses                           always 404 (the client's once-per-process user-agent lookup)
    POST /api/validate-yaml                             README.md metadata check (always valid)
    POST /api/repos/create                              create_repo (409 when it exists: the client's exist_ok)
    POST /api/repos/delete                              delete_repo
    GET  /api/models/{repo}                             repo_info / model_info (main)
    GET  /api/models/{repo}/revision/{rev}              repo_info / model_info at a revision (snapshot_download)
    GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree / list_repo_files (?recursive=true)
    GET  /api/models/{repo}/refs                        list_repo_refs (?include_prs=1)
    GET  /api/models/{repo}/commits/{rev}               list_repo_commits
    POST /api/models/{repo}/branch/{branch}             create_branch (409 when it exists; body {"startingPoint"})
    DELETE /api/models/{repo}/branch/{branch}           delete_branch
    POST /api/models/{repo}/preupload/{rev}             upload modes ("lfs" / "regular") and remote oids
    POST /api/models/{repo}/commit/{rev}                create_commit / upload_folder (ndjson; ?create_pr=1)
    POST /{repo}.git/info/lfs/objects/batch             LFS batch API (upload only; stored objects get no actions)
    PUT  /_lfs/upload/{oid}                             the "basic" transfer's upload href (sha256 and size checked)
    POST /_lfs/verify/{oid}                             the verify href
    HEAD /{repo}/resolve/{rev}/{path}                   file metadata: X-Repo-Commit, ETag, X-Linked-Etag/-Size, ...
    GET  /{repo}/resolve/{rev}/{path}                   file content (Range: bytes=N- / N-M honoured)

Errors carry the X-Error-Code / X-Error-Message headers huggingface_hub.utils.hf_raise_for_status maps:
missing repo -> 404 RepoNotFound (RepositoryNotFoundError), unknown revision -> 404 RevisionNotFound
(RevisionNotFoundError), missing file or folder -> 404 EntryNotFound (RemoteEntryNotFoundError, with X-Repo-Commit so
the client can cache the absence), ``gate(repo)`` -> 403 GatedRepo on resolve (GatedRepoError; like the Hub, a gated
repo's info and tree stay readable), ``require_token = True`` -> 401 "Invalid credentials in Authorization header"
(a plain HfHubHTTPError) for every write without a Bearer token.

What differs from the real Hub: any token is accepted (no users, orgs or permissions; a private repo only needs *a*
token to be read); model repos only (datasets/spaces answer 400); no Xet (run the client with HF_HUB_DISABLE_XET=1:
resolve never sends X-Xet-Hash, LFS batch only offers "basic"), no multipart LFS, no git protocol (no clone/push), no
tags, no discussions beyond the number of ``refs/pr/N``, no pagination (one page), no gitignore handling, no
``expand`` data (lastCommit, security), resolve answers 200 with the content instead of a 302 to a CDN, commit shas
are random-ish rather than git object ids, what is LFS is decided by name (``*.safetensors``, ``*.gguf``, ``*.onnx*``,
``*.bin``, ...), size (``lfs_threshold``, 10 MiB) or a NUL byte in the first 512 bytes, not by .gitattributes.

Test hooks: ``requests`` (list of (method, path)), ``lfs_uploads`` (oids whose PUT was stored),
``lfs_failed`` (oids of PUTs answered by an injected fault), ``fail_lfs_uploads_after(n, mode=500 | "drop" | <status>)``
(the next n LFS PUTs go through, every later one fails: a 500, or the connection closed without an answer; persistent,
so the client's retries fail too, until ``clear_faults()``; huggingface_hub retries a PUT 5 times with 1-8 s sleeps, so
tests patch ``huggingface_hub.utils._http.time`` to skip them), ``reset_log()``,
``gate(repo_id)``, ``add_repo_from_folder(repo_id, folder, branch="main")``, ``files(repo_id, revision)``,
``read(repo_id, path, revision)``, ``head(repo_id, ref)``, ``history(repo_id, revision)``, ``refs(repo_id)``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import socket
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.gguf", "*.onnx*", "*.bin", "*.pt", "*.pth", "*.ckpt",
                "*.h5", "*.msgpack", "*.npy", "*.npz", "*.pkl", "*.model", "*.zip", "*.tar", "*.tar.gz", "*.tgz",
                "*.gz", "*.7z", "*.parquet", "*.arrow")
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
REPO_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def point_hub_client(monkeypatch, endpoint: str, cache: Path | str, token: str | None = None) -> None:
    """huggingface_hub (and exporter.hub, and subprocesses) pointed at ``endpoint`` for one test, with ``cache``.

    huggingface_hub reads its settings at import (huggingface_hub.constants), so the constants are patched as well as
    the environment: ENDPOINT *and* HUGGINGFACE_CO_URL_TEMPLATE (hf_hub_url formats the template, built from ENDPOINT at
    import), HF_HUB_OFFLINE (scripts/_venv.sh sets it for the suite), HF_HUB_DISABLE_XET (hf_xet is installed; these
    servers speak plain LFS) and HF_HUB_CACHE. ``token``: HF_TOKEN, or none at all."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                        "HF_HUB_CACHE": str(cache)}.items():
        monkeypatch.setenv(name, value)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    oid: str        # git blob id (for an LFS file: of its pointer file), as the Hub's tree lists it
    lfs: bool
    storage: str    # relative to the server root


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        self.body = {"error": message, **(body or {})}


def _repo_not_found():
    return HubError(404, "RepoNotFound", "Repository not found")


class HubServer:
    """The server and its store. ``HubServer(root)`` starts serving at once; ``stop()`` (or leaving ``with``) ends
    it."""

    def __init__(self, root: Path | str, *, username: str = "user", lfs_threshold: int = 10 * 1024 * 1024):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.lfs_threshold = lfs_threshold
        self.require_token = False
        self.requests: list[tuple[str, str]] = []
        self.lfs_uploads: list[str] = []
        self.lfs_failed: list[str] = []     # oids of PUTs answered by an injected fault (retries included)
        self.errors: list[str] = []         # tracebacks of requests HubServer itself failed on (answered 500)
        self._fail_budget: int | None = None   # LFS PUTs still let through before the injected failures
        self._fail_mode: int | str = 500
        self._lock = threading.RLock()
        self._connections: set = set()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop serving and end the keep-alive connections the client pools, so no handler thread lingers."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- fault injection -------------------------------------------------------------------------------------------
    def fail_lfs_uploads_after(self, n: int, mode: int | str = 500) -> None:
        """Store the next ``n`` LFS PUTs, then fail every later one (``500``/any status, or ``"drop"``: close the
        connection without an answer) until ``clear_faults()``."""
        with self._lock:
            self._fail_budget, self._fail_mode = n, mode

    def clear_faults(self) -> None:
        with self._lock:
            self._fail_budget = None

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.lfs_uploads.clear()
            self.lfs_failed.clear()

    # ---- store -----------------------------------------------------------------------------------------------------
    def _repo_dir(self, repo_id: str) -> Path:
        ns, _, name = repo_id.partition("/")
        if not (REPO_NAME_RE.match(ns) and REPO_NAME_RE.match(name)) or ".." in repo_id:
            raise HubError(400, None, f"Invalid repo id {repo_id!r}")
        return self.root / "repos" / ns / name

    def _meta(self, repo_id: str) -> dict:
        path = self._repo_dir(repo_id) / "repo.json"
        if not path.is_file():
            raise _repo_not_found()
        return json.loads(path.read_text())

    def _save_meta(self, repo_id: str, meta: dict) -> None:
        path = self._repo_dir(repo_id) / "repo.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _commit(self, repo_id: str, sha: str) -> dict:
        return json.loads((self._repo_dir(repo_id) / "commits" / f"{sha}.json").read_text())

    def _resolve(self, repo_id: str, revision: str | None) -> str:
        """Branch, ``refs/pr/N``, ``refs/heads/<branch>`` or commit sha -> commit sha (404 RevisionNotFound)."""
        meta = self._meta(repo_id)
        revision = revision or "main"
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/"):]
        if revision in meta["refs"]:
            return meta["refs"][revision]
        if COMMIT_RE.match(revision) and (self._repo_dir(repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _store_blob(self, data: bytes, lfs: bool) -> FileEntry:
        sha256 = hashlib.sha256(data).hexdigest()
        if lfs:
            storage, oid = f"lfs/{sha256}", git_blob_oid(lfs_pointer(sha256, len(data)))
        else:
            oid = git_blob_oid(data)
            storage = f"blobs/{oid}"
        target = self.root / storage
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + f".{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return FileEntry(len(data), sha256, oid, lfs, storage)

    def _lfs_entry(self, sha256: str, size: int | None = None) -> FileEntry | None:
        path = self.root / "lfs" / sha256
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not path.is_file():
            return None
        real = path.stat().st_size
        if size is not None and size != real:
            return None
        return FileEntry(real, sha256, git_blob_oid(lfs_pointer(sha256, real)), True, f"lfs/{sha256}")

    def is_lfs(self, path: str, size: int, sample: bytes = b"") -> bool:
        name = path.rsplit("/", 1)[-1]
        return (size >= self.lfs_threshold or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
                or b"\0" in sample[:512])

    def _new_commit(self, repo_id: str, parent: str | None, files: dict[str, FileEntry | dict], message: str,
                    description: str = "") -> str:
        seed = f"{repo_id}\n{parent}\n{message}\n{time.time_ns()}\n{os.urandom(8).hex()}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        record = {"oid": sha, "parent": parent, "message": message, "description": description, "date": _now(),
                  "files": {p: (asdict(e) if isinstance(e, FileEntry) else e) for p, e in sorted(files.items())}}
        folder = self._repo_dir(repo_id) / "commits"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{sha}.json").write_text(json.dumps(record, indent=1))
        return sha

    # ---- helpers for tests -----------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, *, private: bool = False, exist_ok: bool = False) -> str:
        with self._lock:
            folder = self._repo_dir(repo_id)
            if (folder / "repo.json").is_file():
                if exist_ok:
                    return self.head(repo_id)
                # the client's exist_ok reads "url" from this 409 answer, as the Hub sends it
                raise HubError(409, None, "You already created this model repo",
                               body={"url": f"{self.endpoint}/{repo_id}"})
            folder.mkdir(parents=True, exist_ok=True)
            entry = self._store_blob(GITATTRIBUTES, lfs=False)
            sha = self._new_commit(repo_id, None, {".gitattributes": entry}, "initial commit")
            self._save_meta(repo_id, {"private": bool(private), "gated": False, "created": _now(),
                                      "refs": {"main": sha}, "prs": 0})
            return sha

    def gate(self, repo_id: str, gated: bool = True) -> None:
        with self._lock:
            meta = self._meta(repo_id)
            meta["gated"] = "manual" if gated else False
            self._save_meta(repo_id, meta)

    def add_repo_from_folder(self, repo_id: str, folder: Path | str, branch: str = "main",
                             message: str = "Add files from folder", private: bool = False) -> str:
        """Seed ``repo_id`` (created if missing; ``branch`` created from main if missing) with every file under
        ``folder`` in one commit; returns its sha. LFS is decided as for an upload (see ``is_lfs``)."""
        folder = Path(folder)
        with self._lock:
            self.create_repo(repo_id, private=private, exist_ok=True)
            meta = self._meta(repo_id)
            parent = meta["refs"].get(branch) or meta["refs"]["main"]
            files = dict(self._commit(repo_id, parent)["files"])
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                rel = path.relative_to(folder).as_posix()
                data = path.read_bytes()
                files[rel] = self._store_blob(data, self.is_lfs(rel, len(data), data[:512]))
            sha = self._new_commit(repo_id, parent, files, message)
            meta["refs"][branch] = sha
            self._save_meta(repo_id, meta)
            return sha

    def head(self, repo_id: str, ref: str = "main") -> str:
        return self._resolve(repo_id, ref)

    def refs(self, repo_id: str) -> dict[str, str]:
        return dict(self._meta(repo_id)["refs"])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, FileEntry]:
        record = self._commit(repo_id, self._resolve(repo_id, revision))
        return {p: FileEntry(**e) for p, e in record["files"].items()}

    def read(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        return (self.root / self.files(repo_id, revision)[path].storage).read_bytes()

    def history(self, repo_id: str, revision: str = "main") -> list[dict]:
        """Commits from ``revision`` back to the first one (newest first), without their file sets."""
        out, sha = [], self._resolve(repo_id, revision)
        while sha:
            record = self._commit(repo_id, sha)
            out.append({k: v for k, v in record.items() if k != "files"})
            sha = record["parent"]
        return out

    # ---- API answers (called by the handler; each returns (status, json-able body, headers)) ------------------------
    def _check_read(self, repo_id: str, token: str | None) -> dict:
        meta = self._meta(repo_id)
        if meta["private"] and not token:
            raise _repo_not_found()
        return meta

    def _check_write(self, token: str | None) -> None:
        if self.require_token and not token:
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def api_create_repo(self, body: dict, token: str | None):
        self._check_write(token)
        if body.get("type") not in (None, "model"):
            raise HubError(400, None, "HubServer serves model repos only")
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        private = body.get("private", body.get("visibility") == "private")
        self.create_repo(repo_id, private=bool(private))
        return 200, {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}, {}

    def api_delete_repo(self, body: dict, token: str | None):
        self._check_write(token)
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        with self._lock:
            self._meta(repo_id)
            (self._repo_dir(repo_id) / "repo.json").unlink()
        return 200, {}, {}

    def api_info(self, repo_id: str, revision: str | None, token: str | None):
        meta = self._check_read(repo_id, token)
        sha = self._resolve(repo_id, revision)
        record = self._commit(repo_id, sha)
        siblings = []
        for path, e in record["files"].items():
            item = {"rfilename": path, "size": e["size"], "blobId": e["oid"]}
            if e["lfs"]:
                item["lfs"] = {"size": e["size"], "sha256": e["sha256"],
                               "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
            siblings.append(item)
        return 200, {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                     "lastModified": record["date"], "createdAt": meta.get("created", record["date"]),
                     "private": meta["private"], "gated": meta["gated"], "disabled": False, "downloads": 0,
                     "likes": 0, "tags": [], "siblings": siblings}, {}

    def api_tree(self, repo_id: str, revision: str, path: str, recursive: bool, token: str | None):
        self._check_read(repo_id, token)
        sha = self._resolve(repo_id, revision)
        files = self._commit(repo_id, sha)["files"]
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
        out, folders = [], set()
        for p, e in files.items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            parts = rest.split("/")
            for i in range(1, len(parts)):              # every folder between prefix and the file
                if not recursive and i > 1:
                    break
                folders.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": e["oid"], "size": e["size"], "path": p}
                if e["lfs"]:
                    item["lfs"] = {"oid": e["sha256"], "size": e["size"],
                                   "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
                out.append(item)
        for f in sorted(folders):
            out.append({"type": "directory", "oid": hashlib.sha1(f"{sha}:{f}".encode()).hexdigest(), "path": f})
        out.sort(key=lambda item: item["path"])
        return 200, out, {}

    def api_refs(self, repo_id: str, include_prs: bool, token: str | None):
        self._check_read(repo_id, token)
        refs = self._meta(repo_id)["refs"]
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(refs.items())
                    if not n.startswith("refs/")]
        body = {"branches": branches, "tags": [], "converts": []}
        if include_prs:
            body["pullRequests"] = [{"name": n, "ref": n, "targetCommit": s} for n, s in sorted(refs.items())
                                    if n.startswith("refs/pr/")]
        return 200, body, {}

    def api_commits(self, repo_id: str, revision: str, token: str | None):
        self._check_read(repo_id, token)
        return 200, [{"id": c["oid"], "title": c["message"], "message": c["description"],
                      "authors": [{"user": self.username}], "date": c["date"]}
                     for c in self.history(repo_id, revision)], {}

    def api_create_branch(self, repo_id: str, branch: str, body: dict, token: str | None):
        self._check_write(token)
        with self._lock:
            meta = self._meta(repo_id)
            if branch in meta["refs"] or branch.startswith("refs/"):
                raise HubError(409, None, "Reference already exists" if branch in meta["refs"] else "Invalid name")
            meta["refs"][branch] = self._resolve(repo_id, body.get("startingPoint") or "main")
            self._save_meta(repo_id, meta)
        return 200, {}, {}

    def api_delete_branch(self, repo_id: str, branch: str, token: str | None):
        self._check_write(token)
        with self._lock:
            meta = self._meta(repo_id)
            if branch not in meta["refs"] or branch == "main":
                raise HubError(404 if branch != "main" else 403, "RevisionNotFound" if branch != "main" else None,
                               f"Cannot delete {branch}")
            del meta["refs"][branch]
            self._save_meta(repo_id, meta)
        return 200, {}, {}

    def api_preupload(self, repo_id: str, revision: str, body: dict, token: str | None):
        self._check_write(token)
        self._meta(repo_id)
        current = self._commit(repo_id, self._resolve(repo_id, revision))["files"]
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if self.is_lfs(f["path"], int(f["size"]), sample) else "regular"
            remote = current.get(f["path"])
            oid = None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"])
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": self._resolve(repo_id, revision)}, {}

    def api_commit(self, repo_id: str, revision: str, lines: list[dict], create_pr: bool, token: str | None):
        self._check_write(token)
        with self._lock:
            meta = self._meta(repo_id)
            if revision not in meta["refs"]:
                self._resolve(repo_id, revision)        # 404 RevisionNotFound when unknown...
                raise HubError(400, None, f"Cannot commit to {revision}: not a branch")  # ...400 for a commit sha
            parent = meta["refs"][revision]
            header = next((item["value"] for item in lines if item.get("key") == "header"), {})
            if header.get("parentCommit") and header["parentCommit"] != parent:
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            files = dict(self._commit(repo_id, parent)["files"])
            for item in lines:
                key, value = item.get("key"), item.get("value", {})
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                        else value["content"].encode()
                    files[value["path"]] = self._store_blob(data, lfs=False)
                elif key == "lfsFile":
                    entry = self._lfs_entry(value["oid"], value.get("size"))
                    if entry is None:
                        raise HubError(400, None, f"Your push was rejected because an LFS pointer pointed to a file "
                                                  f"that does not exist: {value['path']} ({value['oid']})")
                    files[value["path"]] = entry
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                elif key != "header":
                    raise HubError(400, None, f"Unknown commit operation {key!r}")
            sha = self._new_commit(repo_id, parent, files, header.get("summary", ""), header.get("description", ""))
            pr_url = None
            if create_pr:
                meta["prs"] += 1
                meta["refs"][f"refs/pr/{meta['prs']}"] = sha
                pr_url = f"{self.endpoint}/{repo_id}/discussions/{meta['prs']}"
            else:
                meta["refs"][revision] = sha
            self._save_meta(repo_id, meta)
        return 200, {"success": True, "commitOid": sha, "commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}",
                     "commitMessage": header.get("summary", ""), "pullRequestUrl": pr_url}, {}

    def api_lfs_batch(self, repo_id: str, body: dict, token: str | None):
        self._check_write(token)
        self._meta(repo_id)
        if body.get("operation") != "upload":
            raise HubError(400, None, "HubServer's LFS batch API only uploads")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                item["error"] = {"code": 422, "message": "Invalid oid"}
            elif self._lfs_entry(oid, size) is None:   # stored objects get no actions: nothing to send again
                item["actions"] = {"upload": {"href": f"{self.endpoint}/_lfs/upload/{oid}?size={size}"},
                                   "verify": {"href": f"{self.endpoint}/_lfs/verify/{oid}"}}
            objects.append(item)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {}

    def lfs_put(self, oid: str, size: int | None, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid or (size is not None and size != len(data)):
            raise HubError(400, None, f"Uploaded content does not match oid {oid} / size {size}")
        self._store_blob(data, lfs=True)
        with self._lock:
            self.lfs_uploads.append(oid)

    def lfs_verify(self, oid: str, body: dict):
        if self._lfs_entry(oid, body.get("size")) is None:
            raise HubError(404, None, f"LFS object {oid} not found")
        return 200, {}, {}

    def resolve(self, repo_id: str, revision: str, path: str, token: str | None):
        """(FileEntry, headers) for the resolve endpoint."""
        meta = self._check_read(repo_id, token)
        if meta["gated"]:
            raise HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                             f"authorized list.")
        sha = self._resolve(repo_id, revision)
        raw = self._commit(repo_id, sha)["files"].get(path)
        if raw is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        e = FileEntry(**raw)
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   "ETag": f'"{e.sha256 if e.lfs else e.oid}"'}
        if e.lfs:
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
        return e, headers


def _make_handler(server: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "HubServer/1.0"

        def log_message(self, *args):  # quiet
            pass

        def setup(self):
            super().setup()
            with server._lock:
                server._connections.add(self.connection)

        def finish(self):
            try:
                super().finish()
            finally:
                with server._lock:
                    server._connections.discard(self.connection)

        # -- plumbing --
        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            if not auth.lower().startswith("bearer "):
                return None
            return auth[7:].strip() or None

        def _body(self) -> bytes:
            """The request body (read once, in ``_dispatch``, so an early error answer leaves the connection clean)."""
            return self._raw_body

        def _read_body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _json_body(self) -> dict:
            data = self._body()
            return json.loads(data) if data.strip() else {}

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head_only: bool = False,
                  length: int | None = None):
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if not head_only and self.command != "HEAD" and body:
                self.wfile.write(body)

        def _send_json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _dispatch(self, method: str):
            split = urlsplit(self.path)
            with server._lock:
                server.requests.append((method, unquote(split.path)))
            query = {k: v[-1] for k, v in parse_qs(split.query).items()}
            segs = [unquote(s) for s in split.path.split("/")[1:]]
            self._raw_body = b"" if method in ("GET", "HEAD") else self._read_body()
            try:
                self._route(method, segs, query)
            except HubError as err:
                headers = {"X-Error-Message": err.message, **err.headers}
                if err.code:
                    headers["X-Error-Code"] = err.code
                self._send_json(err.status, err.body, headers)
            except (KeyError, ValueError, TypeError) as err:
                self._send_json(400, {"error": f"Bad request: {err!r}"}, {"X-Error-Message": "Bad request"})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as err:  # a HubServer bug: answer 500 (the client retries it) and keep it for the test
                server.errors.append(f"{method} {self.path}: {traceback.format_exc()}")
                self._send_json(500, {"error": repr(err)}, {"X-Error-Message": f"HubServer error: {err!r}"})

        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def do_PUT(self):
            self._dispatch("PUT")

        def do_DELETE(self):
            self._dispatch("DELETE")

        # -- routes --
        def _route(self, method: str, segs: list[str], query: dict):
            token = self._token()
            n = len(segs)
            if segs[:1] == ["api"]:
                if method == "GET" and segs[1:] == ["whoami-v2"]:
                    if not token:
                        raise HubError(401, None, "Invalid credentials in Authorization header")
                    return self._send_json(200, {"type": "user", "id": "0", "name": server.username,
                                                 "fullname": server.username, "orgs": [],
                                                 "auth": {"type": "access_token",
                                                          "accessToken": {"displayName": "test", "role": "write"}}})
                if method == "GET" and segs[1:] == ["agent-harnesses"]:
                    # huggingface_hub fetches this registry from constants.ENDPOINT once per process (user-agent
                    # detection) and caches a success under HF_HOME: a 404 makes it use an empty one, writing nothing
                    raise HubError(404, None, "No agent-harnesses registry on HubServer")
                if method == "POST" and segs[1:] == ["validate-yaml"]:
                    self._body()
                    return self._send_json(200, {"errors": [], "warnings": []})
                if method == "POST" and segs[1:] == ["repos", "create"]:
                    return self._send_json(*server.api_create_repo(self._json_body(), token))
                if method == "POST" and segs[1:] == ["repos", "delete"]:
                    return self._send_json(*server.api_delete_repo(self._json_body(), token))
                if n >= 4 and segs[1] in ("datasets", "spaces", "kernels"):
                    raise HubError(400, None, "HubServer serves model repos only")
                if n >= 4 and segs[1] == "models":
                    repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
                    if method == "GET" and not rest:
                        return self._send_json(*server.api_info(repo_id, None, token))
                    if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                        return self._send_json(*server.api_info(repo_id, rest[1], token))
                    if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                        recursive = str(query.get("recursive", "")).lower() in ("1", "true")
                        return self._send_json(*server.api_tree(repo_id, rest[1], "/".join(rest[2:]), recursive,
                                                                token))
                    if method == "GET" and rest == ["refs"]:
                        return self._send_json(*server.api_refs(repo_id, bool(query.get("include_prs")), token))
                    if method == "GET" and len(rest) == 2 and rest[0] == "commits":
                        return self._send_json(*server.api_commits(repo_id, rest[1], token))
                    if len(rest) == 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
                        if method == "DELETE":
                            return self._send_json(*server.api_delete_branch(repo_id, rest[1], token))
                        return self._send_json(*server.api_create_branch(repo_id, rest[1], self._json_body(), token))
                    if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                        return self._send_json(*server.api_preupload(repo_id, rest[1], self._json_body(), token))
                    if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                        return self._send_json(*server.api_commit(repo_id, rest[1], lines,
                                                                  query.get("create_pr") in ("1", "true"), token))
                raise HubError(404, None, f"{method} {self.path}: not implemented by HubServer")

            if segs[:1] == ["_lfs"] and n == 3:
                oid = segs[2]
                if method == "PUT" and segs[1] == "upload":
                    data = self._body()
                    with server._lock:     # admit-or-fail atomically: concurrent PUTs cannot both take the last slot
                        failing = server._fail_budget is not None and server._fail_budget <= 0
                        if failing:
                            server.lfs_failed.append(oid)
                        elif server._fail_budget is not None:
                            server._fail_budget -= 1
                    if failing:
                        if server._fail_mode == "drop":
                            self.close_connection = True
                            return
                        raise HubError(int(server._fail_mode), None, "Injected LFS upload failure")
                    server.lfs_put(oid, int(query["size"]) if "size" in query else None, data)
                    return self._send(200, b"", {"ETag": f'"{oid}"'})
                if method == "POST" and segs[1] == "verify":
                    return self._send_json(*server.lfs_verify(oid, self._json_body()))

            if (method == "POST" and n == 6 and segs[1].endswith(".git")
                    and segs[2:] == ["info", "lfs", "objects", "batch"]):
                repo_id = f"{segs[0]}/{segs[1][:-4]}"
                status, body, headers = server.api_lfs_batch(repo_id, self._json_body(), token)
                return self._send(status, json.dumps(body).encode(),
                                  {"Content-Type": "application/vnd.git-lfs+json", **headers})

            if method in ("GET", "HEAD") and n >= 5 and segs[2] == "resolve":
                repo_id, revision, path = f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:])
                entry, headers = server.resolve(repo_id, revision, path, token)
                return self._send_file(method, entry, headers)

            raise HubError(404, None, f"{method} {self.path}: not implemented by HubServer")

        def _send_file(self, method: str, entry: FileEntry, headers: dict):
            start, end, status = 0, entry.size - 1, 200
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
            if match and method == "GET" and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(int(match[2]), entry.size - 1) if match[2] else entry.size - 1
                else:                                      # suffix range: the last N bytes
                    start = max(0, entry.size - int(match[2]))
                if start >= entry.size:
                    return self._send(416, b"", {"Content-Range": f"bytes */{entry.size}", **headers})
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end}/{entry.size}"}
            length = max(0, end - start + 1)
            if method == "HEAD":
                return self._send(200, b"", headers, head_only=True, length=entry.size)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            with open(server.root / entry.storage, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)

    return Handler
