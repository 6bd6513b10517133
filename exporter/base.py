"""Reading the base model — a local Hugging Face folder (a Hub id is downloaded first, by exporter/hub.py) — and
presenting its tensors as the float model it stands for.

A bitsandbytes-quantized base (NF4/FP4/int8, as transformers saves it) is presented tensor by tensor as its
dequantized float values: `info` gives the logical shape and dtype, `rows`/`tensor` compute the values from the stored
codes when asked (converters/bnb), so every stage downstream sees one kind of base.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converters.safetensors_format import INDEX_NAME
from converters.safetensors_in import SafetensorsError, SafetensorsFile, ShardIndexError, TensorInfo, shard_names
from converters.safetensors_out import FileSlice
from converters.tensor_stream import tensor_rows, workspace
from exporter.errors import InputError
from exporter.schemas import check_model_config, read_json_object

# Quantization methods a base may declare in config.json that lora-export cannot read (bitsandbytes it can).
_OTHER_QUANTIZATION = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "compressed-tensors": "compressed-tensors",
                       "hqq": "HQQ", "torchao": "torchao", "aqlm": "AQLM", "eetq": "EETQ", "quanto": "quanto",
                       "exl2": "EXL2", "gguf": "GGUF", "bitnet": "BitNet", "fbgemm_fp8": "FBGEMM FP8",
                       "higgs": "HIGGS", "vptq": "VPTQ", "spqr": "SpQR", "auto-round": "AutoRound"}


def local_folder(spec: str, what: str, marker: str) -> Path:
    """The folder ``spec`` names (Hub ids are fetched by exporter/hub.py before this is asked)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(spec, f"is a file; the {what} must be a folder.", f"pass the folder that holds {marker}.")
    raise InputError(spec, f"no such folder for the {what}, and not a Hub id (org/name or org/name@revision).",
                     f"pass the folder that holds {marker}, or its Hub id.")


@dataclass(frozen=True)
class BaseTensor:
    """One tensor of the float model: its name, logical shape and the dtype of its values, and where it is stored
    (``quantized``: the bitsandbytes parts it is computed from, else it is stored as it is)."""

    name: str
    shape: tuple[int, ...]
    torch_dtype: torch.dtype
    file: SafetensorsFile
    quantized: Any = None  # converters.bnb.LogicalTensor

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass
class BaseModel:
    path: Path
    config: dict[str, Any]
    files: list[SafetensorsFile]
    tensors: dict[str, BaseTensor] = field(default_factory=dict)  # in file order
    quantization: Any = None  # converters.bnb.BnbConfig for a bitsandbytes base
    _file_of: dict[str, SafetensorsFile] = field(default_factory=dict, repr=False)  # every stored key -> its file

    def info(self, name: str) -> BaseTensor:
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers defaults tie_word_embeddings to True for most architectures when the key is absent.
        text = self.config.get("text_config") or {}
        return bool(self.config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))

    @property
    def dtype_name(self) -> str | None:
        return self.config.get("dtype") or self.config.get("torch_dtype")

    def stored(self, key: str) -> torch.Tensor:
        """A stored tensor by its checkpoint key (a zero-copy view)."""
        return self._file_of[key].tensor(key)

    def stored_info(self, key: str) -> TensorInfo:
        """A stored tensor's header entry (dtype, shape, where its bytes are), without reading it."""
        return self._file_of[key].info(key)

    def file_of(self, key: str) -> Path:
        """The shard a checkpoint key is stored in."""
        return self._file_of[key].path

    def tensor(self, name: str, device: torch.device | None = None, reuse: bool = False) -> torch.Tensor:
        """The float values: a zero-copy view of a stored tensor, or a dequantized one. ``reuse``: decode into this
        thread's reused buffer (valid until its next ``reuse`` call: fresh memory for every weight costs a page fault
        per 4 KB, about as much as the decoding)."""
        entry = self.tensors[name]
        if entry.quantized is None:
            return entry.file.tensor(name)
        from converters.bnb import dequantize

        out = workspace(entry.torch_dtype, entry.nbytes // entry.torch_dtype.itemsize, "dequantized") \
            if reuse and entry.quantized.kind == "4bit" and (device is None or device.type == "cpu") else None
        return dequantize(entry.quantized, self.stored, device, out=out).to(entry.torch_dtype)

    def raw(self, name: str) -> FileSlice | None:
        """Where the tensor's bytes are, when they are the tensor as it is (not for a quantized one)."""
        entry = self.tensors[name]
        if entry.quantized is not None:
            return None
        info = entry.file.info(name)
        return FileSlice(entry.file.path, info.begin, info.nbytes)

    def rows(self, name: str, rows_per_block: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        entry = self.tensors[name]
        if entry.quantized is None:
            return entry.file.rows(name, rows_per_block)
        return tensor_rows(self.tensor(name, reuse=True))(rows_per_block)

    def release(self, name: str, begin: int = 0, end: int | None = None) -> None:
        """Drop the tensor's pages (or a byte range of a stored one) from this process's resident memory."""
        entry = self.tensors[name]
        if entry.quantized is None:
            entry.file.release(name, begin, end)
        else:
            for key in entry.quantized.keys.values():
                self._file_of[key].release(key)


def _quantization(config_path: Path, config: dict[str, Any]) -> Any:
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "?")) if isinstance(qc, dict) else "?"
    if method != "bitsandbytes":
        name = _OTHER_QUANTIZATION.get(method.lower(), method)
        raise InputError(str(config_path), f"describes a {name}-quantized model, which lora-export cannot "
                         "dequantize (it reads bitsandbytes NF4/FP4/int8 bases).",
                         "merge into the unquantized base model the adapter was trained from.")
    from converters.bnb import BnbFormatError, parse_quantization_config

    try:
        return parse_quantization_config(qc)
    except BnbFormatError as e:
        raise InputError(str(config_path), f"quantization_config: {e}", "restore the config.json transformers "
                         "saved with the quantized model.") from e


