"""The ONNX writer against independent oracles: transformers' own logits, its full recompute and its greedy generate,
ONNX Runtime, onnxruntime-genai, and onnx's checker. Weights are fed one tensor at a time in the order of the saved
safetensors file, as the pipeline streams them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converters.onnx import (ARCHITECTURES, OnnxExportError, OnnxWriter, non_standard_ops, operator_census,
                             write_genai_config)
from converters.safetensors_in import SafetensorsFile

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("error")  # the tracer silences its own expected warnings; nothing else may warn

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, bos_token_id=0,
            eos_token_id=1, pad_token_id=2)
# A sliding window of 8 under prompts of 12 + 9 tokens: the window is exercised in prefill and in decode. Gemma at
# initializer_range 0.15 repeats one token forever (its sqrt(hidden)-scaled tied embedding dominates); 0.02 varies.
ARCH_EXTRA = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": {},
    "qwen3": dict(head_dim=16),
    "phi3": {},
    "gemma2": dict(head_dim=16, sliding_window=8, initializer_range=0.02),
    "gemma3_text": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        initializer_range=0.02),
}
assert set(ARCH_EXTRA) == set(ARCHITECTURES)
PROMPT_LEN, NEW_TOKENS = 12, 9  # prefill makes the first new token, then 8 decode steps
FP32_ATOL = 1e-4
# fp16 (weights and compute, as optimum exports) against fp32 transformers, measured on these tiny models: max |Δlogit|
# 3e-3..1e-2 (logits of magnitude 0.6-4), KL 3e-7..2e-6. 5e-2 / 1e-3 leave room for other seeds without passing a
# wrong graph (a wrong weight or a dropped sliding window moves logits by 0.5-5).
FP16_ATOL, FP16_MAX_KL = 5e-2, 1e-3


def _hf_model(arch: str, folder: Path, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**TINY, **ARCH_EXTRA[arch]})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.save_pretrained(folder)
    return model


def _export(hf_folder: Path, out: Path, **kwargs) -> Path:
    config = json.loads((hf_folder / "config.json").read_text())
    writer = OnnxWriter(out, config, metadata={"lora_export.source": "test"}, **kwargs)
    shard = SafetensorsFile(hf_folder / "model.safetensors")
    for name in shard.keys():  # file order
        writer.write(name, shard.tensor(name))
    return writer.close()


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _empty_past(session, batch: int) -> dict[str, np.ndarray]:
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtypes[i.type])
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.clip(mask.cumsum(-1) - 1, 0, None)  # what transformers' generate feeds with left padding


def _ort_greedy(session, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Prefill from an empty past, then decode one token at a time from the presents; returns tokens and the logits
    each step chose from."""
    ids = np.array([prompt], dtype=np.int64)
    past = _empty_past(session, 1)
    total = len(prompt)
    tokens, step_logits = [], []
    names = [o.name for o in session.get_outputs()]
    for _ in range(steps):
        mask = np.ones((1, total), np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask)[:, -ids.shape[1]:], **past}
        out = dict(zip(names, session.run(None, feed)))
        logits = out["logits"][0, -1].astype(np.float32)
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
        past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
        ids = np.array([[tokens[-1]]], dtype=np.int64)
        total += 1
    return tokens, step_logits


