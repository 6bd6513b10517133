"""The GGUF writer converts each tensor from the row blocks it arrives in (heads kept whole for llama's rotary
permutation): every tensor it writes must equal gguf-py's reference quantization of the HF tensor, transformed as
llama.cpp's own converter does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import GGUFReader, quants as reference
from gguf.constants import GGMLQuantizationType as QT
from safetensors.torch import load_file

from conftest import build_bf16_llama, llama_cpp_permute
from converters.gguf.writer import write_gguf
from exporter.demo import build_tokenizer

# Warnings are errors: a writer that makes torch or numpy warn (an out= buffer resized, a cast that overflows, a file
# left open) is doing something it did not mean to. No third-party warning needed ignoring here.
pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    return build_bf16_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("type_name, qtype", [("f16", QT.F16), ("bf16", QT.BF16), ("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0),
                                              ("q4_1", QT.Q4_1), ("q5_0", QT.Q5_0), ("q5_1", QT.Q5_1)])
def test_blockwise_tensors_equal_the_reference_conversion(tmp_path, bf16_llama, type_name, qtype):
    # 1500 values per block: one 16-row head of Q/K (1024 values) per block, the 128x64 embedding in 6 blocks.
    target = tmp_path / "model.gguf"
    write_gguf(bf16_llama, target, type_name, block_values=1500)
    hf = load_file(bf16_llama / "model.safetensors")
    stored = {t.name: t for t in GGUFReader(target).tensors}
    heads = {"q_proj": 4, "k_proj": 2}
    checked = 0
    for layer in range(2):
        for proj, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                                ("down_proj", "ffn_down")):
            source = hf[f"model.layers.{layer}.{'mlp' if proj == 'down_proj' else 'self_attn'}.{proj}.weight"]
            values = source.float().numpy()
            if proj in heads:
                values = llama_cpp_permute(values, heads[proj])
            expected = np.ascontiguousarray(reference.quantize(values, qtype)).tobytes()
            tensor = stored[f"blk.{layer}.{gguf_name}.weight"]
            assert tensor.tensor_type == qtype
            assert np.asarray(tensor.data).tobytes() == expected, f"blk.{layer}.{gguf_name}"
            checked += 1
    embedding = reference.quantize(hf["model.embed_tokens.weight"].float().numpy(), qtype)
    assert np.asarray(stored["token_embd.weight"].data).tobytes() == np.ascontiguousarray(embedding).tobytes()
    assert np.array_equal(np.asarray(stored["blk.0.attn_norm.weight"].data),
                          hf["model.layers.0.input_layernorm.weight"].float().numpy())
    assert checked == 8


def test_block_size_and_workers_do_not_change_the_file(tmp_path, bf16_llama):
    write_gguf(bf16_llama, tmp_path / "one-block-per-tensor.gguf", "q8_0", block_values=1 << 20, workers=1)
    write_gguf(bf16_llama, tmp_path / "many-blocks.gguf", "q8_0", block_values=700, workers=2)
    assert (tmp_path / "one-block-per-tensor.gguf").read_bytes() == (tmp_path / "many-blocks.gguf").read_bytes()



@pytest.mark.parametrize("type_name", ["f16", "bf16", "f32"])
def test_the_scratch_buffer_each_block_is_cast_into_holds_that_block_only(tmp_path, bf16_llama, monkeypatch,
                                                                           type_name):
    """A float type's block is cast into a reused per-thread buffer (tensor_stream.workspace): asked for exactly the
    block's bytes in the tensor's type, the buffer grows to the largest block once and is reused; asked for more (a
    size counted from the tensor's start rather than the block's), it is reallocated block after block, and memory
    grows with the tensor instead of the block."""
    import converters.gguf.writer as writer_module

    itemsize = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}  # the GGML float types (norms stay F32 in every file)
    asked: list[tuple[int, int]] = []  # (bytes the block holds in its tensor's type, bytes of the buffer given)
    real_encode_rows = writer_module.encode_rows

    def recording_encode_rows(rows, qtype, out=None):
        asked.append((rows.numel() * itemsize[qtype], out.numel()))
        return real_encode_rows(rows, qtype, out=out)

    monkeypatch.setattr(writer_module, "encode_rows", recording_encode_rows)
    write_gguf(bf16_llama, tmp_path / "model.gguf", type_name, block_values=1500, workers=1)
    assert len(asked) > 21  # more blocks than LLAMA_64 has tensors (21): the embedding alone comes in 6
    wrong = [(needed, given) for needed, given in asked if given != needed]
    assert not wrong, f"{len(wrong)} of {len(asked)} blocks got a buffer of another size, e.g. {wrong[:3]}"

def test_short_writes_are_continued_where_they_stopped(tmp_path, bf16_llama, monkeypatch):
    """os.pwrite may write less than asked (a signal, a network file system): the rest goes after what was written."""
    import converters.gguf.writer as writer_module

    write_gguf(bf16_llama, tmp_path / "whole.gguf", "q8_0")
    real_pwrite = os.pwrite
    monkeypatch.setattr(writer_module.os, "pwrite", lambda fd, data, at: real_pwrite(fd, bytes(data[:1000]), at))
    write_gguf(bf16_llama, tmp_path / "short.gguf", "q8_0")
    assert (tmp_path / "short.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_data_section_takes_any_order_and_refuses_wrong_sizes_and_gaps(tmp_path):
    from converters.gguf.writer import GGUFResult, _DataSection, _PlannedTensor

    first = _PlannedTensor("first.weight", "first", (2, 32), QT.F32)  # 256 bytes
    second = _PlannedTensor("second.weight", "second", (3,), QT.F32)  # 12 bytes, padded to 32

    def section(path) -> _DataSection:
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        return _DataSection(fd, 64, 32, [first, second], GGUFResult(tmp_path, "llama", "f32"))

    ordered = section(tmp_path / "any-order")
    ordered.write(second, np.arange(12, dtype=np.uint8))
    ordered.write(first, np.full(128, 7, np.uint8), 128)  # the second half first
    ordered.write(first, np.full(128, 5, np.uint8))
    ordered.finish()
    data = (tmp_path / "any-order").read_bytes()
    assert len(data) == 64 + 256 + 32 and data[64:192] == bytes([5]) * 128 and data[192:320] == bytes([7]) * 128
    assert data[320:332] == bytes(range(12)) and data[332:] == bytes(20)
    with pytest.raises(AssertionError, match="outside its 256"):
        section(tmp_path / "a").write(first, np.zeros(200, np.uint8), 100)
    twice = section(tmp_path / "b")
    twice.write(second, np.zeros(12, np.uint8))
    with pytest.raises(AssertionError, match="24 bytes written, planned 12"):
        twice.write(second, np.zeros(12, np.uint8))
    unfinished = section(tmp_path / "c")
    unfinished.write(first, np.zeros(256, np.uint8))
    with pytest.raises(AssertionError, match="1 planned tensors were never written completely, second.weight first"):
        unfinished.finish()


def test_heads_wider_than_hidden_over_heads_stay_whole_across_blocks(tmp_path):
    """head_dim × heads ≠ hidden (Qwen3, Gemma): blocks must hold whole heads of Q and K, counted from their rows."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / "wide-heads"
    build_tokenizer(folder, vocab_size=128, family="llama-bpe")
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_gguf(folder, tmp_path / "model.gguf", "f32", block_values=1500)  # ~23 rows a block: under one 32-row head
    hf = load_file(folder / "model.safetensors")
    stored = {t.name: np.asarray(t.data) for t in GGUFReader(tmp_path / "model.gguf").tensors}
    for proj, gguf_name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        expected = llama_cpp_permute(hf[f"model.layers.0.self_attn.{proj}.weight"].numpy(), heads)
        assert np.array_equal(stored[f"blk.0.{gguf_name}.weight"], expected), proj


