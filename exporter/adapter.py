"""Reading a PEFT LoRA adapter: its config, its tensors and the scale of every adapted module.

Pure data: no torch modules are built here. Tensors are read lazily from the adapter file when asked for.
PEFT saves keys as ``base_model.model.<module>.<part>`` with the adapter name stripped, where <part> is
``lora_A.weight`` / ``lora_B.weight`` (Linear, Conv1D), ``lora_B.bias`` (lora_bias), ``lora_embedding_A`` /
``lora_embedding_B`` (Embedding), ``lora_magnitude_vector`` (DoRA), ``base_layer.weight`` (embedding layers saved
beside their LoRA, e.g. after a vocab resize), or ``[modules_to_save.]weight`` / ``bias`` (modules_to_save: full
replacements).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from converters.safetensors_in import SafetensorsError, SafetensorsFile
from converters.safetensors_out import FileSlice
from exporter.errors import InputError
from exporter.schemas import check_adapter_config, read_json_object

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Config keys that change the model in ways a weight merge cannot express: refuse them rather than merge wrongly.
_UNSUPPORTED_CONFIG = {
    "layer_replication": "duplicates layers of the base model",
    "target_parameters": "puts LoRA on raw parameters (MoE experts)",
    "trainable_token_indices": "trains selected token rows (trainable tokens)",
}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of the base model and everything needed to merge it."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear" or "embedding"
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    magnitude_key: str | None = None  # DoRA
    b_bias_key: str | None = None  # lora_bias=True: B carries a bias merged into the base bias
    base_override_key: str | None = None  # PEFT saved the base layer's own weight (e.g. a resized embedding)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def is_dora(self) -> bool:
        return self.magnitude_key is not None


def pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """PEFT's rank_pattern/alpha_pattern matching: a key matches when it is a regex for a dotted suffix of the name.

    Mirrors ``peft.utils.other.get_pattern_key``: the first key for which ``(.*\\.)?(key)$`` matches wins.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def compute_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """s = α/r, or α/√r for rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class Adapter:
    path: Path
    weights_file: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by module name
    replacements: dict[str, str]  # base tensor name -> adapter key (modules_to_save and saved biases)
    _tensors: Any = field(repr=False, default=None)  # SafetensorsFile, or a dict from a pickle

    # -- config facts ---------------------------------------------------------------------------------------------
    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def tensor(self, key: str) -> torch.Tensor:
        if isinstance(self._tensors, dict):
            return self._tensors[key]
        return self._tensors.tensor(key)

    def release(self, *keys: str) -> None:
        """Drop these tensors' pages from this process's resident memory once they are used (they stay cached)."""
        if isinstance(self._tensors, SafetensorsFile):
            for key in keys:
                self._tensors.release(key)

    def raw(self, key: str) -> FileSlice | None:
        """Where the tensor's bytes are in adapter_model.safetensors (None for a pickle: nothing to copy from)."""
        if isinstance(self._tensors, SafetensorsFile):
            info = self._tensors.info(key)
            return FileSlice(self._tensors.path, info.begin, info.nbytes)
        return None

    def shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self._tensors, dict):
            return tuple(self._tensors[key].shape)
        return self._tensors.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        if isinstance(self._tensors, dict):
            return self._tensors[key].dtype
        return self._tensors.info(key).torch_dtype


def _read_config(folder: Path) -> dict[str, Any]:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise InputError(str(config_path), "adapter_config.json is missing, so this is not a PEFT adapter folder.",
                         "point --adapter at the folder written by PEFT's save_pretrained.")
    config = read_json_object(config_path, "restore the adapter_config.json PEFT wrote.")
    check_adapter_config(config_path, config)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InputError(str(config_path), f"peft_type is {peft_type}; lora-export merges LoRA adapters only.",
                         "use an adapter trained with LoraConfig.")
    for key, why in _UNSUPPORTED_CONFIG.items():
        if config.get(key):
            raise InputError(str(config_path), f"'{key}' is set: it {why}, which a weight merge cannot reproduce.",
                             "merge this adapter with PEFT itself.")
    return config


