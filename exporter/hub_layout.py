"""Which Hub repositories a push makes from an output folder, and what each holds (exporter/stages/publish.py
pushes them, exporter/cards.py writes their cards).

Why one repository per kind, not one repository with subfolders: the Hub reads ``library_name`` and the model tree
(``base_model`` + ``base_model_relation``) per repository, and Ollama pulls ``hf.co/<org>/<repo>:Q4_K_M`` from a repo
that holds GGUF files named by type. From ``--push-to me/model``:

    me/model                 merged safetensors, config, tokenizer      transformers  merge      (of the base)
    me/model-bnb-nf4 (…)     bitsandbytes re-quantized folder           transformers  quantized  (of me/model)
    me/model-GGUF            model-F16.gguf, model-Q4_K_M.gguf, …       gguf          quantized  (of me/model)
    me/model-LoRA-GGUF       adapter.gguf, for llama.cpp --lora          gguf          adapter    (of the base)
    me/model-ONNX            onnx/, onnx-fp16/ (each self-contained)    onnx          quantized  (of me/model)

A repository derived from the merged weights names ``me/model`` as its base_model when this run pushes it too, else
the base itself with relation ``finetune`` (the weights are base + adapter, and no merged repo exists to point at).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import ExportError

PUBLISHED_NAME = "published.json"  # what was pushed where, written into the output after a push


class PublishError(ExportError):
    """Publishing to the Hub failed; the output stays in place and the same command resumes the upload."""


@dataclass
class RepoPlan:
    """One repository to push: its id, what it holds, and where its files come from in the output."""

    repo_id: str
    kind: str  # merged | bnb | gguf | gguf-lora | peft | onnx
    library_name: str
    relation: str  # base_model_relation
    files: dict[str, Path] = field(default_factory=dict)  # path in the repo -> file in the output
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # report.json's entries of what it holds
    base_model: str | None = None


def plan_repos(push_to: str, report: dict[str, Any], out: Path, base_id: str | None) -> list[RepoPlan]:
    """The repositories a push makes from the output folder, each with its files (README.md excluded: its card is
    written apart)."""
    by_kind: dict[str, RepoPlan] = {}

    def repo(kind: str, repo_id: str, library: str, relation: str) -> RepoPlan:
        return by_kind.setdefault(kind, RepoPlan(repo_id, kind, library, relation))

    for entry in report["artifacts"]:
        path = Path(entry["path"])
        if entry["format"] == "safetensors" and path == out:
            r = repo("merged", push_to, "transformers", "merge")
            for f in sorted(out.iterdir()):
                if f.is_file() and f.suffix != ".gguf" and f.name not in ("Modelfile", "README.md", PUBLISHED_NAME):
                    r.files[f.name] = f
        elif entry["format"] == "safetensors":  # a bitsandbytes variant, in its own folder
            r = repo(f"bnb-{path.name}", f"{push_to}-bnb-{path.name}", "transformers", "quantized")
            r.files.update({str(f.relative_to(path)): f for f in sorted(path.rglob("*")) if f.is_file()
                            and f.name != "README.md"})
        elif entry["format"] == "gguf":
            r = repo("gguf", f"{push_to}-GGUF", "gguf", "quantized")
            r.files[path.name] = path
            if (out / "Modelfile").is_file():
                r.files["Modelfile"] = out / "Modelfile"
        elif entry["format"] == "gguf-lora":
            r = repo("gguf-lora", f"{push_to}-LoRA-GGUF", "gguf", "adapter")
            r.files[path.name] = path
        elif entry["format"] == "peft":  # a combined adapter: PEFT's files at the repository's root, as the Hub reads
            r = repo("peft", f"{push_to}-LoRA", "peft", "adapter")
            r.files.update({str(f.relative_to(path)): f for f in sorted(path.rglob("*")) if f.is_file()})
        elif entry["format"] == "onnx":
            r = repo("onnx", f"{push_to}-ONNX", "onnx", "quantized")
            r.files.update({f"{path.name}/{f.relative_to(path)}": f for f in sorted(path.rglob("*")) if f.is_file()})
        else:
            raise PublishError(f"--push-to {push_to}", f"does not know where {entry['format']} files go on the Hub.",
                               "push that format yourself (huggingface-cli upload), or leave it out of --to.")
        r.artifacts.append(entry)
    merged = "merged" in by_kind
    for r in by_kind.values():
        if r.relation == "quantized" and not merged:
            r.base_model, r.relation = base_id, "finetune"
        elif r.relation == "quantized":
            r.base_model = push_to
        else:
            r.base_model = base_id
    return list(by_kind.values())


def base_model_id(report: dict[str, Any]) -> str | None:
    """What the cards name as base_model: the base's Hub id (for a bitsandbytes-quantized base, the model its own
    card says it was quantized from); None for a local base whose origin is unknown."""
    inputs = report["inputs"]
    card = inputs.get("base_card") or {}
    quantized = bool(report.get("dequantize"))
    if quantized and card.get("base_model"):
        named = card["base_model"]
        return named[0] if isinstance(named, list) else str(named)
    if inputs.get("base_hub"):
        return inputs["base_hub"]["repo_id"]
    return card.get("base_model") if isinstance(card.get("base_model"), str) else None
