"""The merged output equals PEFT's merge_and_unload (computed in float32) bit for bit, variant by variant, and passes
parity. (The merge rounds as PEFT does: B@A, then ×s, then +W, each in float32.)

Each case builds a tiny fixed-seed base with transformers and a random adapter with PEFT, runs the whole pipeline
(parity on), and compares every tensor with PEFT's merge. Where PEFT's merge is known to be wrong (tied embeddings),
the oracle is PEFT after untying by hand, plus PEFT's *unmerged* logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import (build_peft_adapter, build_tiny_base, load_output, model_logits, peft_merged_state,
                      peft_unmerged_logits, run_export)

# Warnings are errors: a merge that warns (a resized out= buffer, a lossy cast) is a merge that is wrong somewhere.
# Ignored, each by its message, only what PEFT itself says while the fixtures build, save and load adapters (pytest
# applies this module-level list after any per-test mark, so the ignores live here):
#   * PeftModel.__init__ calls transformers' deprecated is_gradient_checkpointing: a FutureWarning from transformers;
#   * save_pretrained announces it saves the embedding with an embedding LoRA or a resized vocabulary (it must);
#   * get_peft_model warns that LoRA on a tied layer without ensure_weight_tying complicates a merge: the very case
#     (peft #2018) test_tied_embeddings_are_untied_not_altered builds on purpose;
#   * save_pretrained takes every 1-D lora_B tensor for an ungathered ZeRO-3 shard, lora_bias's lora_B.bias (a vector
#     by design) included: a false alarm of PEFT's own (test_lora_bias_equals_peft).
pytestmark = [pytest.mark.filterwarnings("error"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
              pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning"),
              pytest.mark.filterwarnings(r"ignore:Adapter 'default'.*LoRA tensor\(s\) have invalid shape")]

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_matches_peft(ours: dict[str, torch.Tensor], peft: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert set(ours) <= set(peft), f"tensors PEFT does not have: {sorted(set(ours) - set(peft))}"
    # PEFT's state_dict also lists a tied lm_head; we write it only when untied.
    missing = set(peft) - set(ours) - {"lm_head.weight"}
    assert not missing, f"tensors missing from our output: {sorted(missing)}"
    worst = max(((name, float((t.float() - peft[name].float()).abs().max())) for name, t in ours.items()),
                key=lambda x: x[1])
    assert worst[1] <= atol, f"{worst[0]} differs from PEFT by {worst[1]:.3g}"


def changed_tensors(base_dir, ours) -> set[str]:
    base = load_output(base_dir)
    return {n for n, t in ours.items() if n in base and not torch.equal(t.float(), base[n].float())}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_lora_equals_peft(tmp_path, arch):
    base = build_tiny_base(tmp_path / "base", arch)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=ATTN_MLP)
    ctx = run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert_matches_peft(ours, peft_merged_state(base, adapter))
    # Every one of the 14 adapted weights changed, nothing else did.
    assert changed_tensors(base, ours) == {f"model.layers.{i}.{p}.{m}.weight" for i in range(2)
                                           for p, ms in (("self_attn", ATTN_MLP[:4]), ("mlp", ATTN_MLP[4:]))
                                           for m in ms}
    assert ctx.artifacts[0].parity.passed and ctx.artifacts[0].parity.figures.max_abs <= 1e-4


def test_rslora_scale_equals_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=16, lora_alpha=8, use_rslora=True,
                                 target_modules=["q_proj", "v_proj"])
    ctx = run_export(base, adapter, tmp_path / "out")
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))
    assert ctx.report["merge"]["per_tensor"][0]["scale"] == pytest.approx(8 / 16**0.5)  # α/√r, not α/r


def test_rank_and_alpha_patterns_equal_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(
        tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=ATTN_MLP,
        rank_pattern={"down_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 64, r"layers\.0\.mlp\.up_proj": 3})
    ctx = run_export(base, adapter, tmp_path / "out")
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))
    scales = {m["tensor"]: m["scale"] for m in ctx.report["merge"]["per_tensor"]}
    assert scales["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(16 / 2)
    assert scales["model.layers.0.mlp.down_proj.weight"] == pytest.approx(16 / 4)
    assert scales["model.layers.0.self_attn.v_proj.weight"] == pytest.approx(64 / 8)
    assert scales["model.layers.0.mlp.up_proj.weight"] == pytest.approx(3 / 8)
    assert scales["model.layers.1.mlp.up_proj.weight"] == pytest.approx(16 / 8)


def test_dora_equals_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, use_dora=True,
                                 target_modules=["q_proj", "o_proj", "down_proj"])
    run_export(base, adapter, tmp_path / "out")
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))


def test_gpt2_conv1d_fan_in_fan_out_equals_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base", "gpt2")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, fan_in_fan_out=True,
                                 target_modules=["c_attn", "c_proj", "c_fc"])
    run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert_matches_peft(ours, peft_merged_state(base, adapter))
    assert "transformer.h.0.attn.c_attn.weight" in changed_tensors(base, ours)


def test_gpt2_dora_conv1d_equals_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base", "gpt2")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=True,
                                 target_modules=["c_attn", "c_fc"])
    run_export(base, adapter, tmp_path / "out")
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))


def test_embedding_lora_equals_peft(tmp_path):
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8,
                                 target_modules=["embed_tokens", "q_proj"])
    run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert_matches_peft(ours, peft_merged_state(base, adapter))
    assert "model.embed_tokens.weight" in changed_tensors(base, ours)


def test_modules_to_save_with_resized_vocab(tmp_path, probe_ids):
    from transformers import AutoTokenizer

    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"], resize_vocab_to=136)
    # Training that adds tokens saves the extended tokenizer beside the adapter; it must win over the base's.
    from exporter.demo import build_tokenizer

    build_tokenizer(tmp_path / "base", vocab_size=128)
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    tok.add_tokens([f"<new{i}>" for i in range(4)])
    tok.save_pretrained(adapter)
    ctx = run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert ours["model.embed_tokens.weight"].shape[0] == 136 and ours["lm_head.weight"].shape[0] == 136
    # Measured on the base's rows and vocabulary, where the base has logits to compare: the exact merge keeps it all.
    assert ctx.artifacts[0].parity.adapter_effect_kept > 0.999
    assert_matches_peft(ours, peft_merged_state(base, adapter, resize_vocab_to=136))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 136
    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == len(tok)
    ids = torch.tensor([[1, 5, 130, 135, 9, 131]])  # includes added rows
    ref = peft_unmerged_logits(base, adapter, ids, resize_vocab_to=136)
    assert (model_logits(tmp_path / "out", ids) - ref).abs().max() <= 1e-4


def test_modules_to_save_as_peft_writes_it_and_the_trained_copy_beside_an_untrained_one(tmp_path):
    """PEFT 0.21 writes a modules_to_save layer under its plain name; an adapter may also carry the trained copy under
    ".modules_to_save." beside an untrained "<module>.weight" (older PEFT, after a resize): the trained copy wins,
    whichever comes first in the file."""
    from safetensors.torch import load_file

    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"],
                                 modules_to_save=["lm_head"])
    ctx = run_export(base, adapter, tmp_path / "plain", dtype="float32")
    ours = load_output(tmp_path / "plain")
    assert_matches_peft(ours, peft_merged_state(base, adapter))
    assert not torch.equal(ours["lm_head.weight"], load_output(base)["lm_head.weight"])  # the trained layer landed
    assert ctx.artifacts[0].parity.passed

    tensors = load_file(adapter / "adapter_model.safetensors")
    trained = tensors.pop("base_model.model.lm_head.weight")
    untrained = torch.full_like(trained, 0.5)
    for order, name in ((("base_model.model.lm_head.modules_to_save.weight", "base_model.model.lm_head.weight"),
                         "trained-first"),
                        (("base_model.model.lm_head.weight", "base_model.model.lm_head.modules_to_save.weight"),
                         "untrained-first")):
        both = tmp_path / name
        both.mkdir()
        (both / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
        values = {"base_model.model.lm_head.modules_to_save.weight": trained,
                  "base_model.model.lm_head.weight": untrained}
        torch.save({**tensors, **{key: values[key] for key in order}}, both / "adapter_model.bin")  # keeps the order
        ctx = run_export(base, both, tmp_path / f"out-{name}", dtype="float32", allow_pickle=True)
        assert torch.equal(load_output(tmp_path / f"out-{name}")["lm_head.weight"], trained), name
        assert ctx.artifacts[0].parity.passed, name  # the reference reads the trained copy too


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_tied_embeddings_are_untied_not_altered(tmp_path, probe_ids, target):
    """gemma3-shaped, tied: LoRA on one end must not leak into the other (peft #2018)."""
    base = build_tiny_base(tmp_path / "base", "gemma3")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=[target, "q_proj"])
    ctx = run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert any("tied embeddings" in n for n in ctx.notes)
    assert_matches_peft(ours, peft_merged_state(base, adapter, untie=True))
    base_embed = load_output(base)["model.embed_tokens.weight"]
    untouched = "model.embed_tokens.weight" if target == "lm_head" else "lm_head.weight"
    assert torch.equal(ours[untouched], base_embed)
    # And against PEFT's unmerged model, which is right even where its merge is not.
    ref = peft_unmerged_logits(base, adapter, probe_ids)
    assert (model_logits(tmp_path / "out", probe_ids) - ref).abs().max() <= 1e-4


