"""A local Hugging Face Hub for tests: olah (a Hub mirror server, in its own venv .venv-olah, built by
scripts/olah_venv.sh) serving git repositories made from local folders, on 127.0.0.1, offline (it never contacts
huggingface.co: offline mode, and its upstream pointed at a closed local port besides).

    with OlahMirror(tmp_path / "hub") as hub:
        sha = hub.add_repo("org/name", folder)                 # a commit on main holding exactly folder's files
        snapshot_download("org/name", endpoint=hub.endpoint, ...)

olah serves a "mirror" repository straight from ``<mirrors-path>/models/<org>/<name>`` (a git repository, read with
GitPython): /api/models/<repo>/revision/<rev> (repo info, siblings), /api/models/<repo>/tree/<rev>, and HEAD/GET
/<repo>/resolve/<rev>/<file>. Files are committed as plain git blobs by default (etag: the blob's git sha1, as the
Hub gives for non-LFS files); ``lfs=[patterns]`` stores matching files as git-lfs pointers with the object under
.git/lfs/objects, which olah serves with a sha256 etag (as the Hub does for LFS files).

Where olah 0.5.4 (offline, mirrors only) answers otherwise than huggingface.co (tests/test_olah_mirror.py pins these):
- a branch/tag it cannot resolve: 401 RepoNotFound (Hub: 404 RevisionNotFound), so RepositoryNotFoundError;
- an unknown full commit sha: the tree listing answers 404 EntryNotFound, so snapshot_download raises
  LocalEntryNotFoundError; /api/models/<repo>/revision/<unknown sha> itself answers 500;
- a missing file at /resolve/: 401 RepoNotFound (Hub: 404 EntryNotFound);
- /api/models/<repo> with no revision (HfApi.model_info without revision=): 401 RepoNotFound, even for a mirror;
- no gated or private repositories, no uploads (it is a read-only mirror), Range requests answered 200 in full,
  list_repo_commits fails in the client (olah's commit entries lack "user").
"""

from __future__ import annotations

import atexit
import fnmatch
import hashlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLAH_VENV = ROOT / ".venv-olah"
OLAH_CLI = OLAH_VENV / "bin" / "olah-cli"
OLAH_SETUP = ROOT / "scripts" / "olah_venv.sh"

# Committer fixed, dates counted up from a fixed one, git config files ignored: the same folders added in the same
# order give the same commits on every machine.
_GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "olah-mirror",
            "GIT_AUTHOR_EMAIL": "olah-mirror@localhost", "GIT_COMMITTER_NAME": "olah-mirror",
            "GIT_COMMITTER_EMAIL": "olah-mirror@localhost"}


