"""Running a transformers model on parity's probes with its weights loaded module by module, so memory holds one
module's weights (in float32) plus the probes' activations, whatever the model's size.

The model is built from its config with every parameter on the meta device (no memory) and its buffers real (rotary
frequencies, Gemma's embedding scale: computed from the config). Each module that owns parameters gets a pre-hook that
loads them just before it runs and a hook that drops them after, so the model's own forward — any architecture
transformers builds, no per-architecture code — runs the whole probe batch through one block at a time. In "whole"
mode the same weights are loaded up front instead: same model, same inputs, same arithmetic, so the two modes give
identical logits and "whole" is simply faster when the model fits in memory.

Weights come from callables (a checkpoint tensor read with the safetensors library, an adapter tensor, a dequantized
weight), so the caller decides where every parameter comes from; a parameter nobody provides is a refusal up front.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from converters.safetensors_in import shard_names

WeightSource = Callable[[], torch.Tensor]


class LayerwiseError(ValueError):
    """The model cannot be run layer by layer (a parameter without a source, or used outside its module)."""


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile lands on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:  # an already-meta parameter is kept: ties stay ties
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def skeleton(folder: Path) -> nn.Module:
    """The architecture of the model in ``folder`` (config.json only; never remote code), parameters on meta."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return model.eval()


class CheckpointTensors:
    """The tensors of a safetensors checkpoint folder, read with the safetensors library (not our own reader, so a
    bug there cannot hide in parity), as float32, one at a time. Each read opens the file and closes it again: the
    library reads through a memory map, and a map kept open leaves every page read in the process's resident memory
    (measured: +166 MB of RSS over one pass of a 150 MB model)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for name in shard_names(folder):
            with safe_open(str(folder / name), framework="pt") as handle:
                self._where.update({key: folder / name for key in handle.keys()})

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def source(self, name: str) -> WeightSource:
        def read() -> torch.Tensor:
            from safetensors import safe_open

            with safe_open(str(self._where[name]), framework="pt") as handle:
                return handle.get_tensor(name).to(torch.float32)

        return read


def checkpoint_sources(model: nn.Module, tensors: CheckpointTensors) -> dict[str, WeightSource]:
    """For every parameter name (tied ones included), its checkpoint tensor: a parameter shared between modules (tied
    embeddings) is stored under one of its names."""
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    sources: dict[str, WeightSource] = {}
    for names in names_of.values():
        stored = next((n for n in names if n in tensors), None)
        if stored is not None:
            sources.update({n: tensors.source(stored) for n in names})
    return sources


def set_meta_parameter(model: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    """Give one parameter its own (meta) tensor of ``shape``: a replacement that may also resize it (added tokens),
    breaking a tie exactly as PEFT's ModulesToSaveWrapper does."""
    module_path, attr = name.rsplit(".", 1)
    module = model.get_submodule(module_path)
    setattr(module, attr, nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    if attr == "weight" and isinstance(module, nn.Embedding):
        module.num_embeddings = shape[0]
    elif attr == "weight" and isinstance(module, nn.Linear):
        module.out_features, module.in_features = shape


class LoadedWeights:
    """Attaches weights to a skeleton: all at once ("whole") or per module, just in time ("streamed")."""

    def __init__(self, model: nn.Module, sources: dict[str, WeightSource], mode: str, device: torch.device,
                 on_module: Callable[[], None] | None = None) -> None:
        self.model, self.sources, self.device, self.on_module = model, sources, device, on_module
        self.modules = [(path, module) for path, module in model.named_modules()
                        if any(p is not None for p in module._parameters.values())]
        missing = [f"{path}.{attr}" if path else attr for path, module in self.modules
                   for attr, p in module._parameters.items() if p is not None
                   and (f"{path}.{attr}" if path else attr) not in sources]
        if missing:
            raise LayerwiseError(f"no weights for {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)"
                                                                              if len(missing) > 3 else ""))
        for module in model.modules():  # buffers only: the parameters are still on meta
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        if mode == "whole":
            for path, module in self.modules:
                self._load(path, module)
        elif mode == "streamed":
            for path, module in self.modules:
                module.register_forward_pre_hook(lambda m, args, path=path: self._load(path, m))
                module.register_forward_hook(lambda m, args, out, path=path: self._drop(m), always_call=True)
        else:
            raise ValueError(f"mode {mode!r}")

    def _load(self, path: str, module: nn.Module) -> None:
        for attr, param in list(module._parameters.items()):
            if param is not None:
                name = f"{path}.{attr}" if path else attr
                value = self.sources[name]().to(self.device, torch.float32)
                if tuple(value.shape) != tuple(param.shape):
                    raise LayerwiseError(f"{name} is {tuple(value.shape)} in the checkpoint, {tuple(param.shape)} in "
                                         "the model")
                module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        if self.on_module is not None:
            self.on_module()

    @staticmethod
    def _drop(module: nn.Module) -> None:
        for attr, param in list(module._parameters.items()):
            if param is not None and not param.is_meta:
                module._parameters[attr] = nn.Parameter(param.to("meta"), requires_grad=False)


def return_freed_memory_to_the_os() -> None:
    """Make glibc serve allocations of 128 KiB and more with their own mappings, returned to the system when freed.
    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB) and keeps such blocks in
    its heap afterwards, so loading one module's weights after another grows the heap with the model (measured:
    streamed parity's peak RSS 1.23x as the model doubled; 1.07x with this). Linux/glibc only; elsewhere a no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:
        M_MMAP_THRESHOLD = -3
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def batch_of(probes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: in a causal model a real position sees only earlier, real positions, so
    padding after it changes nothing, and every probe runs in one forward (one pass over the weights)."""
    length = max(len(p) for p in probes)
    ids = torch.zeros(len(probes), length, dtype=torch.long)
    mask = torch.zeros(len(probes), length, dtype=torch.long)
    for row, probe in enumerate(probes):
        ids[row, : len(probe)] = probe
        mask[row, : len(probe)] = 1
    return ids, mask


@torch.no_grad()
def probe_logits(model: nn.Module, probes: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """(total positions, vocab) float32 logits of every probe, from one batched forward."""
    ids, mask = batch_of(probes)
    try:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    except (NotImplementedError, RuntimeError) as e:
        if "meta" in str(e):
            raise LayerwiseError(f"a weight is used outside the module that owns it ({e})") from e
        raise
    return torch.cat([logits[row, : len(p)].to(torch.float32).cpu() for row, p in enumerate(probes)])


def count_weighted_modules(model: nn.Module) -> int:
    return sum(1 for _, m in model.named_modules() if any(p is not None for p in m._parameters.values()))