def _open_weights(folder: Path, allow_pickle: bool) -> tuple[Path, Any]:
    st_path = folder / SAFETENSORS_NAME
    if st_path.is_file():
        try:
            return st_path, SafetensorsFile(st_path)
        except SafetensorsError as e:
            raise InputError(str(st_path), f"cannot be read as safetensors ({e}).",
                             "re-save the adapter; the file may be truncated or still downloading.") from e
    bin_path = folder / PICKLE_NAME
    if bin_path.is_file():
        if not allow_pickle:
            raise InputError(str(bin_path), "is a pickle file, and loading pickles can run arbitrary code.",
                             "re-save the adapter as safetensors, or pass --allow-pickle if you trust its source.")
        try:
            # weights_only refuses anything but tensors and plain containers even when the user allowed pickles.
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a bad pickle
            # torch's message is a page long; the line that says what it met is the one worth showing.
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            detail = next((line.removeprefix("WeightsUnpickler error: ").split(". Please")[0] for line in lines
                           if "Unsupported" in line), lines[0] if lines else f"{type(e).__name__}: it ends early")
            if detail.startswith("Unsupported global"):
                raise InputError(str(bin_path), "holds objects other than tensors, which lora-export never unpickles "
                                 f"(torch's weights_only loader refused it: {detail}).",
                                 "re-save the adapter's tensors as safetensors.") from e
            raise InputError(str(bin_path), f"cannot be loaded ({detail}).", "re-save the adapter.") from e
        return bin_path, tensors
    raise InputError(str(folder), f"holds neither {SAFETENSORS_NAME} nor {PICKLE_NAME}.",
                     "point --adapter at the folder written by PEFT's save_pretrained.")


