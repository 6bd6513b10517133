"""Regenerate golden/: reference figures for the built-in demo fixture, computed by PEFT (the independent oracle).

    .venv/bin/python scripts/regen_golden.py

Writes
  golden/demo_fixture.json        sha256 of the fixture's weights (tests check the fixture is still the same model),
                                  and per-tensor float64 sums/norms of PEFT's fp32 merge_and_unload
  golden/demo_peft_logits.safetensors   PEFT's *unmerged* fp32 logits on fixed probe ids
Only this script writes golden/; tests read it and never regenerate it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
PROBE_SEED, PROBE_SHAPE = 1234, (3, 16)


def probe_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from exporter.demo import build_demo

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build_demo(Path(tmp))
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        ids = probe_ids(model.config.vocab_size)
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits
        merged = peft_model.merge_and_unload()
        figures = {name: {"sum": float(t.double().sum()), "norm": float(t.double().norm())}
                   for name, t in merged.state_dict().items() if "layers" in name}
        GOLDEN.mkdir(exist_ok=True)
        save_file({"input_ids": ids, "logits": logits.contiguous()}, GOLDEN / "demo_peft_logits.safetensors")
        fixture = {
            "about": "Built by exporter.demo.build_demo; figures from PEFT (peft merge_and_unload / unmerged forward, "
                     "fp32). Regenerate with scripts/regen_golden.py.",
            "weights_sha256": {"base/model.safetensors": sha256(base / "model.safetensors"),
                               "adapter/adapter_model.safetensors": sha256(adapter / "adapter_model.safetensors")},
            "probe": {"seed": PROBE_SEED, "shape": list(PROBE_SHAPE)},
            "peft_merged_tensors": figures,
        }
        (GOLDEN / "demo_fixture.json").write_text(json.dumps(fixture, indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
