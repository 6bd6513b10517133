"""bitsandbytes checkpoints (transformers' pre-quantized folders): read, dequantize exactly, re-quantize.

The format, as transformers' ``save_pretrained`` writes it after quantizing on load with ``BitsAndBytesConfig``:

- config.json carries ``quantization_config`` with ``quant_method: "bitsandbytes"`` (see `quantization_config`).
- A 4-bit Linear ``<m>`` (NF4 or FP4) is stored as ``<m>.weight``: the 4-bit codes packed two a byte, high nibble
  first, shape (ceil(numel/2), 1) — viewed as ``bnb_4bit_quant_storage`` (uint8 unless set, then fewer, wider
  elements); ``<m>.weight.absmax``: one float32 scale per block of 64 values of the flattened weight;
  ``<m>.weight.quant_map``: the 16-value code table; with double quant, absmax is itself uint8 codes and
  ``<m>.weight.nested_absmax`` (float32, one per 256 blocks) and ``<m>.weight.nested_quant_map`` (256 float32) are
  added; ``<m>.weight.quant_state.bitsandbytes__nf4|fp4`` is a uint8 tensor of JSON: quant_type, blocksize, dtype
  (the weight's dtype when quantized), shape (the logical weight shape), and with double quant nested_blocksize,
  nested_dtype, nested_offset.
- An int8 Linear: ``<m>.weight`` int8 (out, in), ``<m>.SCB`` float32 row absmax, ``<m>.weight_format`` uint8 0.
- Everything transformers did not quantize (embeddings, norms, biases, lm_head and other skipped Linears) is a plain
  tensor in the model's dtype.

`group_tensors` turns a checkpoint's key list into logical tensors, `dequantize` gives each one's float values
(pure torch, bit for bit bitsandbytes' kernels), and `quantize_4bit` / `quantize_int8` produce the tensors
transformers would write (these need bitsandbytes, imported only when called).
"""

from converters.bnb.dequantize import dequantize, dequantize_4bit, dequantize_int8, validate
from converters.bnb.format import (BnbConfig, BnbFormatError, LogicalTensor, QuantState4bit, group_tensors,
                                   logical_shape_dtype, parse_quant_state, parse_quantization_config)
from converters.bnb.quantize import (modules_not_quantized, quantization_config, quantize_4bit, quantize_int8,
                                     skip_patterns)

__all__ = [
    "BnbConfig", "BnbFormatError", "LogicalTensor", "QuantState4bit", "dequantize", "dequantize_4bit",
    "dequantize_int8", "group_tensors", "logical_shape_dtype", "modules_not_quantized", "parse_quant_state",
    "parse_quantization_config", "quantization_config", "quantize_4bit", "quantize_int8", "skip_patterns", "validate",
]
