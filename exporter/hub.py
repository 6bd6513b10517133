"""Inputs named by Hugging Face Hub id: ``org/name`` or ``org/name@revision`` (a branch, tag or commit), downloaded
through huggingface_hub — its cache, resumed downloads, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE all honoured — and
only what a run reads.

A base is fetched in two steps: first its small files (config, shard index, tokenizer, chat template, card), then
exactly the weight files the shard index lists (or model.safetensors without one), pinned to the commit the first
step resolved. Repositories often hold more than one copy of the weights (Mistral's consolidated.safetensors beside
the shards, Llama's original/*.pth, *.bin from older uploads, GGUF or ONNX exports in subfolders): none of those is
downloaded; nor is any pickle, except an adapter's adapter_model.bin under --allow-pickle.

Whatever goes wrong is one InputError (exit 2): a gated or missing repository, a revision that does not exist, no
network, offline mode without the files in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import InputError

log = logging.getLogger("lora_export")

# org/name, each part as the Hub allows it (letters, digits, '-', '_', '.'; no leading '.' or '-').
REPO_ID = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
_REPO_AND_REVISION = re.compile(rf"^(?P<repo>{REPO_ID})(?:@(?P<revision>[^\s@]+))?$")

# The small files of a model or adapter repository that a run may read (the card: for its license and base_model).
_SMALL_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json", "README.md",
                "adapter_config.json"]
HUB_FILE_LIMIT = 50 * 10**9  # bytes: the Hub refuses larger files


@dataclass(frozen=True)
class HubRef:
    """A Hub repository and, optionally, the revision asked for."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Downloaded:
    """A repository snapshot on local disk, and which commit it is."""

    path: Path
    ref: HubRef
    commit: str  # the 40-hex sha the revision resolved to

    def as_report(self) -> dict[str, str | None]:
        return {"repo_id": self.ref.repo_id, "revision": self.ref.revision, "commit": self.commit}


def parse_hub_ref(spec: str) -> HubRef | None:
    """``org/name[@revision]`` when ``spec`` names no existing local path; None for a local path (or anything that
    cannot be a repo id, which the caller then reports as a missing folder)."""
    if Path(spec).expanduser().exists() or spec.startswith((".", "/", "~")):
        return None
    match = _REPO_AND_REVISION.match(spec)
    if match is None:
        return None
    return HubRef(match["repo"], match["revision"])


def download_base(ref: HubRef, progress: bool = True) -> Downloaded:
    """config.json, tokenizer, card and exactly the safetensors weights the model's index lists."""
    small = _snapshot(ref, _SMALL_FILES, "base model", progress)
    pinned = HubRef(ref.repo_id, small.commit)
    index = small.path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(f"{ref}: model.safetensors.index.json", f"is not a shard index ({e}).",
                             "fix the repository's index, or download it and pass the folder.") from e
    else:
        shards = ["model.safetensors"]
    weights = _snapshot(pinned, shards, "base model", progress)
    missing = [name for name in shards if not (weights.path / name).is_file()]
    if missing:
        # snapshot_download silently skips patterns that match nothing: say which weights the repository lacks.
        raise InputError(str(ref), f"has no {', '.join(missing[:3])} at commit {small.commit[:12]}"
                         + (" (its index lists them)" if index.is_file() else "") + ": lora-export reads safetensors "
                         "weights only.", "choose a revision with safetensors weights, or convert the checkpoint "
                         "(transformers: save_pretrained(safe_serialization=True)) and pass the folder.")
    return Downloaded(weights.path, ref, small.commit)


def download_adapter(ref: HubRef, allow_pickle: bool, progress: bool = True) -> Downloaded:
    """adapter_config.json, adapter_model.safetensors (and .bin only under --allow-pickle), tokenizer files."""
    patterns = [*_SMALL_FILES, "adapter_model.safetensors"] + (["adapter_model.bin"] if allow_pickle else [])
    return _snapshot(ref, patterns, "adapter", progress)


def _snapshot(ref: HubRef, patterns: list[str], what: str, progress: bool) -> Downloaded:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    # huggingface_hub reads HF_HUB_CACHE once at import; read it at call time so the setting in force wins.
    cache_dir = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not progress:
        disable_progress_bars()
    try:
        log.info("%s %s: fetching %s", what, ref, ", ".join(patterns) if len(patterns) < 6 else "its files")
        path = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                      cache_dir=cache_dir, local_files_only=offline))
    except GatedRepoError as e:
        raise InputError(str(ref), "is a gated repository and this token has no access to it.",
                         "accept its terms on its Hub page, then set HF_TOKEN (or `hf auth login`).") from e
    except RevisionNotFoundError as e:
        raise InputError(str(ref), f"has no revision '{ref.revision}'.",
                         "give a branch, tag or commit of that repository after '@', or none for main.") from e
    except RepositoryNotFoundError as e:
        raise InputError(str(ref), f"is not a local folder, and the Hub has no {what} repository by that id that "
                         "this token can see.", "check the id, or set HF_TOKEN for a private repository.") from e
    except LocalEntryNotFoundError as e:
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached"
        raise InputError(str(ref), f"is not in the local Hugging Face cache and {why}.",
                         "download it once with network access (the cache keeps it), or pass a local folder.") from e
    except HfHubHTTPError as e:
        raise InputError(str(ref), f"the Hub answered {_status(e)} while downloading it.",
                         "try again later; check HF_TOKEN and HF_ENDPOINT.") from e
    except (OSError, ValueError) as e:  # connection errors (httpx raises OSError subclasses), a bad repo id
        raise InputError(str(ref), f"could not be downloaded ({type(e).__name__}: {e}).",
                         "check the network and HF_ENDPOINT, or pass a local folder.") from e
    finally:
        if not progress:
            enable_progress_bars()
    # snapshot_download returns <cache>/models--org--name/snapshots/<commit>
    return Downloaded(path, ref, path.name)


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else type(error).__name__


def card_metadata(folder: Path) -> dict:
    """The YAML header of a folder's README.md (a model card), {} when there is none or it does not parse."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception as e:  # a card is informative: a broken one costs its metadata, not the run
        log.warning("%s: cannot read its card metadata (%s); the published card will not repeat it", readme, e)
        return {}


def fetch_base(spec: str, progress: bool = True) -> tuple[Path, Downloaded | None]:
    """The base's folder: ``spec`` itself, or its Hub snapshot (and what was downloaded)."""
    from exporter.base import local_folder

    ref = parse_hub_ref(spec)
    if ref is None:
        return local_folder(spec, "base model", "config.json and *.safetensors"), None
    downloaded = download_base(ref, progress)
    return downloaded.path, downloaded


def fetch_adapter(spec: str, allow_pickle: bool, progress: bool = True) -> tuple[Path, Downloaded | None]:
    """The adapter's folder: ``spec`` itself, or its Hub snapshot (and what was downloaded)."""
    from exporter.base import local_folder

    ref = parse_hub_ref(spec)
    if ref is None:
        return local_folder(spec, "adapter", "adapter_config.json"), None
    downloaded = download_adapter(ref, allow_pickle, progress)
    return downloaded.path, downloaded


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
