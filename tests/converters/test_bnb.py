"""converters.bnb against its oracles: bitsandbytes' own kernels, and tiny models quantized on load and saved by
transformers itself (BitsAndBytesConfig on CPU). bitsandbytes is a test dependency: without it this module fails.

Never run a forward pass through a quantized model here: on AVX-512-bf16 CPUs the first one repacks 4-bit weights
in place. The oracles read the saved files, or a model that was loaded and never run.
"""

from __future__ import annotations

import json
import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Gemma3TextConfig, GPT2Config, LlamaConfig,
                          Qwen2Config)
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer

from converters.bnb import (BnbFormatError, dequantize, dequantize_4bit, dequantize_int8, group_tensors,
                            logical_shape_dtype, modules_not_quantized, parse_quant_state, parse_quantization_config,
                            quantization_config, quantize_4bit, quantize_int8, skip_patterns)
from converters.safetensors_in import SafetensorsFile

pytestmark = pytest.mark.filterwarnings("error")  # the quantizers and readers must not warn (a lossy cast, a resize)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
ARCHS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    # intermediate 96: down_proj rows hold 1.5 blocks of 64, so blocks straddle rows
    "qwen2": lambda: Qwen2Config(**{**SHAPE, "intermediate_size": 96}),
    "gemma3": lambda: Gemma3TextConfig(**SHAPE, head_dim=16),  # tied embeddings
    "gpt2": lambda: GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64),  # Conv1D weights
}
CASES = {  # id: (arch, model dtype, BitsAndBytesConfig arguments)
    "llama-bf16-nf4-dq": ("llama", BF16, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=BF16)),
    "llama-bf16-fp4-bf16storage": ("llama", BF16, dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                       bnb_4bit_quant_storage=BF16)),
    "qwen2-fp16-fp4-dq": ("qwen2", FP16, dict(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=FP16)),
    "gemma3-fp32-nf4-fp32storage": ("gemma3", FP32, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_quant_storage=FP32)),
    "gpt2-fp32-nf4-dq": ("gpt2", FP32, dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True)),
    "llama-bf16-int8": ("llama", BF16, dict(load_in_8bit=True)),
    # skip_modules replaces transformers' default skips: lm_head gets quantized, down_proj does not
    "qwen2-fp16-int8-skip": ("qwen2", FP16, dict(load_in_8bit=True, llm_int8_skip_modules=["down_proj"])),
}
FOUR_BIT = [c for c, (_, _, kw) in CASES.items() if kw.get("load_in_4bit")]
EIGHT_BIT = [c for c, (_, _, kw) in CASES.items() if kw.get("load_in_8bit")]


class Built:
    def __init__(self, arch, dtype, float_dir, quant_dir, model):
        self.arch, self.dtype, self.model = arch, dtype, model  # model: quantized on load, never run
        self.float = SafetensorsFile(float_dir / "model.safetensors")
        self.quant = SafetensorsFile(quant_dir / "model.safetensors")
        self.config = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
        with torch.device("meta"):
            self.meta = AutoModelForCausalLM.from_config(ARCHS[arch]())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict[str, Built] = {}

    def get(case: str) -> Built:
        if case not in cache:
            arch, dtype, kwargs = CASES[case]
            root = tmp_path_factory.mktemp(case)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(ARCHS[arch]()).to(dtype).save_pretrained(root / "float")
            model = AutoModelForCausalLM.from_pretrained(root / "float", dtype=dtype, device_map="cpu",
                                                         quantization_config=BitsAndBytesConfig(**kwargs))
            model.save_pretrained(root / "quant")
            cache[case] = Built(arch, dtype, root / "float", root / "quant", model)
        return cache[case]

    return get


