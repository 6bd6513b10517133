"""Model cards for the repositories a push makes (exporter/stages/publish.py): YAML metadata the Hub reads (model tree,
library, license) written through huggingface_hub's ModelCardData, and a body that says what the files are, how they
were checked and how to run them.

The license is the base card's, never invented: a base without one gives a card without one (the Hub then shows
none, which is true). Everything here comes from report.json and the files themselves.
"""

from __future__ import annotations

from typing import Any

from exporter.hub_layout import RepoPlan
from exporter.parity.figures import format_table

_WHAT = {"merged": "The merged model (safetensors)", "gguf": "GGUF files of the merged model",
         "gguf-lora": "The LoRA adapter as a GGUF file, for llama.cpp's --lora",
         "onnx": "ONNX exports of the merged model", "peft": "The combined LoRA adapter, as a PEFT adapter"}


def hub_card(report: dict[str, Any], repo: RepoPlan, repos: list[RepoPlan], digests: dict[str, str]) -> str:
    """README.md of one pushed repository."""
    from huggingface_hub import ModelCard, ModelCardData

    inputs = report["inputs"]
    base_card = inputs.get("base_card") or {}
    license_fields = {k: base_card[k] for k in ("license", "license_name", "license_link") if base_card.get(k)}
    adapter_id = (inputs.get("adapter_hub") or {}).get("repo_id")
    tags = ["lora-export", "lora", {"gguf": "gguf", "gguf-lora": "gguf", "onnx": "onnx", "peft": "peft"}.get(
        repo.kind, "merged-lora")]
    if repo.kind.startswith("bnb-"):
        tags += ["bitsandbytes", "4-bit" if "4" in repo.kind else "8-bit"]
    data = ModelCardData(base_model=repo.base_model, base_model_relation=repo.relation if repo.base_model else None,
                         library_name=repo.library_name, pipeline_tag="text-generation", tags=tags,
                         **license_fields)
    lines = [f"# {repo.repo_id.split('/')[-1]}", "",
             f"{_WHAT.get(repo.kind, 'The merged model, re-quantized with bitsandbytes')}: "
             f"{_source(inputs, 'base')} with {_adapters(report)} "
             f"(W' = W + s·B@A, accumulated in float32), made and checked by lora-export "
             f"{report['lora_export_version']} on {report['created']}.", ""]
    siblings = [r for r in repos if r is not repo]
    if siblings:
        lines += ["Other forms of the same model: " + ", ".join(f"[{r.repo_id}](../{r.repo_id.split('/')[-1]})"
                                                               for r in siblings) + ".", ""]
    lines += ["## Inputs", "", "| | repository or path | commit |", "|---|---|---|"]
    for role in ("base", "adapter"):
        hub = inputs.get(f"{role}_hub")
        where, commit = (hub["repo_id"], f"`{hub['commit']}`") if hub else (inputs[role], "(a local folder)")
        lines.append(f"| {role} | `{where}` | {commit} |")
    if adapter_id is None:
        lines += ["", "The adapter was a local folder: its sha256 is under Provenance."]
    rows = [a["parity"] for a in repo.artifacts if a.get("parity")]
    lines += ["", "## Parity: each file run in its runtime, against the unmerged model", ""]
    if rows:
        lines += [f"Reference: {report.get('parity_reference') or 'base + adapter applied on the fly, float32'}. "
                  "KL(ref‖out) is the mean over probe positions; top-1 is agreement on the next token, raw and on "
                  "positions where the reference is decisive.", "", "```", format_table(rows), "```", "",
                  "| artifact | runtime | share of the adapter's effect kept |", "|---|---|---|"]
        for p in rows:
            kept = p.get("adapter_effect_kept")
            lines.append(f"| {p['format']}:{p['dtype']} | {p['runtime']} | "
                         f"{'n/a' if kept is None else f'{kept:.1%}'} |")
    else:
        lines.append("Parity was not run for these files (--parity off): they were not checked against the "
                     "unmerged model.")
    lines += ["", "## How to run", ""] + _how_to_run(repo)
    lines += ["", "## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    for name in sorted(repo.files):
        lines.append(f"| {name} | {repo.files[name].stat().st_size} | `{digests[name]}` |")
    lines += ["", "## Provenance", "", "| input file | sha256 |", "|---|---|"]
    for name, digest in {**inputs.get("adapter_sha256", {}), **inputs.get("base_sha256", {})}.items():
        lines.append(f"| {name} | `{digest}` |")
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n"))


def _adapters(report: dict[str, Any]) -> str:
    """The adapter part of the card's first sentence: one adapter, several combined (method, weights), or several
    kept apart (one file each)."""
    request, combination = report.get("request") or {}, report.get("combination")
    names = [request.get("adapter"), *(request.get("more_adapters") or [])]
    if len(names) < 2 or None in names:
        return f"the LoRA adapter {_source(report['inputs'], 'adapter')} merged in"
    listed = ", ".join(f"`{n}`" for n in names)
    if combination is None:
        return f"the LoRA adapters {listed}, each kept as its own file"
    weights = ", ".join(f"{w:g}" for w in combination["weights"])
    return (f"the LoRA adapters {listed} combined by {combination['method']} ({combination['space']} space, "
            f"weights {weights}) and merged in")


def _source(inputs: dict[str, Any], role: str) -> str:
    hub = inputs.get(f"{role}_hub")
    if hub:
        return f"[{hub['repo_id']}](https://huggingface.co/{hub['repo_id']})"
    return f"`{inputs[role]}` (a local folder)"


def _how_to_run(repo: RepoPlan) -> list[str]:
    rid = repo.repo_id
    if repo.kind == "gguf":
        types = [str(a["variant"]).upper() for a in repo.artifacts]
        first = types[0]
        return ["llama.cpp and Ollama take a type by the file's suffix:", "", "```sh",
                f"llama-cli -hf {rid}:{first}", f"ollama run hf.co/{rid}:{first}", "```", "",
                "Types here: " + ", ".join(types) + "."]
    if repo.kind == "gguf-lora":
        return ["Apply it to an F32/F16 GGUF of the base with llama.cpp:", "", "```sh",
                "llama-cli -m base-F16.gguf --lora adapter.gguf", "```"]
    if repo.kind == "peft":
        return ["Load it on the base with PEFT:", "", "```python", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM", "",
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{repo.base_model}"), '
                f'"{rid}")', "```"]
    if repo.kind == "onnx":
        folders = sorted({name.split("/")[0] for name in repo.files})
        return ["Each folder is a complete model for onnxruntime-genai (genai_config.json, tokenizer, "
                "model.onnx + model.onnx.data):", "", "```python", "import onnxruntime_genai as og",
                "from huggingface_hub import snapshot_download", "",
                f'folder = snapshot_download("{rid}", allow_patterns=["{folders[0]}/*"])',
                f'model = og.Model(folder + "/{folders[0]}")', "```", "",
                "Folders here: " + ", ".join(folders) + "."]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{rid}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{rid}")', "```"]
