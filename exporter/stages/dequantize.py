"""dequantize: present a bitsandbytes-quantized base (NF4 / FP4 / int8, as transformers saves it) as the float model
the adapter was trained against, and check every quantized weight before anything is merged.

The values are computed tensor by tensor when the merge pulls them (exporter/base.py, converters/bnb: pure torch,
bit for bit bitsandbytes' own dequantization, from the file, never through a forward pass), so memory stays at a few
tensors. Here every quantized weight's parts are checked against its quant state (shapes, dtypes, code tables) on
their headers, without reading the data, so a broken checkpoint is refused in seconds. A float base passes through.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from exporter.context import Context
from exporter.errors import InputError, MismatchError

log = logging.getLogger("lora_export")

# Parts read in full for the check: small (the code tables, the JSON quant state, int8's format flag).
_SMALL_PARTS = ("quant_map", "nested_quant_map", "quant_state", "weight_format")


class DequantizeStage:
    name = "dequantize"

    def run(self, ctx: Context) -> None:
        base = ctx.base
        if base.quantization is None:
            return
        from converters.bnb import BnbFormatError, validate

        kinds: Counter = Counter()
        for tensor in base.tensors.values():
            entry = tensor.quantized
            if entry is None:
                continue

            def header_only(key: str, small=frozenset(entry.keys[r] for r in _SMALL_PARTS if r in entry.keys)):
                if key in small:
                    return base.stored(key)
                info = base.stored_info(key)
                return torch.empty(info.shape, dtype=info.torch_dtype, device="meta")

            try:
                validate(entry, header_only)
            except BnbFormatError as e:
                raise InputError(str(base.file_of(entry.keys["weight"])), str(e),
                                 "restore the quantized checkpoint transformers saved, or merge into the "
                                 "unquantized base.") from e
            kinds[entry.kind] += 1
        if ctx.original_base is not None:
            self._check_original(ctx)
        q = base.quantization
        described = "int8 (LLM.int8)" if q.bits == 8 else f"{q.quant_type}{' + double quant' if q.double_quant else ''}"
        ctx.dequantized = {
            "method": "bitsandbytes", "type": described, "quantized_tensors": dict(kinds),
            "float_tensors": sum(1 for t in base.tensors.values() if t.quantized is None),
            "device": str(ctx.device),
        }
        log.info("base is bitsandbytes %s: %s quantized tensors dequantized on the fly (%s), %d float",
                 described, sum(kinds.values()), ", ".join(f"{n} {k}" for k, n in kinds.items()),
                 ctx.dequantized["float_tensors"])

    @staticmethod
    def _check_original(ctx: Context) -> None:
        """Re-quantize every quantized weight of --original-base as the base was quantized: each must give the stored
        codes exactly (a different model, or the same one trained further, does not). One pass over those weights,
        one per core."""
        from converters.bnb import parse_quant_state, quantize_4bit, quantize_int8
        from converters.ordered_pool import default_workers, ordered_map, single_threaded_torch
        from exporter.formats.bnb import require_bitsandbytes
        from exporter.progress import progress

        require_bitsandbytes("--original-base")
        base, original = ctx.base, ctx.original_base
        quantized = [t for t in base.tensors.values() if t.quantized is not None]

        def mismatch(tensor) -> str | None:
            entry, module = tensor.quantized, tensor.name.removesuffix(".weight")
            weight = original.tensor(tensor.name).to(torch.float32)
            if entry.kind == "4bit":
                state = parse_quant_state(base.stored(entry.keys["quant_state"]), entry.keys["quant_state"])
                ours = quantize_4bit(module, weight, model_dtype=state.dtype, quant_type=state.quant_type,
                                     double_quant=state.nested, quant_storage=base.quantization.quant_storage,
                                     blocksize=state.blocksize)
                compared = (entry.keys["weight"], entry.keys["absmax"])
            else:
                ours = quantize_int8(module, weight, model_dtype=original.info(tensor.name).torch_dtype,
                                     conv1d=False)  # the load stage refuses quantized Conv1D bases (exporter/layout.py)
                compared = (entry.keys["weight"], entry.keys["SCB"])
            original.release(tensor.name)
            for key in compared:
                if not torch.equal(ours[key].contiguous().reshape(-1).view(torch.uint8),
                                   base.stored(key).reshape(-1).view(torch.uint8)):
                    return f"re-quantizing its '{tensor.name}' does not give the stored {key}"
            return None

        problems = []
        with progress(ctx, "check original", len(quantized)) as bar, single_threaded_torch():
            for _, problem in ordered_map(mismatch, quantized, default_workers()):
                bar.update()
                if problem:
                    problems.append(problem)
        if problems:
            raise MismatchError(str(original.path), f"is not the model {base.path} was quantized from: "
                                + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3
                                                              else "") + ".",
                                "pass the full-precision model the quantized base was made from.")

    def check(self, ctx: Context) -> None:
        """Nothing is produced here: the values are computed as the merge reads them."""