def _prompt(seed: int = 3) -> list[int]:
    return torch.randint(3, TINY["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_generate(model, prompt: list[int], steps: int) -> list[int]:
    from transformers import GenerationConfig

    # No EOS: compare every step (onnxruntime-genai's test below keeps EOS, as it runs by default).
    config = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def exported(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = _hf_model(arch, root / "hf")
    return arch, model, root, _export(root / "hf", root / "onnx")


def test_fp32_prefill_matches_transformers(exported):
    arch, model, _, path = exported
    session = _session(path)
    ids = torch.randint(3, TINY["vocab_size"], (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    positions = torch.from_numpy(_positions(mask.numpy()))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.numpy()
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                   "position_ids": positions.numpy(), **_empty_past(session, 2)})[0]
    real = mask.numpy().astype(bool)  # padded positions' logits are meaningless in both
    assert np.abs(got[real] - ref[real]).max() < FP32_ATOL, arch
    assert not non_standard_ops(operator_census(path)), arch  # standard ONNX domain only (TensorRT's parser)
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["lora_export.source"] == "test"


def test_fp32_decode_matches_recompute_and_generate(exported):
    arch, model, _, path = exported
    prompt = _prompt()
    tokens, step_logits = _ort_greedy(_session(path), prompt, NEW_TOKENS)
    with torch.no_grad():  # full recompute of the whole sequence at every step
        full = model(torch.tensor([prompt + tokens])).logits[0].numpy()
    recompute = full[PROMPT_LEN - 1:PROMPT_LEN - 1 + NEW_TOKENS]
    assert np.abs(np.stack(step_logits) - recompute).max() < FP32_ATOL, arch
    assert tokens == _hf_generate(model, prompt, NEW_TOKENS), arch


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fp16_runs_on_cpu_and_stays_close(arch, tmp_path):
    model = _hf_model(arch, tmp_path / "hf")
    session = _session(_export(tmp_path / "hf", tmp_path / "onnx", dtype="fp16"))
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
    mask = np.ones((1, PROMPT_LEN), np.int64)
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask, "position_ids": _positions(mask),
                                   **_empty_past(session, 1)})[0][0]
    assert got.dtype == np.float16
    log_p, log_q = _log_softmax(ref), _log_softmax(got)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    diff = float(np.abs(got.astype(np.float32) - ref).max())
    print(f"{arch} fp16: max|dlogit|={diff:.2e} KL={kl:.2e}")  # reported with -s
    assert diff < FP16_ATOL and kl < FP16_MAX_KL, (arch, diff, kl)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer (onnxruntime-genai loads one with the model); its special tokens are ids 0-2,
    TINY's bos/eos/pad. Built here rather than with exporter.demo so this converters test needs nothing of exporter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<s>", "</s>", "<pad>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert len(fast) <= TINY["vocab_size"]
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return folder


def test_genai_generates_what_transformers_generates(exported, tokenizer_folder):
    og = pytest.importorskip("onnxruntime_genai")
    arch, model, root, path = exported
    for file in tokenizer_folder.iterdir():
        shutil.copy(file, path.parent)
    config = json.loads((root / "hf" / "config.json").read_text())
    generation = json.loads((root / "hf" / "generation_config.json").read_text())
    write_genai_config(path.parent, config, generation)

    prompt = _prompt()
    genai_model = og.Model(str(path.parent))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(do_sample=False, max_length=PROMPT_LEN + NEW_TOKENS)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    got = list(generator.get_sequence(0))[PROMPT_LEN:]
    with torch.no_grad():  # both stop at EOS (id 1) if it comes first
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, PROMPT_LEN:]
    assert got == want.tolist(), arch


def test_no_cache_graph(tmp_path):
    model = _hf_model("llama", tmp_path / "hf")
    path = _export(tmp_path / "hf", tmp_path / "onnx", kv_cache=False)
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    ids = torch.tensor([_prompt()])
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    mask = np.ones((1, PROMPT_LEN), np.int64)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask, "position_ids": _positions(mask)})[0]
    assert np.abs(got - ref).max() < FP32_ATOL
    with pytest.raises(OnnxExportError, match="no KV-cache inputs"):
        write_genai_config(path.parent, json.loads((tmp_path / "hf" / "config.json").read_text()), None)


def test_weight_mapping_is_explicit(tmp_path):
    """Linear weights are stored transposed, Gemma's norms as 1 + w, a tied embedding twice; the rest as is."""
    config = dict(model_type="gemma2", **{**TINY, **ARCH_EXTRA["gemma2"]})
    writer = OnnxWriter(tmp_path, config)
    mapping = writer.mapping()
    assert mapping["model.layers.0.self_attn.q_proj.weight"] == {
        "model.layers.0.self_attn.q_proj.weight.transpose": "Transpose(perm=[1, 0])"}
    assert mapping["model.norm.weight"] == {"model.norm.weight.cast.add": "Cast(to=1) -> Add(1.0)"}
    assert set(mapping["model.embed_tokens.weight"]) == {"model.embed_tokens.weight",
                                                         "model.embed_tokens.weight.transpose"}
    assert "lm_head.weight" not in writer.wanted()  # tied: an alias
    embedding = torch.randn(writer.expected_shape("lm_head.weight"))
    writer.write("model.embed_tokens.weight", embedding)
    writer.write("lm_head.weight", embedding.clone())  # checkpoints that save both: equal, fine
    with pytest.raises(OnnxExportError, match="lm_head.weight differs from model.embed_tokens.weight, but config"):
        writer.write("lm_head.weight", embedding + 1)  # e.g. a LoRA merged into lm_head of a tied model
    writer.abort()


