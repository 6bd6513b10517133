"""publish: the finished output, pushed to the Hugging Face Hub (--push-to org/name), one repository per kind of file.

It runs after the output is in place (``after_commit``): every other stage has passed, parity included, so nothing is
uploaded from a run that failed or was interrupted. It reads only the output folder and its report.json, so running
the same command again after an upload died midway publishes the same folder again without rebuilding it (the
runner sees report.json's request is this one): files already on the Hub are skipped by huggingface_hub (Xet
deduplicates what was sent, the LFS protocol skips objects the Hub already has).

Where each kind of file goes, and why: exporter/hub_layout.py. Each repository gets a card (exporter/cards.py).
Every file must be under the Hub's 50 GB per-file limit: checked before the merge for the single-file formats
(exporter/stages/load.py), and here again before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from exporter.cards import hub_card
from exporter.context import Context
from exporter.errors import StageCheckError
from exporter.hub import HUB_FILE_LIMIT, sha256_file
from exporter.hub_layout import PUBLISHED_NAME, PublishError, RepoPlan, base_model_id, plan_repos

log = logging.getLogger("lora_export")


class PublishStage:
    name = "publish"
    after_commit = True  # the runner runs it on the output in place, after every other stage has passed

    def run(self, ctx: Context) -> None:
        plan, report, out = ctx.plan, ctx.report, ctx.plan.out
        assert plan.push_to is not None
        failed = [a["format"] for a in report["artifacts"] if a.get("parity") and not a["parity"]["passed"]]
        if failed:
            raise PublishError(f"--push-to {plan.push_to}", f"parity failed for {', '.join(failed)}; the output was "
                               f"kept (--accept-parity-failure) at {out} but is not published.",
                               "fix the failure, or upload the folder yourself if you are sure.")
        repos = plan_repos(plan.push_to, report, out, base_model_id(report))
        too_big = [f"{r.repo_id}/{name} ({src.stat().st_size / 1e9:.1f} GB)" for r in repos
                   for name, src in r.files.items() if src.stat().st_size >= HUB_FILE_LIMIT]
        if too_big:
            raise PublishError(f"--push-to {plan.push_to}", f"the Hub takes files under 50 GB: {', '.join(too_big)}.",
                               "use a smaller --max-shard-size for safetensors, a smaller GGUF type, or push "
                               "without that format.")
        from huggingface_hub import HfApi

        api = HfApi()
        workspace = out.with_name(f".{out.name}.publish")
        published: list[dict[str, Any]] = []
        for repo in repos:
            folder = workspace / repo.repo_id.replace("/", "--")
            _assemble(folder, repo.files)
            digests = {name: sha256_file(source) for name, source in repo.files.items()}
            (folder / "README.md").write_text(hub_card(report, repo, repos, digests))
            published.append(self._push(api, repo, folder, plan))
        shutil.rmtree(workspace, ignore_errors=True)
        (out / PUBLISHED_NAME).write_text(json.dumps(published, indent=2) + "\n")
        ctx.published = published

    @staticmethod
    def _push(api: Any, repo: RepoPlan, folder: Path, plan: Any) -> dict[str, Any]:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            url = api.create_repo(repo.repo_id, private=plan.private, exist_ok=True, repo_type="model")
            if plan.push_revision:
                api.create_branch(repo.repo_id, branch=plan.push_revision, exist_ok=True)
            log.info("publishing %d files to %s …", len(repo.files) + 1, repo.repo_id)
            commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, revision=plan.push_revision,
                                       create_pr=plan.create_pr or None, ignore_patterns=[".cache/**"],
                                       commit_message=f"lora-export: {repo.kind} ({', '.join(_variants(repo))})")
        except HfHubHTTPError as e:
            code = getattr(getattr(e, "response", None), "status_code", None)
            why = {401: "the token is missing or invalid", 403: "this token cannot write to it"}.get(code, str(e))
            raise PublishError(repo.repo_id, f"the Hub refused the push: {why}; the output is in place at {plan.out}.",
                               "set HF_TOKEN to a token with write access, then run the same command again (it "
                               "resumes the upload without rebuilding).") from e
        except Exception as e:  # connection errors (httpx's are not OSErrors), a timeout, a refused request
            raise PublishError(repo.repo_id, f"the upload stopped ({type(e).__name__}: {e}); the output is in "
                               f"place at {plan.out}.", "run the same command again: it resumes the upload "
                               "without rebuilding.") from e
        return {"repo_id": repo.repo_id, "kind": repo.kind, "url": str(url),
                "commit": getattr(commit, "oid", None), "pr_url": getattr(commit, "pr_url", None),
                "files": sorted([*repo.files, "README.md"])}

    def check(self, ctx: Context) -> None:
        """Every file of every repository is on the Hub at the commit the push made."""
        from huggingface_hub import HfApi

        api = HfApi()
        for pushed in ctx.published:
            revision = pushed["commit"] or ctx.plan.push_revision
            remote = set(api.list_repo_files(pushed["repo_id"], revision=revision))
            missing = sorted(set(pushed["files"]) - remote)
            if missing:
                raise StageCheckError(pushed["repo_id"], f"lacks {missing[:5]} after the push.",
                                      "run the same command again to resume the upload.")


def _variants(repo: RepoPlan) -> list[str]:
    return [str(a.get("variant")) for a in repo.artifacts]


def _assemble(folder: Path, files: dict[str, Path]) -> None:
    """The repository's files under one folder, as hard links (no copy of multi-GB weights; a copy where the file
    system has none). A folder left by an interrupted push is reused: huggingface_hub's resume state lives in it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            if target.stat().st_ino == source.stat().st_ino:
                continue
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