def test_bf16_base_equals_peft_fp32_merge_cast_to_bf16(tmp_path):
    base = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=ATTN_MLP)
    ctx = run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    peft = peft_merged_state(base, adapter)  # base upcast to fp32, merged in fp32
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, peft[name].to(torch.bfloat16)), name  # the fp32 merge, rounded once
    parity = ctx.artifacts[0].parity
    # Measured KL 4.4e-5: bf16 rounding of the merged weights alone (the declared tolerance is 1e-3).
    assert parity.passed and parity.dtype == "bfloat16" and parity.figures.kl <= 2e-4


def test_bf16_accumulation_would_be_worse(tmp_path):
    """Why we accumulate in fp32: a bf16 merge misses the correctly rounded result on many elements; ours on ~none."""
    from safetensors.torch import load_file

    base = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=["q_proj"])
    run_export(base, adapter, tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.weight"
    exact = peft_merged_state(base, adapter)[name].to(torch.bfloat16)  # fp32 merge, rounded once
    a = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{name[:-len('.weight')]}"
    bf16_merge = load_output(base)[name] + (a[f"{key}.lora_B.weight"].bfloat16() @ a[f"{key}.lora_A.weight"].bfloat16()) * 2.0
    ours_wrong = (load_output(tmp_path / "out")[name] != exact).float().mean().item()
    bf16_wrong = (bf16_merge != exact).float().mean().item()
    assert ours_wrong == 0 and bf16_wrong >= 0.05, (ours_wrong, bf16_wrong)


def test_merge_never_writes_into_its_inputs():
    """fp32 inputs are memory-mapped views in the pipeline: merging must not modify them (a bug parity caught)."""
    from exporter.merge_math import merge_lora

    w, a, b = torch.randn(70, 16), torch.randn(4, 16), torch.randn(70, 4)
    before = w.clone()
    merge_lora(w, a, b, 2.0, name="w")
    merge_lora(w, a, b, 2.0, name="w", magnitude=torch.rand(70))
    assert torch.equal(w, before)


def test_lora_bias_equals_peft(tmp_path):
    """lora_bias=True trains a bias on B; PEFT merges s·b_B into the base bias (qwen2's q/k/v have biases)."""
    base = build_tiny_base(tmp_path / "base", "qwen2")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, lora_bias=True,
                                 target_modules=["q_proj", "k_proj"])
    run_export(base, adapter, tmp_path / "out")
    ours = load_output(tmp_path / "out")
    assert_matches_peft(ours, peft_merged_state(base, adapter))
    assert "model.layers.0.self_attn.k_proj.bias" in changed_tensors(base, ours)


