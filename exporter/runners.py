"""Running a model on parity's probes: transformers modules and llama.cpp files, one probe at a time (no padding to
get wrong), logits back as (total positions, vocab) float32."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def run_logits(model: torch.nn.Module, probes: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    rows = [model(input_ids=p.unsqueeze(0).to(device)).logits[0].to(torch.float32).cpu() for p in probes]
    return torch.cat(rows)


def llama(model_path: Path, n_ctx: int, lora_path: Path | None = None) -> Any:
    from llama_cpp import Llama

    # f32 KV cache and no flash attention: llama.cpp's defaults (f16 cache) add ~5e-3 of logit error on their own.
    return Llama(model_path=str(model_path), n_ctx=n_ctx, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                 n_gpu_layers=-1 if torch.cuda.is_available() else 0, n_threads=os.cpu_count() or 1,
                 lora_path=str(lora_path) if lora_path else None, verbose=False, swa_full=True)


def llama_cpp_logits(model_path: Path, probes: list[torch.Tensor], lora_path: Path | None = None) -> torch.Tensor:
    llm = llama(model_path, max(len(p) for p in probes) + 8, lora_path=lora_path)
    try:
        rows = []
        for probe in probes:
            llm.reset()
            llm.eval(probe.tolist())
            rows.append(torch.from_numpy(np.array(llm.scores[: len(probe)], dtype=np.float32)))
        return torch.cat(rows)
    finally:
        llm.close()
