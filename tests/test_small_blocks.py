"""The merged model does not depend on how the stream cuts tensors into blocks: with blocks of 8 values every 1-D
tensor (norms, Qwen2's q/k/v biases) arrives in several blocks, each written at its own offset, and the safetensors
output (cast to bfloat16, so every tensor goes through the cast encoder) is still PEFT's merge_and_unload, tensor
for tensor."""

from __future__ import annotations

import functools

import torch

from conftest import build_peft_adapter, build_tiny_base, load_output, peft_merged_state, run_export


def test_tiny_blocks_write_every_1d_tensor_at_its_place(tmp_path, monkeypatch):
    """Blocks of 8 values: a 32-wide norm or q bias comes in 4 blocks of 8 rows, a 16-wide k/v bias in 2 (a 1-D
    tensor's rows are its values), and each block must land at 2 bytes (bfloat16) times its first row. Random biases and norms so that a block written
    at the wrong place shows; the oracle is PEFT's merged state dict, rounded to bfloat16."""
    from safetensors.torch import load_file, save_file

    import converters.tensor_stream as tensor_stream
    import exporter.merge_stream as merge_stream

    base = build_tiny_base(tmp_path / "base", "qwen2", random_biases=True)
    sd_path = base / "model.safetensors"
    state = load_file(sd_path)
    torch.manual_seed(5)
    for name, t in state.items():
        if name.endswith("norm.weight"):
            state[name] = 1 + 0.5 * torch.randn_like(t)
    save_file(state, sd_path, metadata={"format": "pt"})
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(merge_stream, "pump", functools.partial(tensor_stream.pump, block_values=8))
    run_export(base, adapter, tmp_path / "out", parity=False, dtype="bfloat16")
    ours = load_output(tmp_path / "out")
    peft = peft_merged_state(base, adapter)
    one_d = [name for name, t in ours.items() if t.dim() == 1]
    assert len(one_d) > 10 and all(ours[name].numel() > 8 for name in one_d)
    for name, t in ours.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t.float(), peft[name].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-6, msg=name)