def test_merge_that_overflows_the_output_dtype_is_an_error():
    """fp16 holds at most 65504: a merged value beyond it would silently become Inf in the file."""
    from exporter.errors import NonFiniteError
    from exporter.merge_math import merge_lora

    w, a, b = torch.zeros(64, 32), torch.full((2, 32), 300.0), torch.full((64, 2), 300.0)
    with pytest.raises(NonFiniteError, match="layer.w"):
        merge_lora(w, a, b, 1.0, name="layer.w", out_dtype=torch.float16)
    assert torch.isfinite(merge_lora(w, a, b, 1.0, name="layer.w", out_dtype=torch.bfloat16).weight).all()


def test_reported_relative_change_is_the_norm_ratio(tmp_path):
    """report.json's ‖ΔW‖/‖W‖ per tensor, against the same ratio computed from PEFT's merge (plain and DoRA)."""
    base = build_tiny_base(tmp_path / "base")
    original = load_output(base)
    for kind, kwargs in (("plain", {}), ("dora", {"use_dora": True})):
        adapter = build_peft_adapter(tmp_path / kind, base, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                     **kwargs)
        ctx = run_export(base, adapter, tmp_path / f"out-{kind}", dtype="float32", parity=False)
        peft = peft_merged_state(base, adapter)
        reported = {m["tensor"]: m["relative_change"] for m in ctx.report["merge"]["per_tensor"]}
        assert len(reported) == 4
        for name, ratio in reported.items():
            expected = float((peft[name] - original[name]).norm() / original[name].norm())
            assert ratio == pytest.approx(expected, rel=1e-4), (kind, name)