def assert_same_bits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit for bit, except the sign of zero: bitsandbytes' own kernels disagree on FP4's "-0" code (see
    converters/bnb/format.py FP4_CODES_TIMES_12)."""
    assert (ours.dtype, ours.shape) == (ref.dtype, ref.shape)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[ours.element_size()]
    ours, ref = (torch.where(t == 0, torch.zeros_like(t), t).view(ints) for t in (ours, ref))
    assert torch.equal(ours, ref)


def bnb_dequantize_4bit(packed: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit with the QuantState it rebuilds itself from the serialized tensors."""
    state = bnbf.QuantState.from_dict(dict(side), device="cpu")
    shape = state.shape
    if len(shape) > 1 and shape[-1] % state.blocksize and shape[-1] % 16 == 0:
        # bitsandbytes 0.50's AVX-512 CPU kernel picks absmax[row * (cols // blocksize) + col // blocksize], wrong
        # when blocks straddle rows (e.g. 64x96 at blocksize 64). Asked for the flat 1-D shape, the same kernel takes
        # the same flat-block path as CUDA and bitsandbytes' pure-torch backend.
        state.shape = torch.Size([math.prod(shape)])
        return bnbf.dequantize_4bit(packed, state).view(shape)
    return bnbf.dequantize_4bit(packed, state)


def side_tensors(entry, file: SafetensorsFile) -> dict[str, torch.Tensor]:
    return {key.removeprefix(entry.name + "."): file.tensor(key)
            for role, key in entry.keys.items() if role != "weight"}


def linear_modules(meta) -> dict[str, bool]:
    """Module name -> is Conv1D, for the modules transformers may quantize (exactly nn.Linear, or Conv1D)."""
    return {n: isinstance(m, Conv1D) for n, m in meta.named_modules()
            if type(m) is torch.nn.Linear or isinstance(m, Conv1D)}


@pytest.mark.parametrize("case", FOUR_BIT)
def test_4bit_dequantize_matches_bitsandbytes(built, case):
    b = built(case)
    entries = group_tensors(b.quant.keys())
    assert sum(e.kind == "4bit" for e in entries) >= 7
    for entry in entries:
        ours = dequantize(entry, b.quant.tensor)
        assert (tuple(ours.shape), ours.dtype) == logical_shape_dtype(entry, b.quant.tensor)
        float_shape = tuple(b.float.info(entry.name).shape)
        if entry.kind == "plain":
            assert torch.equal(ours, b.float.tensor(entry.name))
            continue
        assert entry.kind == "4bit" and ours.dtype == b.dtype
        assert tuple(ours.shape) in (float_shape, float_shape[::-1])  # Conv1D: quantized as (out, in)
        assert_same_bits(ours, bnb_dequantize_4bit(b.quant.tensor(entry.name), side_tensors(entry, b.quant)))


@pytest.mark.parametrize("case", EIGHT_BIT)
def test_int8_dequantize_matches_transformers(built, case):
    b = built(case)
    entries = {e.name: e for e in group_tensors(b.quant.keys()) if e.kind == "int8"}
    ours = {name: dequantize(e, b.quant.tensor) for name, e in entries.items()}
    for name, e in entries.items():
        assert logical_shape_dtype(e, b.quant.tensor) == (tuple(b.float.info(name).shape), FP32)
        ref = bnbf.int8_vectorwise_dequant(b.quant.tensor(name), b.quant.tensor(e.keys["SCB"]))
        assert_same_bits(ours[name], ref)
    # transformers' own path (the model was never run). Its float32 result is cast to the model dtype; dtype= given
    # because its default (config.dtype) is the string "bfloat16" here and `weight.to("bfloat16")` raises.
    b.model.dequantize(dtype=b.dtype)
    for name, e in entries.items():
        theirs = b.model.get_parameter(name).detach()
        assert_same_bits(dequantize_int8(b.quant.tensor(name), b.quant.tensor(e.keys["SCB"]), dtype=b.dtype), theirs)
        assert torch.equal(ours[name].to(b.dtype), theirs)


