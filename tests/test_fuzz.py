"""A seeded corpus of malformed inputs: every one ends with exit 0 and a complete output, or exit 2 and one error line
naming the file — never a traceback, never an internal error, never anything half-written beside --out. The
hand-picked wrong types and values must exit 2, naming the file and the key: with parity off, an input read wrongly
(a string rank, a null alpha taken for the default) would otherwise pass unnoticed. Random byte flips may land
anywhere harmless, so they may also end with exit 0.

Mutations of the base's safetensors header, the adapter's safetensors header, adapter_config.json, config.json,
tokenizer.json, tokenizer_config.json and the shard index: random byte flips (seeded) and hand-picked wrong types and
values. The run exports safetensors and GGUF (so the tokenizer is read too) with parity off, to stay fast.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import build_peft_adapter
from exporter.cli import main

SEED = 20261130
Mutation = Callable[[Path, Path], None]  # (base folder, adapter folder) -> None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exporter.demo import build_tokenizer

    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    build_tokenizer(base, vocab_size=128, family="llama-bpe")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(base, max_shard_size="30kB")
    adapter = build_peft_adapter(root / "adapter", base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


# -- mutation makers -------------------------------------------------------------------------------------------------
def _json_file(folder: str, name: str, change: Callable[[object], object]) -> Mutation:
    def mutate(base: Path, adapter: Path) -> None:
        path = (base if folder == "base" else adapter) / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return mutate


def _set(key: str, value: object) -> Callable[[dict], dict]:
    return lambda data: {**data, key: value}


def _raw(folder: str, name: str, data: bytes) -> Mutation:
    def mutate(base: Path, adapter: Path) -> None:
        ((base if folder == "base" else adapter) / name).write_bytes(data)
    return mutate


def _first_shard(base: Path) -> Path:
    return base / sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]


def _header(folder: str, change: Callable[[dict], object]) -> Mutation:
    """Rewrite a safetensors header (the base's first shard or the adapter's file), data left as it was."""
    def mutate(base: Path, adapter: Path) -> None:
        path = _first_shard(base) if folder == "base" else adapter / "adapter_model.safetensors"
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8:8 + n])
        encoded = json.dumps(change(header)).encode()
        encoded += b" " * (-len(encoded) % 8)
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + n:])
    return mutate


def _entry(field: str, value: object) -> Callable[[dict], dict]:
    def change(header: dict) -> dict:
        name = next(k for k in header if k != "__metadata__")
        header[name] = {**header[name], field: value}
        return header
    return change


def _flips(folder: str, rng: random.Random, count: int) -> Mutation:
    """Random bytes of a safetensors header (length field included) replaced."""
    positions = [rng.random() for _ in range(count)]
    values = [rng.randrange(256) for _ in range(count)]

    def mutate(base: Path, adapter: Path) -> None:
        path = _first_shard(base) if folder == "base" else adapter / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        n = min(struct.unpack("<Q", data[:8])[0] + 8, len(data))
        for position, value in zip(positions, values):
            data[int(position * n)] = value
        path.write_bytes(bytes(data))
    return mutate


def _text_flips(folder: str, name: str, rng: random.Random, count: int) -> Mutation:
    positions = [rng.random() for _ in range(count)]
    values = [rng.choice(b'{}[]":,0-9ae \\\x00\xff') for _ in range(count)]

    def mutate(base: Path, adapter: Path) -> None:
        path = (base if folder == "base" else adapter) / name
        data = bytearray(path.read_bytes())
        for position, value in zip(positions, values):
            data[int(position * len(data))] = value
        path.write_bytes(bytes(data))
    return mutate


def corpus(refusals: dict[str, tuple[str, ...]] | None = None) -> dict[str, Mutation]:
    """The cases by name; ``refusals`` is filled with the hand-picked ones, each with what its error line must name."""
    rng = random.Random(SEED)
    cases: dict[str, Mutation] = {}
    refusals = {} if refusals is None else refusals
    for i in range(12):
        cases[f"base header, {i + 1} random bytes"] = _flips("base", rng, 1 + i % 4)
        cases[f"adapter header, {i + 1} random bytes"] = _flips("adapter", rng, 1 + i % 4)
    for name, folder in (("adapter_config.json", "adapter"), ("config.json", "base"), ("tokenizer_config.json", "base"),
                         ("model.safetensors.index.json", "base")):
        for i in range(6):
            cases[f"{name}, {i + 1} random characters"] = _text_flips(folder, name, rng, 1 + i)
    cases["tokenizer.json, 3 random characters"] = _text_flips("base", "tokenizer.json", rng, 3)
    header_values = {
        "header is a list": lambda h: [h], "shape is a string": _entry("shape", "4,32"),
        "shape negative": _entry("shape", [-4, 32]), "shape of floats": _entry("shape", [4.0, 32.0]),
        "shape huge": _entry("shape", [2**40, 2**40]), "dtype unknown": _entry("dtype", "F33"),
        "dtype a number": _entry("dtype", 7), "offsets reversed": _entry("data_offsets", [64, 0]),
        "offsets past the end": _entry("data_offsets", [0, 2**40]), "offsets a string": _entry("data_offsets", "0-64"),
        "offsets of one": _entry("data_offsets", [0]), "entry a list": lambda h: {**h, "x.weight": [1, 2]},
        "metadata a list": lambda h: {**h, "__metadata__": ["pt"]},
        "metadata not strings": lambda h: {**h, "__metadata__": {"format": 1}},
    }
    for what, change in header_values.items():
        cases[f"base header: {what}"] = _header("base", change)
        cases[f"adapter header: {what}"] = _header("adapter", change)
        refusals[f"base header: {what}"] = ("/base/model-", ".safetensors")
        refusals[f"adapter header: {what}"] = ("/adapter/adapter_model.safetensors",)
    adapter_config = {"r a string": ("r", "4"), "r negative": ("r", -4), "r zero": ("r", 0), "r a float": ("r", 4.5),
                      "r a bool": ("r", True), "lora_alpha a string": ("lora_alpha", "8"),
                      "lora_alpha null": ("lora_alpha", None), "use_rslora a string": ("use_rslora", "yes"),
                      "rank_pattern a list": ("rank_pattern", [4]), "rank_pattern bad regex": ("rank_pattern", {"(": 4}),
                      "rank_pattern value a string": ("rank_pattern", {"q_proj": "4"}),
                      "alpha_pattern value a string": ("alpha_pattern", {"v_proj": "x"}),
                      "target_modules a number": ("target_modules", 5), "peft_type a number": ("peft_type", 7),
                      "modules_to_save a string": ("modules_to_save", "lm_head"),
                      "fan_in_fan_out a number": ("fan_in_fan_out", 1)}
    for what, (key, value) in adapter_config.items():
        cases[f"adapter_config.json: {what}"] = _json_file("adapter", "adapter_config.json", _set(key, value))
        refusals[f"adapter_config.json: {what}"] = ("/adapter/adapter_config.json", key)
    model_config = {"model_type a number": ("model_type", 5), "architectures a string": ("architectures", "Llama"),
                    "tie_word_embeddings a string": ("tie_word_embeddings", "no"),
                    "vocab_size a string": ("vocab_size", "128"), "hidden_size negative": ("hidden_size", -1),
                    "heads zero": ("num_attention_heads", 0), "text_config a list": ("text_config", []),
                    "quantization_config a string": ("quantization_config", "bnb"),
                    "rms_norm_eps a string": ("rms_norm_eps", "x"), "rope_scaling a list": ("rope_scaling", [1]),
                    "max_position_embeddings null": ("max_position_embeddings", None)}
    for what, (key, value) in model_config.items():
        cases[f"config.json: {what}"] = _json_file("base", "config.json", _set(key, value))
        refusals[f"config.json: {what}"] = ("/base/config.json", key)
    cases["config.json: a list"] = _json_file("base", "config.json", lambda c: [c])
    cases["adapter_config.json: a list"] = _json_file("adapter", "adapter_config.json", lambda c: [c])
    refusals["config.json: a list"] = ("/base/config.json",)
    refusals["adapter_config.json: a list"] = ("/adapter/adapter_config.json",)
    tokenizer_json = {
        "a list": lambda t: [t], "vocab a list of numbers": lambda t: {**t, "model": {**t["model"], "vocab": [1, 2]}},
        "vocab ids strings": lambda t: {**t, "model": {**t["model"], "vocab": {"a": "0"}}},
        "added_tokens an object": lambda t: {**t, "added_tokens": {"<s>": 0}},
        "added token id negative": lambda t: {**t, "added_tokens": [{"id": -1, "content": "x"}]},
        "model a string": lambda t: {**t, "model": "BPE"},
    }
    for what, change in tokenizer_json.items():
        cases[f"tokenizer.json: {what}"] = _json_file("base", "tokenizer.json", change)
        # A vocabulary the id check accepts but the tokenizers library cannot read is named by its folder only.
        refusals[f"tokenizer.json: {what}"] = ("/base",)
    tokenizer_config = {"chat_template a number": ("chat_template", 5), "bos_token a list": ("bos_token", [1]),
                        "tokenizer_class a number": ("tokenizer_class", 3),
                        "added_tokens_decoder a list": ("added_tokens_decoder", [1])}
    for what, (key, value) in tokenizer_config.items():
        cases[f"tokenizer_config.json: {what}"] = _json_file("base", "tokenizer_config.json", _set(key, value))
        refusals[f"tokenizer_config.json: {what}"] = ("/base/tokenizer_config.json", key)
    index = {"weight_map a list": lambda i: {**i, "weight_map": []},
             "weight_map values numbers": lambda i: {**i, "weight_map": {k: 1 for k in i["weight_map"]}},
             "names a missing file": lambda i: {**i, "weight_map": {**i["weight_map"], "x": "nowhere.safetensors"}},
             "a path outside the folder": lambda i: {**i, "weight_map": {**i["weight_map"],
                                                                          "x": "../base/config.json"}},
             "a list": lambda i: [i]}
    for what, change in index.items():
        cases[f"shard index: {what}"] = _json_file("base", "model.safetensors.index.json", change)
        refusals[f"shard index: {what}"] = ("/base/model.safetensors.index.json",)
    for folder, name in (("adapter", "adapter_config.json"), ("base", "config.json"), ("base", "tokenizer.json"),
                         ("base", "tokenizer_config.json"), ("base", "model.safetensors.index.json")):
        cases[f"{name}: not UTF-8"] = _raw(folder, name, b"\xff\xfe{\x00")
        cases[f"{name}: empty"] = _raw(folder, name, b"")
        cases[f"{name}: nested 100000 deep"] = _raw(folder, name, b"[" * 100000)
        for what in ("not UTF-8", "empty", "nested 100000 deep"):
            refusals[f"{name}: {what}"] = (f"/{folder}/{name}",)
    return cases


MUST_REFUSE: dict[str, tuple[str, ...]] = {}
CORPUS = corpus(MUST_REFUSE)


def test_the_corpus_is_large_and_seeded():
    assert len(CORPUS) >= 100
    assert list(corpus()) == list(CORPUS)
    # Every case but the random flips is one that must be refused.
    assert set(MUST_REFUSE) == {case for case in CORPUS if "random" not in case}


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_input_ends_cleanly(inputs, tmp_path, case):
    base = Path(shutil.copytree(inputs[0], tmp_path / "base"))
    adapter = Path(shutil.copytree(inputs[1], tmp_path / "adapter"))
    CORPUS[case](base, adapter)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["-q", "run", "--base", str(base), "--adapter", str(adapter), "--out", str(out),
                                       "--to", "safetensors,gguf:f32", "--parity", "off", "--no-progress"])
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    assert result.exit_code in ((2,) if case in MUST_REFUSE else (0, 2)), (result.exit_code, result.output,
                                                                         result.exception)
    if result.exit_code == 0:
        assert (out / "report.json").is_file() and (out / "model-F32.gguf").is_file()
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()
    else:
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Fix:" in errors[0], result.output
        for text in MUST_REFUSE.get(case, ()):
            assert text in errors[0], (text, errors[0])
        assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")], "left beside --out"