def test_config_without_r_alpha_or_rslora_uses_peft_defaults(tmp_path):
    """PEFT reads a missing r / lora_alpha / use_rslora as 8 / 8 / False: so must we."""
    base = build_tiny_base(tmp_path / "base")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for key in ("r", "lora_alpha", "use_rslora", "use_dora"):
        config.pop(key)
    config_path.write_text(json.dumps(config))
    ctx = run_export(base, adapter, tmp_path / "out", dtype="float32")
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))
    assert {m["scale"] for m in ctx.report["merge"]["per_tensor"]} == {1.0}
    from exporter.inspect import describe

    info = describe(str(adapter), None, None)
    assert (info["use_rslora"], info["use_dora"]) == (False, False)


def test_trained_adapter_on_a_bf16_base(tmp_path):
    """What users have: a bf16 base and an adapter trained a few steps (lora_B grown from zero), default flags."""
    from conftest import train_adapter

    base = build_tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    adapter = train_adapter(tmp_path / "adapter", base, r=8, lora_alpha=16, target_modules=ATTN_MLP)
    ctx = run_export(base, adapter, tmp_path / "out")
    ours, peft = load_output(tmp_path / "out"), peft_merged_state(base, adapter)
    adapted = {n for n in ours if any(f".{m}." in n for m in ATTN_MLP)}
    assert len(adapted) == 14
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, peft[name].to(torch.bfloat16)), name
    parity = ctx.artifacts[0].parity
    # Measured KL 4e-5 (bf16 rounding of the merged weights); the declared bf16 tolerance is 1e-3.
    assert parity.passed and parity.figures.kl <= 2e-4
    # training moved every adapted weight
    assert min(m["relative_change"] for m in ctx.report["merge"]["per_tensor"]) > 0.01


def _as_unknown_architecture(base, folder):
    import shutil

    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mystery-lm", architectures=["MysteryForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unknown_architecture_falls_back_to_shapes(tmp_path):
    """An architecture transformers does not know: module types come from the tensor shapes (GPT-2's Conv1D stores W
    as (in, out); a square weight follows fan_in_fan_out). The oracle is PEFT's merge of the same tensors under the
    architecture's real name."""
    base = build_tiny_base(tmp_path / "gpt2", "gpt2")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, fan_in_fan_out=True,
                                 target_modules=["c_attn", "c_proj", "c_fc"])
    unknown = _as_unknown_architecture(base, tmp_path / "unknown")
    ctx = run_export(unknown, adapter, tmp_path / "out", parity=False)
    assert_matches_peft(load_output(tmp_path / "out"), peft_merged_state(base, adapter))
    layouts = {t.name: t.layout for t in ctx.layout.tensors if t.source.value == "merge"}
    assert set(layouts.values()) == {"conv1d"} and "transformer.h.0.attn.c_proj.weight" in layouts  # square, too