def load_base(spec: str | Path) -> BaseModel:
    path = local_folder(str(spec), "base model", "config.json and *.safetensors")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(str(config_path), "is missing, so this is not a Hugging Face model folder.",
                         "point --base at the folder written by save_pretrained.")
    config = read_json_object(config_path, "restore the config.json written by save_pretrained.")
    check_model_config(config_path, config)
    quantization = _quantization(config_path, config)

    index_path = path / INDEX_NAME
    try:
        names = shard_names(path)
    except ShardIndexError as e:
        raise InputError(e.what, e.problem, e.fix) from e

    files: list[SafetensorsFile] = []
    file_of: dict[str, SafetensorsFile] = {}
    for name in names:
        shard_path = path / name
        if not shard_path.is_file():
            raise InputError(str(index_path), f"lists {name}, which does not exist.", "re-download the base model.")
        try:
            shard = SafetensorsFile(shard_path)
        except SafetensorsError as e:
            raise InputError(str(shard_path), f"cannot be read as safetensors ({e}).",
                             "re-download the base model; the file may be truncated.") from e
        files.append(shard)
        for key in shard.keys():  # in file order (read_header sorts by offset)
            file_of[key] = shard
    base = BaseModel(path, config, files, quantization=quantization, _file_of=file_of)
    if quantization is None:
        base.tensors = {key: BaseTensor(key, f.info(key).shape, f.info(key).torch_dtype, f) for key, f in file_of.items()}
    else:
        base.tensors = _logical_tensors(base, file_of)
    return base


def _logical_tensors(base: BaseModel, file_of: dict[str, SafetensorsFile]) -> dict[str, BaseTensor]:
    """The float model a bitsandbytes checkpoint stands for, every quantized weight checked now (its parts present
    and well-formed), so that bad input is refused before anything runs."""
    from converters.bnb import BnbFormatError, group_tensors, logical_shape_dtype
    from converters.bnb.format import FLOAT_DTYPES

    try:
        entries = group_tensors(file_of)
        tensors = {}
        # int8 weights dequantize in float32 and transformers' dequantize() then casts them to the model's dtype,
        # which is what a QLoRA forward on them reads: the same here.
        model_dtype = FLOAT_DTYPES.get(base.dtype_name or "", torch.float32)
        for entry in entries:
            main_key = entry.keys["tensor" if entry.kind == "plain" else "weight"]
            shape, dtype = logical_shape_dtype(entry, base.stored)
            if entry.kind == "int8":
                dtype = model_dtype
            tensors[entry.name] = BaseTensor(entry.name, tuple(shape), dtype, file_of[main_key],
                                             None if entry.kind == "plain" else entry)
        return tensors
    except BnbFormatError as e:
        where = file_of.get(getattr(e, "key", ""), None)
        raise InputError(str(where.path if where else base.path), f"{e}", "restore the quantized checkpoint "
                         "transformers saved (every shard), or merge into the unquantized base.") from e