def test_write_checks(tmp_path):
    config = dict(model_type="llama", **TINY)
    writer = OnnxWriter(tmp_path / "out", config)
    names = writer.wanted()
    writer.write("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(8))  # unused name: ignored
    with pytest.raises(OnnxExportError, match="model.norm.weight is shaped"):
        writer.write("model.norm.weight", torch.zeros(3))
    for name in names[:-1]:
        writer.write(name, torch.zeros(writer.expected_shape(name), dtype=torch.bfloat16))
    with pytest.raises(OnnxExportError, match=f"1 weights .* never written: {names[-1]}"):
        writer.close()
    with pytest.raises(OnnxExportError, match="written twice"):
        writer.write(names[0], torch.zeros(writer.expected_shape(names[0])))
    writer.abort()
    assert not any((tmp_path / "out").iterdir())
    with pytest.raises(OnnxExportError, match="after close"):
        writer.write(names[0], torch.zeros(writer.expected_shape(names[0])))


def test_bf16_refused(tmp_path):
    with pytest.raises(OnnxExportError, match="bf16 refused: ONNX Runtime's CPU provider"):
        OnnxWriter(tmp_path, dict(model_type="llama", **TINY), dtype="bf16")


@pytest.mark.parametrize("config, match", [
    (dict(model_type="mamba", vocab_size=128, hidden_size=32, num_hidden_layers=2), "architecture mamba cannot"),
    (dict(model_type="gemma3", text_config=dict(TINY)), "architecture gemma3: a multimodal"),
    (dict(model_type="no_such_model"), "'no_such_model' is unknown to transformers"),
])
def test_unsupported_architecture(tmp_path, config, match):
    with pytest.raises(OnnxExportError, match=match):
        OnnxWriter(tmp_path, config)


def test_genai_config_needs_a_known_type(tmp_path):
    with pytest.raises(OnnxExportError, match="architecture gpt2: no onnxruntime-genai model type"):
        write_genai_config(tmp_path, dict(model_type="gpt2", num_attention_heads=4, hidden_size=32), None)


def _big_llama() -> dict:
    # 9 layers of 67M fp32 parameters: 2.42 GB of weights, past protobuf's 2 GiB limit; vocab 128 keeps logits cheap.
    return dict(model_type="llama", vocab_size=128, hidden_size=2048, intermediate_size=8192, num_hidden_layers=9,
                num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=256,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def test_external_data_past_2gb(tmp_path):
    start = time.perf_counter()
    writer = OnnxWriter(tmp_path, _big_llama())
    total = 0
    for k, name in enumerate(writer.wanted()):  # cheap weights made on the fly, one at a time
        shape = writer.expected_shape(name)
        value = 1.0 if name.endswith("norm.weight") else 0.02 * (1 + k % 5) / (shape[-1] ** 0.5)
        writer.write(name, torch.full(shape, value))
        total += 4 * int(np.prod(shape))
    path = writer.close()
    assert total > 2**31 and path.stat().st_size < 10**6
    onnx.checker.check_model(str(path))  # by path, external data included
    session = _session(path)
    mask = np.ones((1, 1), np.int64)
    logits = session.run(["logits"], {"input_ids": np.array([[5]]), "attention_mask": mask,
                                      "position_ids": np.zeros((1, 1), np.int64), **_empty_past(session, 1)})[0]
    assert logits.shape == (1, 1, 128) and np.isfinite(logits).all()
    print(f"2.4 GB export + check + ORT run: {time.perf_counter() - start:.1f} s")


# Peak RSS is VmHWM, this process image's high-water mark: ru_maxrss would also count the parent's RSS at fork time
# (Linux keeps it across exec), i.e. whatever pytest held before.
_MEASURE = r"""
import json, re, sys, psutil, torch
from converters.onnx import OnnxWriter
from converters.safetensors_in import SafetensorsFile
folder, config = sys.argv[1], json.loads(sys.argv[2])
base = psutil.Process().memory_info().rss
writer = OnnxWriter(folder + "/onnx", config)
shard = SafetensorsFile(folder + "/model.safetensors")
for name in shard.keys():
    writer.write(name, shard.tensor(name))
    shard.release(name)  # the pipeline's reader drops pages it has streamed
writer.close()
peak = int(re.search(r"VmHWM:\s*(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"base": base, "peak": peak}))
"""


def _llama_file(folder: Path, layers: int) -> tuple[dict, int]:
    """A llama-shaped safetensors file, written tensor by tensor (random values), and its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from converters.safetensors_out import ShardedWriter, TensorSpec

    config = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                  max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(LlamaConfig(**config)).named_parameters()}
    specs = [TensorSpec(n, "F32", s) for n, s in sorted(shapes.items())]
    out = ShardedWriter(folder, specs, max_shard_bytes=1 << 40)
    for spec in specs:
        out.write(spec.name, (0.02 * torch.randn(spec.shape)).numpy().tobytes())
    out.close()
    return config, sum(s.nbytes for s in specs)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_peak_memory_is_flat(tmp_path):
    """Peak RSS of a child exporting ~0.5 GB and ~1 GB of fp32 weights: no growth with model size."""
    peaks = {}
    for layers in (4, 12):
        folder = tmp_path / str(layers)
        folder.mkdir()
        config, nbytes = _llama_file(folder, layers)
        result = subprocess.run([sys.executable, "-c", _MEASURE, str(folder), json.dumps(config)], check=True,
                                capture_output=True, text=True)
        peaks[nbytes] = json.loads(result.stdout.strip().splitlines()[-1])
        shutil.rmtree(folder)
    (small, small_peak), (large, large_peak) = sorted(peaks.items())
    print({n: {k: v >> 20 for k, v in p.items()} for n, p in peaks.items()}, "MiB")
    assert large_peak["peak"] <= 1.2 * small_peak["peak"]
    assert large_peak["peak"] - large_peak["base"] < 0.6 * large


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found |= {node.output[0]: numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"}
    return found


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_constants_do_not_depend_on_the_configs_dtype(arch):
    """Users' config.json says "dtype": "bfloat16". Whatever the model computes from the config while it is built
    (Gemma's embedding scale √hidden, rotary tables) must enter the graph as float32 computes it: the same constants
    as from a float32 config, in an fp32 and an fp16 graph alike. Hidden size 48: √48 is no bf16 number (√64 = 8 is,
    and hid the bf16-rounded scale that broke Gemma 3 270M's parity)."""
    from converters.onnx.trace import trace

    config = dict(model_type=arch, **{**TINY, **ARCH_EXTRA[arch], "hidden_size": 48})
    for graph_dtype in (torch.float32, torch.float16):
        traced = trace({**config, "dtype": "float32"}, graph_dtype)
        assert any(name.startswith("past_key_values.") for name in traced.input_names)  # the KV-cache graph, by default
        want = _constants(traced.model)
        got = _constants(trace({**config, "dtype": "bfloat16"}, graph_dtype).model)
        assert want.keys() == got.keys(), arch
        differ = [k for k in want if want[k].dtype != got[k].dtype or not np.array_equal(want[k], got[k])]
        assert not differ, (arch, graph_dtype, differ)
        if arch.startswith("gemma") and graph_dtype == torch.float32:  # and the scale is the exact one
            near = [float(v.reshape(-1)[0]) for v in got.values()
                    if v.size == 1 and v.dtype.kind == "f" and abs(float(v.reshape(-1)[0]) - 48**0.5) < 0.05]
            assert near and all(value == float(np.float32(48**0.5)) for value in near), near


@pytest.mark.parametrize("perm", [[0, 2, 1], [2, 0, 1], None])
def test_a_folded_transpose_follows_its_perm_or_reverses_without_one(perm):
    """The torch fast path for Transpose chains against numpy's transpose (which, like ONNX, reverses without perm)."""
    from onnx import helper

    from converters.onnx.weights import Fold

    weight = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    attrs = {} if perm is None else {"perm": perm}
    nodes = [helper.make_node("Transpose", ["w"], ["w.t"], **attrs), helper.make_node("Identity", ["w.t"], ["w.t2"])]
    fold = Fold("w", ["w.t2"], nodes)
    [(name, array)] = fold.apply(weight, onnx.ModelProto())
    assert name == "w.t2"
    np.testing.assert_array_equal(array, np.transpose(weight.numpy(), perm))
    assert array.flags["C_CONTIGUOUS"]


def test_genai_head_size_is_the_configs_head_dim_or_an_integer_share_of_the_width():
    """onnxruntime-genai's builder writes head_size as an integer; without head_dim in config.json it is
    hidden_size / num_attention_heads (a float 8.0 in genai_config.json is not what genai's schema holds)."""
    from converters.onnx.genai import genai_config

    common = dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, eos_token_id=1,
                  vocab_size=128, max_position_embeddings=64)
    plain = genai_config(dict(model_type="llama", hidden_size=32, **common))["model"]["decoder"]
    assert plain["head_size"] == 8 and type(plain["head_size"]) is int
    gemma = genai_config(dict(model_type="gemma3_text", hidden_size=32, head_dim=16, **common))["model"]["decoder"]
    assert gemma["head_size"] == 16


@pytest.mark.parametrize("n, more", [(5, ""), (6, " and 1 more"), (7, " and 2 more")])
def test_many_missing_weights_are_named_five_then_counted(tmp_path, n, more):
    config = dict(model_type="llama", **TINY)
    writer = OnnxWriter(tmp_path / "out", config)
    names = writer.wanted()
    for name in names[:-n]:
        writer.write(name, torch.zeros(writer.expected_shape(name), dtype=torch.bfloat16))
    with pytest.raises(OnnxExportError) as failure:
        writer.close()
    missing = names[-n:]
    assert str(failure.value) == (f"{n} weights the ONNX graph needs were never written: {', '.join(missing[:5])}"
                                  + more)
    writer.abort()


def test_every_input_and_output_names_its_dynamic_axes(exported):
    """The symbolic dimensions optimum and onnxruntime-genai use: batch and sequence on ids, positions and logits,
    the total length on the mask and on every present, the past length on every past input (TensorRT builds its
    optimisation profiles from these names; a fixed size would pin the cache length)."""
    _, _, _, path = exported
    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in [*graph.input, *graph.output]}
    assert shapes["input_ids"] == shapes["position_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["logits"][:2] == ["batch_size", "sequence_length"]
    past = [n for n in shapes if n.startswith("past_key_values.")]
    present = [n for n in shapes if n.startswith("present.")]
    assert past and len(past) == len(present)
    for name in past:
        assert shapes[name][0] == "batch_size" and shapes[name][2] == "past_sequence_length", (name, shapes[name])
    for name in present:
        assert shapes[name][0] == "batch_size" and shapes[name][2] == "total_sequence_length", (name, shapes[name])


@pytest.mark.parametrize("generation", [{}, dict(do_sample=True, num_beams=2, repetition_penalty=1.3, temperature=0.7,
                                                 top_k=20, top_p=0.95)], ids=["absent", "given"])
def test_genai_search_options_are_the_generation_configs_or_transformers_defaults(generation):
    """genai's search options: the values generation_config.json gives, and where it is silent transformers' own
    GenerationConfig defaults (what generate() would use), so the ONNX model samples as the original does."""
    from transformers import GenerationConfig

    from converters.onnx.genai import genai_config

    config = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, eos_token_id=1, vocab_size=128, max_position_embeddings=64)
    search = genai_config(config, generation)["search"]
    # transformers 5 leaves unset options None in GenerationConfig and fills them from these when generating
    expected = GenerationConfig._get_default_generation_params() | generation
    for option in ("do_sample", "num_beams", "repetition_penalty", "temperature", "top_k", "top_p", "min_length",
                   "length_penalty", "no_repeat_ngram_size", "num_return_sequences", "diversity_penalty"):
        assert search[option] == expected[option], option


@pytest.mark.parametrize("layers, kv_heads, head_dim, refused", [
    (2, 2, 8, False),  # the config's geometry
    (3, 2, 8, True),   # a layer more than the config: genai would allocate too few caches
    (2, 4, 8, True),   # other kv heads
    (2, 2, 16, True),  # another head size
], ids=["matching", "layers", "kv-heads", "head-dim"])
def test_genai_config_refuses_a_graph_whose_cache_is_not_the_configs(tmp_path, layers, kv_heads, head_dim, refused):
    """write_genai_config checks the graph's past_key_values inputs against the cache genai will allocate from the
    config: every layer's key and value, (batch, kv heads, past, head size). Each mismatch alone is refused."""
    from onnx import TensorProto, helper

    from converters.onnx.arch import PAST_KEY, PAST_VALUE
    from converters.onnx.genai import write_genai_config

    inputs = [helper.make_tensor_value_info(name % i, TensorProto.FLOAT, ["batch", kv_heads, "past", head_dim])
              for i in range(layers) for name in (PAST_KEY, PAST_VALUE)]
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0].name], ["out"])], "cache", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    config = dict(model_type="llama", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, eos_token_id=1, vocab_size=128, max_position_embeddings=64)
    if refused:
        with pytest.raises(OnnxExportError, match="cache layers of"):
            write_genai_config(tmp_path, config, None, filename="model.onnx")
        assert not (tmp_path / "genai_config.json").exists()
    else:
        write_genai_config(tmp_path, config, None, filename="model.onnx")
        assert (tmp_path / "genai_config.json").is_file()