@pytest.mark.parametrize("case", list(CASES))
def test_requantize_reproduces_transformers_checkpoint(built, case):
    b = built(case)
    _, _, kwargs = CASES[case]
    # Only what the case gives BitsAndBytesConfig: our defaults must be transformers' defaults.
    ours_names = {"bnb_4bit_quant_type": "quant_type", "bnb_4bit_use_double_quant": "double_quant",
                  "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage",
                  "llm_int8_skip_modules": "skip_modules"}
    ours_config = quantization_config(8 if kwargs.get("load_in_8bit") else 4,
                                      **{ours_names[k]: v for k, v in kwargs.items() if k in ours_names})
    assert ours_config == b.config
    parsed = parse_quantization_config(b.config)

    linears = linear_modules(b.meta)
    output_embedding = next(n for n, m in b.meta.named_modules() if m is b.meta.get_output_embeddings())
    tied = [*b.meta.all_tied_weights_keys, *b.meta.all_tied_weights_keys.values()]
    model_facts = dict(output_embedding=output_embedding, last_parameter=list(b.meta.named_parameters())[-1][0],
                       tied_parameters=tied, skip_modules=parsed.skip_modules,
                       keep_in_fp32_modules=b.meta._keep_in_fp32_modules or ())
    theirs = HfQuantizer.get_modules_to_not_convert(b.meta, parsed.skip_modules and list(parsed.skip_modules),
                                                    b.meta._keep_in_fp32_modules)
    assert skip_patterns(**model_facts) == sorted(theirs)
    skipped = modules_not_quantized(linears, **model_facts)
    quantized = {e.name.removesuffix(".weight") for e in group_tensors(b.quant.keys()) if e.kind != "plain"}
    assert quantized == set(linears) - set(skipped)
    assert ("lm_head" in quantized) == (parsed.skip_modules is not None)

    expected: dict[str, torch.Tensor] = {}
    for name in b.float.keys():
        module = name.removesuffix(".weight")
        if module not in quantized:
            expected[name] = b.float.tensor(name).to(b.dtype)
            continue
        merged = b.float.tensor(name).float()  # what a merge hands over: float32
        if parsed.bits == 8:
            expected.update(quantize_int8(module, merged, model_dtype=b.dtype, conv1d=linears[module]))
        else:
            expected.update(quantize_4bit(module, merged, model_dtype=b.dtype, quant_type=parsed.quant_type,
                                          double_quant=parsed.double_quant, quant_storage=parsed.quant_storage,
                                          conv1d=linears[module]))
    assert sorted(expected) == sorted(b.quant.keys())
    for key, ours in expected.items():
        theirs = b.quant.tensor(key)
        assert (ours.dtype, ours.shape) == (theirs.dtype, theirs.shape), key
        if ".quant_state." in key:
            assert json.loads(bytes(ours.tolist())) == json.loads(bytes(theirs.tolist())), key
        assert ours.contiguous().view(-1).view(torch.uint8).equal(theirs.reshape(-1).view(torch.uint8)), key


SYNTHETIC = [  # shape, blocksize, quant type, dtype, double quant, quant storage
    ((64, 96), 64, "nf4", BF16, True, torch.uint8),  # blocks straddle rows (bitsandbytes' AVX-512 CPU bug)
    ((5, 7), 64, "fp4", FP16, False, torch.uint8),  # odd: numel % blocksize != 0 and an odd last dimension
    ((3, 48), 32, "fp4", FP32, True, torch.float16),
    ((300, 64), 64, "nf4", FP16, True, torch.bfloat16),  # 300 blocks: two nested blocks of 256
    ((40, 100), 128, "nf4", FP32, False, torch.int8),
    ((2, 4096), 4096, "fp4", BF16, True, torch.float64),
    ((16, 8), 256, "nf4", BF16, False, torch.float32),
    ((6, 10), 32, "fp4", BF16, False, torch.uint8),  # rows of 10: bitsandbytes' scalar CPU kernel, FP4 zero is -0.0
    # 264,195 values: two of the decoder's 2^18-value chunks, the second odd-sized and ending in a short block
    ((515, 513), 64, "nf4", BF16, True, torch.uint8),
]


