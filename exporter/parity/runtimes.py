"""Running artifacts on parity's probes: transformers models layer by layer or whole (exporter/parity/layerwise.py),
llama.cpp files one probe at a time; logits come back as (total positions, vocab) float32."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.context import Context
from exporter.parity.layerwise import CheckpointTensors, LoadedWeights, checkpoint_sources, count_weighted_modules, \
    probe_logits, skeleton
from exporter.progress import progress


def transformers_folder_logits(folder: Path, ctx: Context, probes: list[torch.Tensor], desc: str) -> torch.Tensor:
    """A Hugging Face folder's weights exactly as stored, computed in float32, whole or module by module as the run's
    parity mode says."""
    model = skeleton(folder)
    with progress(ctx, desc, count_weighted_modules(model)) as bar:
        LoadedWeights(model, checkpoint_sources(model, CheckpointTensors(folder)), ctx.parity_mode, ctx.device,
                      bar.update)
        return probe_logits(model, probes, ctx.device)


_LLAMA_LOG_CALLBACK: Any = None


def route_llama_cpp_logs() -> None:
    """llama.cpp's log lines go to our logger (debug; errors as warnings) instead of stderr: llama-cpp-python's own
    callback maps the current ggml levels (1 debug, 2 info, 3 warn, 4 error) one step too high and prints its
    warnings, e.g. "n_ctx_seq (512) > n_ctx_train", in the middle of a run's output even with verbose=False."""
    global _LLAMA_LOG_CALLBACK
    if _LLAMA_LOG_CALLBACK is not None:
        return
    import ctypes

    import llama_cpp

    llama_log = logging.getLogger("lora_export.llama_cpp")

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        llama_log.log(logging.WARNING if level == 4 else logging.DEBUG, "%s", text.decode("utf-8", "replace").rstrip())

    _LLAMA_LOG_CALLBACK = forward  # kept alive: llama.cpp holds a raw pointer to it
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def llama(model_path: Path, n_ctx: int, lora_path: Path | None = None) -> Any:
    from llama_cpp import Llama

    route_llama_cpp_logs()

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