def _classify_keys(keys: list[str], where: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Group adapter keys by module: {module: {part: key}}, plus full replacement tensors {tensor name: key}."""
    parts = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
             "lora_magnitude_vector", "lora_magnitude_vector.weight", "base_layer.weight")
    by_module: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        # PEFT 0.21 saves a modules_to_save layer under its plain name, "<module>.weight"; an adapter may instead carry
        # the trained copy as "<module>.modules_to_save.weight" beside the resized, untrained "<module>.weight"
        # (after a vocab resize): the trained copy wins, whatever the order.
        trained_copy = ".modules_to_save." in name
        name = name.replace(".modules_to_save.", ".")
        if ".original_module." in name:
            continue  # PEFT's copy of the untrained module, kept for unmerging; the merged model does not use it
        for part in parts:
            if name.endswith("." + part):
                module = name[: -len(part) - 1]
                by_module.setdefault(module, {})[part.replace(".weight", "") if "magnitude" in part else part] = key
                break
        else:
            if ".lora_" in name or "trainable_tokens" in name:
                unknown.append(key)
            elif name.endswith(".weight") or name.endswith(".bias"):
                if trained_copy or name not in replacements:
                    replacements[name] = key
            else:
                unknown.append(key)
    if unknown:
        raise InputError(where, f"holds tensors lora-export does not know how to merge: {', '.join(unknown[:5])}"
                         + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "") + ".",
                         "merge this adapter with PEFT itself, or open an issue with its adapter_config.json.")
    return by_module, replacements


@dataclass
class _Scaling:
    """The config's rank and α for each module (rank_pattern / alpha_pattern over the defaults), remembering which
    pattern keys matched something."""

    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    default_r: int
    default_alpha: float
    use_rslora: bool
    used_rank_keys: set[str] = field(default_factory=set)
    used_alpha_keys: set[str] = field(default_factory=set)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Scaling:
        # PEFT's LoraConfig defaults where a key is absent: r=8, lora_alpha=8, use_rslora=False (a null use_rslora too;
        # a null r or lora_alpha PEFT cannot load, and check_adapter_config refused it).
        return cls(rank_pattern=config.get("rank_pattern") or {},
                   alpha_pattern=config.get("alpha_pattern") or {},
                   default_r=int(config["r"]) if config.get("r") is not None else 8,
                   default_alpha=float(config["lora_alpha"]) if config.get("lora_alpha") is not None else 8.0,
                   use_rslora=bool(config.get("use_rslora")))

    def rank_alpha(self, module: str) -> tuple[int, float, str | None]:
        """(rank, α, the rank_pattern key that set the rank or None) for this module."""
        r_key = pattern_key(list(self.rank_pattern), module)
        a_key_pat = pattern_key(list(self.alpha_pattern), module)
        if r_key is not None:
            self.used_rank_keys.add(r_key)
        if a_key_pat is not None:
            self.used_alpha_keys.add(a_key_pat)
        rank = int(self.rank_pattern[r_key]) if r_key is not None else self.default_r
        alpha = float(self.alpha_pattern[a_key_pat]) if a_key_pat is not None else self.default_alpha
        return rank, alpha, r_key

    def unused(self) -> list[str]:
        unused = [f"rank_pattern '{k}'" for k in self.rank_pattern if k not in self.used_rank_keys]
        unused += [f"alpha_pattern '{k}'" for k in self.alpha_pattern if k not in self.used_alpha_keys]
        return unused


def _lora_pair(module: str, parts: dict[str, str], where: str) -> tuple[str, str, str] | None:
    """(kind, A key, B key) of a module's LoRA; None for a saved base layer without LoRA on it."""
    if "lora_A.weight" in parts and "lora_B.weight" in parts:
        return "linear", parts["lora_A.weight"], parts["lora_B.weight"]
    if "lora_embedding_A" in parts and "lora_embedding_B" in parts:
        return "embedding", parts["lora_embedding_A"], parts["lora_embedding_B"]
    if set(parts) == {"base_layer.weight"}:
        return None
    raise InputError(where, f"module '{module}' has {sorted(parts)} but not a complete A/B pair.",
                     "re-save the adapter; the file is incomplete.")


def _lora_module(adapter: Adapter, module: str, parts: dict[str, str], pair: tuple[str, str, str],
                 scaling: _Scaling) -> LoraModule:
    """One adapted module with its rank, α and scale, checked against its tensors."""
    kind, a_key, b_key = pair
    where = str(adapter.weights_file)
    rank, alpha, r_key = scaling.rank_alpha(module)
    a_shape = adapter.shape(a_key)
    if a_shape[0] != rank:
        raise InputError(where, f"module '{module}' has rank {a_shape[0]} in its tensors, but the "
                         f"config gives r={rank}" + (f" (rank_pattern key '{r_key}')" if r_key else "") + ".",
                         "fix r / rank_pattern in adapter_config.json to what the adapter was trained with.")
    magnitude_key = parts.get("lora_magnitude_vector")
    if magnitude_key is not None and kind == "embedding":
        raise InputError(where, f"module '{module}' uses DoRA on an embedding, which lora-export "
                         "does not merge yet.", "merge this adapter with PEFT itself.")
    return LoraModule(
        name=module, kind=kind, rank=rank, alpha=alpha, scale=compute_scale(alpha, rank, scaling.use_rslora),
        a_key=a_key, b_key=b_key, magnitude_key=magnitude_key, b_bias_key=parts.get("lora_B.bias"),
        base_override_key=parts.get("base_layer.weight"),
    )


def _add_modules(adapter: Adapter, by_module: dict[str, dict[str, str]], scaling: _Scaling) -> None:
    """Fill adapter.modules, in module name order; a saved base layer without LoRA joins adapter.replacements."""
    for module, parts in sorted(by_module.items()):
        pair = _lora_pair(module, parts, str(adapter.weights_file))
        if pair is None:
            # A saved base layer without LoRA on it is a full replacement of that weight.
            adapter.replacements[f"{module}.weight"] = parts["base_layer.weight"]
            continue
        adapter.modules[module] = _lora_module(adapter, module, parts, pair, scaling)


def _check_complete(adapter: Adapter, scaling: _Scaling) -> None:
    """What the config promises (DoRA, pattern keys) is in the tensors, and there are tensors to merge at all."""
    if adapter.config.get("use_dora") and not any(m.is_dora for m in adapter.modules.values()):
        raise InputError(str(adapter.weights_file), "adapter_config.json says use_dora but no lora_magnitude_vector "
                         "is saved.", "re-save the adapter with PEFT.")
    # A pattern key that matches nothing is almost always a typo, and PEFT ignores it silently (peft #3582).
    unused = scaling.unused()
    if unused:
        raise InputError(str(adapter.path / CONFIG_NAME), f"{', '.join(unused)} match(es) no adapted module.",
                         "correct the key (it is a regex matched against the end of module names such as "
                         f"'{next(iter(adapter.modules), 'model.layers.0.self_attn.q_proj')}').")
    if not adapter.modules and not adapter.replacements:
        raise InputError(str(adapter.weights_file), "holds no LoRA tensors.", "check that training saved the adapter.")


def load_adapter(folder: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA adapter folder and resolve the rank, α and scale of every adapted module."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(str(folder), "is not a folder.", "pass the folder that holds adapter_config.json.")
    config = _read_config(folder)
    weights_file, tensors = _open_weights(folder, allow_pickle)
    by_module, replacements = _classify_keys(list(tensors.keys()), str(weights_file))
    scaling = _Scaling.from_config(config)
    adapter = Adapter(folder, weights_file, config, {}, replacements, tensors)
    _add_modules(adapter, by_module, scaling)
    _check_complete(adapter, scaling)
    return adapter