@pytest.mark.parametrize("shape,blocksize,quant_type,dtype,nested,storage", SYNTHETIC)
def test_4bit_dequantize_shapes_blocksizes_storage(shape, blocksize, quant_type, dtype, nested, storage):
    torch.manual_seed(1)
    weight = (torch.randn(shape) * 0.05).to(dtype)
    weight.view(-1)[::11] = 0  # exact zeros,
    weight.view(-1)[5::11] = 1e-5  # and tiny positives, which bitsandbytes' FP4 quantizer gives the "-0" code 8
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                       quant_type=quant_type, quant_storage=storage)
    side = state.as_dict(packed=True)
    key = next(k for k in side if k.startswith("quant_state."))
    parsed = parse_quant_state(side[key], key)
    assert (parsed.shape, parsed.dtype, parsed.blocksize, parsed.nested) == (shape, dtype, blocksize, nested)
    ours = dequantize_4bit(packed, side["absmax"], side["quant_map"], parsed, side.get("nested_absmax"),
                           side.get("nested_quant_map"), device="cpu")
    assert_same_bits(ours, bnb_dequantize_4bit(packed, side))
    # and it is the weight: every value within its block's quantization step of the original
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
    scale = absmax.float().repeat_interleave(blocksize)[: weight.numel()]
    assert bool(((ours.float() - weight.float()).abs().view(-1) <= 0.2 * scale + 1e-3).all())


def test_int8_formula_and_rounding_order():
    torch.manual_seed(2)
    codes, scb, _ = bnbf.int8_vectorwise_quant(torch.randn(33, 20, dtype=FP16))
    ours = dequantize_int8(codes, scb)
    assert_same_bits(ours, bnbf.int8_vectorwise_dequant(codes, scb))
    assert ours.dtype == FP32
    assert not torch.equal(ours, codes * scb.view(-1, 1) / 127)  # the order of roundings matters


# ---- errors: every one names the key and what is wrong ----

@pytest.fixture(scope="module")
def nf4_dq():
    """One double-quantized NF4 weight as its checkpoint tensors."""
    torch.manual_seed(3)
    packed, state = bnbf.quantize_4bit(torch.randn(64, 64, dtype=BF16), compress_statistics=True, quant_type="nf4")
    return {"m.weight": packed, **{f"m.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


QS_KEY = "m.weight.quant_state.bitsandbytes__nf4"


def four_bit_args(tensors):
    state = parse_quant_state(tensors[QS_KEY], QS_KEY)
    return (tensors["m.weight"], tensors["m.weight.absmax"], tensors["m.weight.quant_map"], state,
            tensors["m.weight.nested_absmax"], tensors["m.weight.nested_quant_map"])


@pytest.mark.parametrize("drop,key", [
    ("m.weight.absmax", "m.weight.absmax"),
    ("m.weight.quant_map", "m.weight.quant_map"),
    ("m.weight.nested_quant_map", "m.weight.nested_quant_map"),
    (QS_KEY, "m.weight.quant_state.bitsandbytes__nf4|fp4"),
    ("m.weight", "m.weight"),
])
def test_missing_part_names_the_key(nf4_dq, drop, key):
    with pytest.raises(BnbFormatError, match="missing") as e:
        group_tensors(k for k in nf4_dq if k != drop)
    assert e.value.key == key and str(e.value).startswith(key + ": missing")


def test_int8_missing_scb_names_the_key():
    with pytest.raises(BnbFormatError, match=r"m\.SCB: missing"):
        group_tensors(["m.weight", "m.weight_format"])
    with pytest.raises(BnbFormatError, match=r"m\.weight: missing"):
        group_tensors(["m.SCB"])


@pytest.mark.parametrize("index,bad,key,words", [
    (1, lambda t: t[:-1], "m.weight.absmax", r"must be 64 uint8 codes.*\(63,\)"),
    (2, lambda t: t[:15], "m.weight.quant_map", "16 float values"),
    (2, lambda t: bnbf.get_4bit_type("fp4", device="cpu"), "m.weight.quant_map", "not the nf4 code table"),
    (4, lambda t: torch.cat([t, t]), "m.weight.nested_absmax", "needs 1"),
    (5, lambda t: t[:128], "m.weight.nested_quant_map", "needs 256"),
    (0, lambda t: t[:-1], "m.weight", "needs 2048"),
])
def test_wrong_shapes_name_the_key(nf4_dq, index, bad, key, words):
    args = list(four_bit_args(nf4_dq))
    args[index] = bad(args[index])
    with pytest.raises(BnbFormatError, match=words) as e:
        dequantize_4bit(*args, name="m.weight")
    assert e.value.key == key


def test_non_nested_absmax_must_be_float(nf4_dq):
    packed, absmax, quant_map, state, *_ = four_bit_args(nf4_dq)
    plain = parse_quant_state(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16",
                                          "shape": [64, 64]}).encode(), QS_KEY)
    with pytest.raises(BnbFormatError, match="float tensor") as e:
        dequantize_4bit(packed, absmax, quant_map, plain, name="m.weight")
    assert e.value.key == "m.weight.absmax"