def test_parity_on_an_architecture_transformers_cannot_build_is_a_clear_error(tmp_path):
    from exporter.errors import ExportError

    base = build_tiny_base(tmp_path / "llama")
    adapter = build_peft_adapter(tmp_path / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj"])
    unknown = _as_unknown_architecture(base, tmp_path / "unknown")
    with pytest.raises(ExportError, match="mystery-lm.*--parity off"):
        run_export(unknown, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the pipeline in many row blocks -----------------------------------------------------------------------------
# The tiny models fit one block per tensor at the stream's default size (about 1M values), which hides any drift
# between blocks and PEFT's whole-tensor merge; here the export stage's pump runs with blocks of a few rows.


def _small_row_blocks(monkeypatch, block_values: int) -> dict[str, list[tuple[int, int]]]:
    """The merge stream is pumped in blocks of about ``block_values`` values; returns the merge's blocks per tensor, as
    they are computed (by the pump's workers, each with single-threaded torch, as in every run on 2 or more cores)."""
    import functools

    import exporter.merge_stream as merge_stream
    import exporter.stages.merge as merge_stage
    from converters import tensor_stream

    monkeypatch.setattr(merge_stream, "pump", functools.partial(tensor_stream.pump, block_values=block_values))
    blocks: dict[str, list[tuple[int, int]]] = {}

    class RecordingMerge(merge_stage.LoraMerge):
        def rows(self, rows_per_block):
            for start, stop, rows in super().rows(rows_per_block):
                blocks.setdefault(self.name, []).append((start, stop))
                yield start, stop, rows

    monkeypatch.setattr(merge_stage, "LoraMerge", RecordingMerge)
    return blocks


# (arch, base dtype, adapter config, block_values). A float32 output shows a last-bit drift that a bf16 one mostly
# rounds away, so all but one case are float32. Each block_values gives every adapted tensor 3 or more blocks
# and a partial last one (llama at 224 values: q/o 7 rows a block, the last 4; k/v 7 + 7 + 2; gate/up the last
# 1 row; down_proj 3 rows a block, the last 2; the embedding's last 2 of 7. GPT-2 at 500: c_attn 5 rows, the last 2;
# c_fc 3, the last 2; c_proj 15, the last 2 and 8).
MANY_BLOCKS = {
    "lora-fp32": ("llama", torch.float32, dict(r=8, lora_alpha=12, target_modules=ATTN_MLP), 224),
    "lora-bf16": ("llama", torch.bfloat16, dict(r=8, lora_alpha=12, target_modules=ATTN_MLP), 224),
    "rslora-fp32": ("llama", torch.float32, dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ATTN_MLP), 224),
    "gpt2-fan_in_fan_out": ("gpt2", torch.float32, dict(r=4, lora_alpha=6, fan_in_fan_out=True,
                                                        target_modules=["c_attn", "c_proj", "c_fc"]), 500),
    "embedding-fp32": ("llama", torch.float32, dict(r=4, lora_alpha=6, target_modules=["embed_tokens", "v_proj"]),
                       224),
}


@pytest.mark.parametrize("case", list(MANY_BLOCKS))
def test_merge_in_many_row_blocks_equals_peft_bit_for_bit(tmp_path, monkeypatch, case):
    arch, dtype, lora, block_values = MANY_BLOCKS[case]
    base = build_tiny_base(tmp_path / "base", arch, dtype=dtype)
    adapter = build_peft_adapter(tmp_path / "adapter", base, **lora)
    blocks = _small_row_blocks(monkeypatch, block_values)
    run_export(base, adapter, tmp_path / "out", parity=False)
    ours, peft = load_output(tmp_path / "out"), peft_merged_state(base, adapter)
    assert blocks and all(len(b) >= 3 and b[-1][1] - b[-1][0] < b[0][1] - b[0][0] for b in blocks.values()), blocks
    for name, tensor in ours.items():
        assert tensor.dtype == dtype, name
        expected = peft[name].to(dtype)  # a bf16 base: PEFT's float32 merge, rounded once
        differ = (tensor != expected).reshape(tensor.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        assert not differ, f"{name}: rows {differ} differ from PEFT's merge (blocks {blocks.get(name)})"
    assert changed_tensors(base, ours) == set(blocks)