def ensure_olah_venv() -> Path:
    """Build .venv-olah unless it is complete (scripts/olah_venv.sh: about 15 s the first time, a few milliseconds
    and silent once its stamp is there); olah-cli's path."""
    result = subprocess.run(["bash", str(OLAH_SETUP)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/olah_venv.sh failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return OLAH_CLI


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


class OlahMirror:
    """olah on a free 127.0.0.1 port serving the repositories added under ``root`` (mirrors/, its cache, logs)."""

    def __init__(self, root: Path, startup_timeout: float = 60.0):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._commit_count = 0

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("OlahMirror is not started (use it as a context manager, or call start())")
        return f"http://127.0.0.1:{self.port}"

    # -- repositories ----------------------------------------------------------------------------------------------

    def repo_path(self, repo_id: str, repo_type: str = "models") -> Path:
        org, name = repo_id.split("/")
        return self.mirrors / repo_type / org / name

    def _git(self, git_dir: Path, *args: str, work_tree: Path | None = None, env: dict | None = None,
             stdin: bytes | None = None) -> str:
        cmd = ["git", f"--git-dir={git_dir}"] + ([f"--work-tree={work_tree}"] if work_tree else [])
        cmd += ["-c", "core.autocrlf=false", "-c", "core.safecrlf=false", *args]
        result = subprocess.run(cmd, env={**os.environ, **_GIT_ENV, **(env or {})}, input=stdin,
                                capture_output=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr.decode(errors='replace')}")
        return result.stdout.decode().strip()

    def add_repo(self, repo_id: str, folder: Path, branch: str = "main", message: str | None = None,
                 lfs: list[str] | tuple[str, ...] = (), repo_type: str = "models") -> str:
        """Commit exactly ``folder``'s files (recursively) to ``branch`` of ``repo_id`` (created when new; a new
        branch starts from the current HEAD) and return the commit's 40-hex sha. Files whose path matches a pattern
        in ``lfs`` are committed as git-lfs pointers. Works while the server runs (olah reads git on each request)."""
        folder = Path(folder)
        path = self.repo_path(repo_id, repo_type)
        git_dir = path / ".git"
        if not git_dir.exists():
            path.mkdir(parents=True)
            subprocess.run(["git", "init", "-q", "-b", "main", str(path)], env={**os.environ, **_GIT_ENV},
                           check=True, capture_output=True)
        # A private index per commit: the tree is exactly the folder's files, whatever the previous commit held.
        index = path / ".git" / "olah-mirror-index"
        index.unlink(missing_ok=True)
        env = {"GIT_INDEX_FILE": str(index)}
        entries = []
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = file.relative_to(folder).as_posix()
            data = file.read_bytes()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in lfs):
                oid = hashlib.sha256(data).hexdigest()
                obj = git_dir / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
                obj.parent.mkdir(parents=True, exist_ok=True)
                obj.write_bytes(data)
                data = _lfs_pointer(data)
            blob = self._git(git_dir, "hash-object", "-w", "--stdin", stdin=data)
            mode = "100755" if os.access(file, os.X_OK) else "100644"
            entries.append(f"{mode} {blob}\t{rel}\n")
        if entries:
            self._git(git_dir, "update-index", "--add", "--index-info", env=env, stdin="".join(entries).encode())
            tree = self._git(git_dir, "write-tree", env=env)
        else:
            tree = self._git(git_dir, "hash-object", "-t", "tree", "-w", "--stdin", stdin=b"")
        index.unlink(missing_ok=True)
        ref = f"refs/heads/{branch}"
        try:
            parent = self._git(git_dir, "rev-parse", "--verify", "-q", ref + "^{commit}")
        except RuntimeError:
            try:
                parent = self._git(git_dir, "rev-parse", "--verify", "-q", "HEAD^{commit}")
            except RuntimeError:
                parent = ""
        # Distinct, increasing commit dates: olah reports lastModified from them.
        self._commit_count += 1
        date = f"{1_700_000_000 + self._commit_count} +0000"
        sha = self._git(git_dir, "commit-tree", tree, *(["-p", parent] if parent else []),
                        "-m", message or f"add {folder.name}",
                        env={"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
        self._git(git_dir, "update-ref", ref, sha)
        return sha

    def add_ref(self, repo_id: str, name: str, revision: str, repo_type: str = "models") -> None:
        """A branch (``name``) or tag (``refs/tags/<name>``) at ``revision``."""
        ref = name if name.startswith("refs/") else f"refs/heads/{name}"
        git_dir = self.repo_path(repo_id, repo_type) / ".git"
        self._git(git_dir, "update-ref", ref, self._git(git_dir, "rev-parse", "--verify", revision + "^{commit}"))

    # -- the server ------------------------------------------------------------------------------------------------

    def _write_config(self, port: int) -> Path:
        config = self.root / "olah.toml"
        # hf-netloc: a closed local port (9, discard), so nothing can reach huggingface.co even where olah would try.
        config.write_text(f"""[basic]
host = "127.0.0.1"
port = {port}
repos-path = "{self.root / 'cache'}"
mirrors-path = ["{self.mirrors}"]
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
mirror-scheme = "http"
mirror-netloc = "127.0.0.1:{port}"
mirror-lfs-netloc = "127.0.0.1:{port}"

[accessibility]
offline = true
""")
        return config

    def start(self) -> "OlahMirror":
        cli = ensure_olah_venv()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="*", no_proxy="*")
        for attempt in range(3):  # another process may take the free port between the probe and olah's bind
            port = _free_port()
            config = self._write_config(port)
            self.log = open(self.root / "olah-stdout.log", "wb")
            self.process = subprocess.Popen([str(cli), "-c", str(config), "--log-path", str(self.root / "logs")],
                                            cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            self.port = port
            atexit.register(self.stop)  # no olah left running should the test process end without the teardown
            if self._wait_until_up():
                return self
            self.stop()
        raise RuntimeError(f"olah did not start; its output:\n{(self.root / 'olah-stdout.log').read_text()[-4000:]}")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            # Any HTTP answer means it is up (olah's "/" page fails with its pinned starlette; a repo that does not
            # exist answers 401 RepoNotFound).
            try:
                with _NO_PROXY.open(self.endpoint + "/api/models/olah-mirror/probe/revision/main", timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.log.close()
            atexit.unregister(self.stop)
        self.process = None
        self.port = None

    def __enter__(self) -> "OlahMirror":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