@pytest.mark.parametrize("raw,words", [
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "bflo', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "must be an object"),
    (b'{"quant_type": "int4", "blocksize": 64, "dtype": "float16", "shape": [2, 2]}', "unknown quant_type 'int4'"),
    (b'{"quant_type": "nf4", "blocksize": 0, "dtype": "float16", "shape": [2, 2]}', "blocksize"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2, 2]}', "dtype 'int8'"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": "2x2"}', "shape"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [-2, 2]}', "positive sizes"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [0, 64]}', "positive sizes"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, true]}', "positive sizes"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2], "nested_blocksize": 256}', "nested"),
    (b'{"quant_type": "fp4", "blocksize": 64, "dtype": "float16", "shape": [2, 2]}', "names another type"),
])
def test_corrupt_quant_state_names_the_key(raw, words):
    with pytest.raises(BnbFormatError, match=words) as e:
        parse_quant_state(torch.tensor(list(raw), dtype=torch.uint8), QS_KEY)
    assert e.value.key == QS_KEY and str(e.value).startswith(QS_KEY)


def test_a_quant_state_of_a_one_row_weight_is_read():
    """A dimension of 1 is a size like any other (a one-row weight, a bias-like 1-D shape)."""
    state = parse_quant_state(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float16",
                                          "shape": [1, 64]}).encode(), QS_KEY)
    assert tuple(state.shape) == (1, 64)


def test_unknown_quant_type_in_key_names_the_key():
    with pytest.raises(BnbFormatError, match="unknown quant_type 'int4'") as e:
        group_tensors(["m.weight", "m.weight.absmax", "m.weight.quant_map", "m.weight.quant_state.bitsandbytes__int4"])
    assert e.value.key == "m.weight.quant_state.bitsandbytes__int4"


def test_int8_errors_name_the_key():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(BnbFormatError, match="needs 4") as e:
        dequantize_int8(codes, torch.ones(3), name="m.weight")
    assert e.value.key == "m.SCB"
    from bitsandbytes.utils import LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING as LAYOUTS  # each layout it stores, by name

    others = [(code, name) for name, code in LAYOUTS.items() if name != "row"]
    assert len(others) == 3
    for code, name in [*others, (7, "unknown")]:
        with pytest.raises(BnbFormatError, match=rf"is {code} \({name}\)") as e:
            dequantize_int8(codes, torch.ones(4), torch.tensor(code, dtype=torch.uint8), name="m.weight")
        assert e.value.key == "m.weight_format"


@pytest.mark.parametrize("config,words", [
    ({"quant_method": "gptq"}, "quant_method"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"}, "unknown quant_type"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": True}, "exactly one"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True, "bnb_4bit_quant_storage": "int3"}, "int3"),
])
def test_bad_quantization_config(config, words):
    with pytest.raises(BnbFormatError, match=words) as e:
        parse_quantization_config(config)
    assert e.value.key.startswith("quantization_config")