def test_f16_keeps_its_largest_values_and_refuses_what_would_become_inf(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from converters.gguf.writer import GGUFExportError

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    # The edge as the largest and the smallest value; beyond it on one side only (the other side in range).
    for name, pair in (("edge", [65504.0, -65504.0]), ("beyond", [65520.0, -1.0])):
        folder = tmp_path / name
        build_tokenizer(folder, vocab_size=128, family="llama-bpe")
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[3, :2] = torch.tensor(pair)
        model.save_pretrained(folder)
        if name == "edge":
            write_gguf(folder, tmp_path / "edge.gguf", "f16")
            row = next(t for t in GGUFReader(tmp_path / "edge.gguf").tensors if t.name == "blk.0.ffn_down.weight")
            assert np.asarray(row.data)[3, :2].tolist() == [65504.0, -65504.0]
        else:
            with pytest.raises(GGUFExportError, match="model.layers.0.mlp.down_proj.weight has values beyond"):
                write_gguf(folder, tmp_path / "beyond.gguf", "f16")
            write_gguf(folder, tmp_path / "beyond.gguf", "bf16")  # a type that holds it


def test_an_absent_tie_setting_means_tied_as_in_transformers():
    """Gemma 2's llama.cpp graph always reads the token embedding as the output head; a config without
    tie_word_embeddings is tied (transformers' default), so an lm_head.weight beside it is no reason to refuse."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from converters.gguf.writer import GGUFPlan

    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in Gemma2ForCausalLM(config).named_parameters()]
    as_dict = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings"}
    as_dict["architectures"] = ["Gemma2ForCausalLM"]
    GGUFPlan(as_dict, shapes + [("lm_head.weight", (128, 64))], "f16")  # no error
    with pytest.raises(ValueError, match="always uses the token embedding"):
        GGUFPlan({**as_dict, "tie_word_embeddings": False}, shapes + [("lm_head.weight", (128, 64))], "f16")


def test_llama3_frequency_scaling_is_the_rope_freqs_tensor_transformers_implies(tmp_path):
    """Llama 3.x rope scaling reaches llama.cpp as rope_freqs: per frequency, the unscaled inverse frequency over the
    one transformers' llama3 rope computes (tests/test_gguf.py runs such a model in llama.cpp)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=rope)
    folder = tmp_path / "llama3"
    build_tokenizer(folder, vocab_size=128, family="llama-bpe")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_gguf(folder, tmp_path / "model.gguf", "f16")
    reader = GGUFReader(tmp_path / "model.gguf")
    stored = {t.name: t for t in reader.tensors}
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert stored["rope_freqs.weight"].tensor_type == QT.F32
    np.testing.assert_allclose(np.asarray(stored["rope_freqs.weight"].data), (unscaled / scaled.double()).numpy(),
                               rtol=1e-5)
    assert len(set(np.asarray(stored["rope_freqs.weight"].data).tolist())) == 3  # unscaled, smoothed and scaled
    # The model's name: the config's _name_or_path, else the folder's name.
    name = reader.fields["general.name"]
    assert bytes(name.parts[name.data[0]]).decode() == "llama3"


def test_llama3_rope_without_an_original_context_takes_llama_cpps_8192():
    """A rope config without original_max_position_embeddings: llama.cpp's converter (convert_hf_to_gguf.py) reads it
    as 8192, which transformers' llama3 rope then computes the frequencies of."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from converters.gguf.arch import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope | {
        "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    hp = config.to_dict()
    hp["rope_parameters"] = dict(rope)  # the key absent
    hp.pop("rope_scaling", None)
    np.testing.assert_allclose(llama3_rope_factors(hp).double().numpy(), (unscaled / scaled.double()).numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("sliding_window, written", [(None, 0), (2047, 2047)])
def test_phi3_sliding_window_is_written_as_llama_cpps_converter_writes_it(sliding_window, written):
    """convert_hf_to_gguf.py writes phi3.attention.sliding_window always, 0 when the config has none (llama.cpp reads
    0 as "no window": how it tells Phi-4 from Phi-3), the config's window otherwise."""
    from transformers import Phi3Config

    from converters.gguf.arch import arch_for, hyperparameters, metadata_keys

    config = Phi3Config(hidden_size=64, num_attention_heads=4, sliding_window=sliding_window).to_dict()
    config["architectures"] = ["Phi3ForCausalLM"]
    hp = hyperparameters(config)
    keys = {key: value for key, _, value in metadata_keys(arch_for(config), hp)}
    assert keys["attention.sliding_window"] == written


@pytest.mark.parametrize("low, high", [(2.0, 8.0), (0.5, 4.0)])
def test_llama3_frequency_factors_follow_transformers_for_other_band_edges(low, high):
    """The rope_freqs factors (llama.cpp divides each frequency by them) for band edges other than Llama 3's own
    1 and 4: original/low and original/high bound the smoothed band, as transformers' llama3 rope computes it."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from converters.gguf.arch import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": 64}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    hp = config.to_dict()
    hp["rope_parameters"] = dict(rope)
    hp.pop("rope_scaling", None)
    expected = (unscaled / scaled.double()).numpy()
    assert len(set(np.round(expected, 6))) > 3  # unscaled, fully scaled and smoothed frequencies all occur
    np.testing.assert_allclose(llama3_rope_factors(hp).double().numpy(), expected, rtol=1e-6)
