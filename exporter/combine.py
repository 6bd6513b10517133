"""combine: several LoRA adapters made into one adapter, which the rest of the pipeline merges and checks as it would
a single one (so every format, the streamed merge and parity work unchanged).

The methods are PEFT's, by PEFT's names and definitions (``LoraModel.add_weighted_adapter``, peft 0.21), computed here
from the adapters' own tensors in float32, without loading a model. For the adapters i with weight wᵢ and scale sᵢ
(α/r, or α/√r with rsLoRA):

  * ``sum``: ΔW = Σ wᵢ·sᵢ·BᵢAᵢ exactly, what ``merge_and_unload(adapter_names=[…])`` merges; written as PEFT's ``cat``
    (A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …], rank Σ rᵢ), which is the same sum.
  * ``cat``: the same concatenation, as PEFT computes it.
  * ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the method applied to the A factors
    and to the B factors separately, each weighted by √|wᵢsᵢ| (the sign on A's side). Not the weighted sum of the
    deltas: (Σ√wᵢAᵢ)ᵀ-style products have cross terms BᵢAⱼ. Equal ranks only.
  * ``svd`` and the ``*_svd`` forms: the method applied to the full deltas sᵢBᵢAᵢ with weights wᵢ, then a truncated
    SVD back to rank ``svd_rank`` (default: the largest input rank), optionally clamped at a quantile.

The combined adapter has PEFT's new-adapter config: r = α = the new rank (scale 1, or √r when the first adapter uses
rsLoRA, as PEFT's own combined adapter has). DARE's random masks are drawn from one generator seeded with ``seed``,
module by module in the model's module order, A's then B's, adapter by adapter: PEFT's order, so
``torch.manual_seed(seed)`` before PEFT's ``add_weighted_adapter`` gives the same masks.

``--combine-space delta`` (DeltaCombination, at the end of this file) is the other family: mergekit's task-vector
merges (task_arithmetic, ties, dare_linear, dare_ties) on each module's full ΔWᵢ, computed tensor by tensor during the
merge. Its result has no adapter form (it is full rank), so it is merged, never written as an adapter.

Not combined (one clear error each): DoRA adapters, modules_to_save / saved base layers, lora_bias, adapters that name
different base models, an adapted module whose kind or shape differs between adapters.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exporter.adapter import Adapter, LoraModule, compute_scale
from exporter.errors import InputError

# PEFT's combination types, plus "sum".
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
ADAPTER_METHODS = ("sum", "cat", *FACTOR_METHODS, *SVD_METHODS)
# mergekit's task-vector merges, on the full change each adapter makes to a weight (--combine-space delta).
DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
METHODS = (*ADAPTER_METHODS, "task_arithmetic")  # every name --combine takes
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune_svd")
RANDOM = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
SPACES = ("adapter", "delta")
# Where a run keeps the combined adapter as a PEFT folder (inside its staging folder; not an output)
COMBINED_ADAPTER_DIR = ".combined-adapter"


@dataclass(frozen=True)
class CombineSpec:
    """How several adapters become one: the method and its parameters (PEFT's names)."""

    method: str
    weights: tuple[float, ...] = ()  # one per adapter; empty: 1 each
    density: float | None = None
    majority_sign_method: str = "total"  # total | frequency
    svd_rank: int | None = None
    svd_clamp: float | None = None
    svd_full_matrices: bool = True
    seed: int = 0
    # "adapter": PEFT's methods on the LoRA factors (the combined model is again an adapter); "delta": mergekit's on
    # each full ΔW. None: delta for task_arithmetic (it exists only there), adapter for the rest.
    space: str | None = None

    @property
    def in_delta_space(self) -> bool:
        return self.space == "delta" or (self.space is None and self.method == "task_arithmetic")

    def check(self, n_adapters: int) -> None:
        """Bad parameters, named by their flags, before anything is read."""
        if self.method not in METHODS:
            raise InputError(f"--combine {self.method}", "is not a combination method.",
                             f"use one of {', '.join(METHODS)}.")
        if self.space is not None and self.space not in SPACES:
            raise InputError(f"--combine-space {self.space}", "is not a space.", "use adapter or delta.")
        if self.in_delta_space and self.method not in DELTA_METHODS:
            raise InputError(f"--combine {self.method} --combine-space delta", "is not a delta-space method.",
                             f"use one of {', '.join(DELTA_METHODS)} (mergekit's), or --combine-space adapter.")
        if self.in_delta_space and self.majority_sign_method != "total":
            raise InputError(f"--majority-sign-method {self.majority_sign_method}", "is an adapter-space option: "
                             "mergekit's ties and dare_ties elect signs by the total only.",
                             "drop it, or combine with --combine-space adapter.")
        if self.space == "adapter" and self.method not in ADAPTER_METHODS:
            raise InputError(f"--combine {self.method} --combine-space adapter", "is not an adapter-space method: "
                             "task arithmetic works on the full deltas.",
                             "pass --combine-space delta, or --combine sum (the same sum, kept low-rank).")
        if self.weights and len(self.weights) != n_adapters:
            raise InputError(f"--weights {','.join(f'{w:g}' for w in self.weights)}",
                             f"gives {len(self.weights)} weights for {n_adapters} adapters.",
                             "give one weight per --adapter.")
        if any(not math.isfinite(w) for w in self.weights):
            raise InputError("--weights", "holds a value that is not a finite number.", "give finite numbers.")
        if self.method in NEEDS_DENSITY:
            if self.density is None:
                raise InputError(f"--combine {self.method}", "prunes the adapters and needs --density (the fraction "
                                 "of values kept).", "pass --density, e.g. 0.5.")
            if not 0.0 < self.density <= 1.0:
                raise InputError(f"--density {self.density:g}", "must be in (0, 1].", "pass e.g. --density 0.5.")
        if self.majority_sign_method not in ("total", "frequency"):
            raise InputError(f"--majority-sign-method {self.majority_sign_method}", "is not a method.",
                             "use total or frequency.")
        if self.svd_rank is not None and self.svd_rank < 1:
            raise InputError(f"--svd-rank {self.svd_rank}", "must be at least 1.", "pass a positive rank.")
        if self.svd_clamp is not None and not 0.0 < self.svd_clamp <= 1.0:
            raise InputError(f"--svd-clamp {self.svd_clamp:g}", "is a quantile and must be in (0, 1].",
                             "pass e.g. 0.99.")

    def report(self, adapters: Sequence[Adapter], new_rank: int | None) -> dict[str, Any]:
        facts: dict[str, Any] = {"method": self.method, "space": "delta" if self.in_delta_space else "adapter",
                                 "adapters": [str(a.path) for a in adapters],
                                 "weights": list(self.resolved_weights(len(adapters))), "rank": new_rank}
        if self.in_delta_space:
            facts.update(_DELTA_DEFAULTS[self.method])
        if self.method in NEEDS_DENSITY:
            facts["density"] = self.density
        if self.method in ("ties", "dare_ties", "ties_svd", "dare_ties_svd"):
            facts["majority_sign_method"] = self.majority_sign_method
        if self.method in SVD_METHODS:
            facts.update(svd_rank=self.svd_rank, svd_clamp=self.svd_clamp, svd_full_matrices=self.svd_full_matrices)
        if self.method in RANDOM:
            facts["seed"] = self.seed
        return facts

    def resolved_weights(self, n: int) -> tuple[float, ...]:
        return self.weights or (1.0,) * n


# -- PEFT's merge primitives (peft/utils/merge_utils.py), computed the same way, operation for operation ------------
def _prune(t: torch.Tensor, density: float, method: str, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    if method == "magnitude":
        keep = torch.zeros_like(t).reshape(-1)
        keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
        return t * keep.reshape(t.shape)
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density  # DARE rescales what it keeps


def _mix(core: str, tensors: list[torch.Tensor], weights: torch.Tensor, spec: CombineSpec,
         generator: torch.Generator | None) -> torch.Tensor:
    """One of PEFT's task-tensor merges: ``core`` is linear (task arithmetic), ties, dare_linear, dare_ties or
    magnitude_prune; ``weights`` a float32 tensor, one per task tensor."""
    if core in ("ties", "magnitude_prune"):
        tensors = [_prune(t, spec.density, "magnitude", None) for t in tensors]
    elif core in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, spec.density, "random", generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if core not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # elect a sign per value (from the unweighted tensors, as PEFT does), then average the agreeing ones
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if spec.majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _core(method: str) -> str:
    return "linear" if method == "svd" else method.removesuffix("_svd")


# -- the combined adapter ----------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """One module's LoRA in each adapter that has it: (adapter index, module)."""

    present: list[tuple[int, LoraModule]] = field(default_factory=list)


def _refuse_unsupported(adapters: Sequence[Adapter]) -> None:
    for adapter in adapters:
        where = str(adapter.path / "adapter_config.json")
        if adapter.use_dora or any(m.is_dora for m in adapter.modules.values()):
            raise InputError(where, "is a DoRA adapter; combining DoRA adapters is not supported (PEFT's "
                             "add_weighted_adapter does not define it either).", "merge each DoRA adapter on its own.")
        if adapter.replacements:
            raise InputError(where, f"saves whole tensors ({', '.join(sorted(adapter.replacements)[:3])}): "
                             "modules_to_save or resized embeddings cannot be combined with other adapters yet.",
                             "combine adapters without modules_to_save, or merge this one on its own.")
        if any(m.b_bias_key or m.base_override_key for m in adapter.modules.values()):
            raise InputError(where, "carries lora_bias or saved base layers, which cannot be combined yet.",
                             "merge this adapter on its own.")
    named = {a.base_model_name for a in adapters if a.base_model_name}
    if len({n.rstrip("/").lower() for n in named}) > 1:
        listing = "; ".join(f"{a.path} names {a.base_model_name}" for a in adapters)
        raise InputError("--adapter", f"the adapters were trained on different base models ({listing}).",
                         "combine adapters of one base model.")


def _modules(adapters: Sequence[Adapter], module_order: Sequence[str] | None) -> dict[str, _Inputs]:
    """The union of the adapted modules, in the model's module order when given (else name order)."""
    names = sorted({name for a in adapters for name in a.modules})
    if module_order is not None:
        rank = {name: i for i, name in enumerate(module_order)}
        names.sort(key=lambda n: (rank.get(n, len(rank)), n))
    modules = {name: _Inputs() for name in names}
    for i, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            modules[name].present.append((i, module))
    for name, inputs in modules.items():
        (i, first), *rest = inputs.present
        a0, b0 = adapters[i].shape(first.a_key), adapters[i].shape(first.b_key)
        for j, other in rest:
            if other.kind != first.kind or adapters[j].shape(other.a_key)[1:] != a0[1:] \
                    or adapters[j].shape(other.b_key)[0] != b0[0]:
                raise InputError("--adapter", f"module '{name}' is a {first.kind} of A {a0}, B {b0} in "
                                 f"{adapters[i].path} but a {other.kind} of A {adapters[j].shape(other.a_key)}, B "
                                 f"{adapters[j].shape(other.b_key)} in {adapters[j].path}.",
                                 "combine adapters of one base model.")
    return modules


def _config_rank(adapter: Adapter) -> int:
    """The rank PEFT allocates for an adapter: r, or the largest rank_pattern value when larger."""
    pattern = adapter.config.get("rank_pattern") or {}
    return max(int(adapter.config.get("r", 8)), *(int(v) for v in pattern.values())) if pattern else \
        int(adapter.config.get("r", 8))


def new_rank(adapters: Sequence[Adapter], spec: CombineSpec) -> int:
    ranks = [_config_rank(a) for a in adapters]
    if spec.method in FACTOR_METHODS:
        if len(set(ranks)) != 1:
            listing = ", ".join(f"{a.path} r={r}" for a, r in zip(adapters, ranks))
            raise InputError(f"--combine {spec.method}", f"needs adapters of one rank, and these differ ({listing}).",
                             "use sum, cat or an *_svd method, which take different ranks.")
        return ranks[0]
    if spec.method in ("sum", "cat"):
        return sum(ranks)
    return spec.svd_rank or max(ranks)


def combine_adapters(adapters: Sequence[Adapter], spec: CombineSpec,
                     module_order: Sequence[str] | None = None) -> tuple[Adapter, dict[str, Any]]:
    """The adapters made into one Adapter (float32 tensors: sum and cat computed when asked for, from the input
    files, so memory stays at the module being merged; the other methods in memory, as they draw or prune across
    modules), and the facts the report records. ``module_order``: the base model's module names in construction
    order (PEFT's order for DARE's masks)."""
    spec.check(len(adapters))
    _refuse_unsupported(adapters)
    rank = new_rank(adapters, spec)
    weights = spec.resolved_weights(len(adapters))
    use_rslora = adapters[0].use_rslora
    scale = compute_scale(float(rank), rank, use_rslora)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, LoraModule] = {}
    sparsity: dict[str, dict[str, float]] = {}
    combined_modules = _modules(adapters, module_order)
    generator = None
    if spec.method in RANDOM:
        generator = torch.Generator().manual_seed(spec.seed)
        _draw_peft_init(generator, adapters, combined_modules, rank)
    if spec.method in ("sum", "cat"):
        return _concatenated(adapters, spec, combined_modules, rank, scale)
    for name, inputs in combined_modules.items():
        a, b = _combine_module(adapters, inputs, weights, spec, rank, generator)
        a_key, b_key = (f"{name}.lora_A.weight", f"{name}.lora_B.weight") if inputs.present[0][1].kind == "linear" \
            else (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
        tensors[a_key], tensors[b_key] = a.contiguous(), b.contiguous()
        kind = inputs.present[0][1].kind
        # PEFT's combined config says r = α = the new rank, whatever rows a module really has (cat pads with zeros)
        modules[name] = LoraModule(name=name, kind=kind, rank=a.shape[0], alpha=float(rank), scale=scale,
                                   a_key=a_key, b_key=b_key)
        if spec.method in NEEDS_DENSITY:
            sparsity[name] = {"lora_A": float((a == 0).double().mean()), "lora_B": float((b == 0).double().mean())}
    first = adapters[0]
    config = {**first.config, "r": rank, "lora_alpha": rank, "alpha_pattern": {}, "rank_pattern": {},
              "target_modules": _union_targets(adapters)}
    combined = Adapter(first.path, first.weights_file, config, modules, {}, tensors)
    facts = spec.report(adapters, rank)
    if sparsity:
        facts["per_module_sparsity"] = sparsity
    return combined, facts


class _Computed(dict):
    """Tensors computed each time they are read (Adapter.tensor reads a dict by key), never kept."""

    def __init__(self) -> None:
        super().__init__()
        self.makers: dict[str, Any] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.makers[key]()

    def __contains__(self, key: object) -> bool:
        return key in self.makers


def _concatenated(adapters: Sequence[Adapter], spec: CombineSpec, combined_modules: dict[str, _Inputs], rank: int,
                  scale: float) -> tuple[Adapter, dict[str, Any]]:
    """sum and cat: A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …] per module, computed from the inputs when read."""
    weights = spec.resolved_weights(len(adapters))
    tensors, modules = _Computed(), {}
    for name, inputs in combined_modules.items():
        kind = inputs.present[0][1].kind
        a_key, b_key = (f"{name}.lora_A.weight", f"{name}.lora_B.weight") if kind == "linear" \
            else (f"{name}.lora_embedding_A", f"{name}.lora_embedding_B")
        tensors.makers[a_key] = lambda inputs=inputs: _combine_module(adapters, inputs, weights, spec, rank, None)[0]
        tensors.makers[b_key] = lambda inputs=inputs: _combine_module(adapters, inputs, weights, spec, rank, None)[1]
        module_rank = sum(adapters[i].shape(m.a_key)[0] for i, m in inputs.present)
        modules[name] = LoraModule(name=name, kind=kind, rank=module_rank, alpha=float(rank), scale=scale,
                                   a_key=a_key, b_key=b_key)
    first = adapters[0]
    config = {**first.config, "r": rank, "lora_alpha": rank, "alpha_pattern": {}, "rank_pattern": {},
              "target_modules": _union_targets(adapters)}
    return Adapter(first.path, first.weights_file, config, modules, {}, tensors), spec.report(adapters, rank)


def _union_targets(adapters: Sequence[Adapter]) -> Any:
    return sorted({t for a in adapters for t in (a.config.get("target_modules") or [])
                   if isinstance(a.config.get("target_modules"), list)}) or adapters[0].config.get("target_modules")


def _draw_peft_init(generator: torch.Generator, adapters: Sequence[Adapter], modules: dict[str, _Inputs],
                    rank: int) -> None:
    """The random numbers PEFT draws before DARE's masks, drawn and thrown away: add_weighted_adapter first builds the
    new adapter on every module (in module order): nn.Linear(in, r) and nn.Linear(r, out) each initialise their
    weight uniformly, then PEFT re-initialises A as its config says (kaiming-uniform by default, gaussian, or not at
    all); an embedding's A and B start from randn, then B is redrawn from a normal. So the masks are PEFT's for the
    same seed."""
    init = adapters[0].config.get("init_lora_weights", True)
    for name, inputs in modules.items():
        i, module = inputs.present[0]
        fan_in = adapters[i].shape(module.a_key)[1]
        fan_out = adapters[i].shape(module.b_key)[0]
        if module.kind == "embedding":
            torch.empty(rank, fan_in).normal_(generator=generator)
            torch.empty(fan_out, rank).normal_(generator=generator)
            if init is not False:
                torch.empty(fan_out, rank).normal_(generator=generator)
            continue
        torch.empty(rank, fan_in).uniform_(generator=generator)
        torch.empty(fan_out, rank).uniform_(generator=generator)
        if init is True:
            torch.empty(rank, fan_in).uniform_(generator=generator)
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.empty(rank, fan_in).normal_(generator=generator)


def _combine_module(adapters: Sequence[Adapter], inputs: _Inputs, weights: Sequence[float], spec: CombineSpec,
                    rank: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    def a_of(i: int, m: LoraModule) -> torch.Tensor:
        a = adapters[i].tensor(m.a_key).to(torch.float32, copy=True)
        adapters[i].release(m.a_key)  # the file's pages, once copied: resident memory stays at this module
        return a

    def b_of(i: int, m: LoraModule) -> torch.Tensor:
        b = adapters[i].tensor(m.b_key).to(torch.float32, copy=True)
        adapters[i].release(m.b_key)
        return b

    method = spec.method
    if method in ("sum", "cat"):
        # PEFT's cat: A scaled by (weight, then scale), B as it is; B @ A is then Σ wᵢ·sᵢ·BᵢAᵢ
        a = torch.cat([a_of(i, m) * weights[i] * m.scale for i, m in inputs.present], dim=0)
        b = torch.cat([b_of(i, m) for i, m in inputs.present], dim=1)
        return a, b
    if method in FACTOR_METHODS:
        weights_a, weights_b = [], []
        for i, m in inputs.present:
            scaled = weights[i] * m.scale
            weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))  # the sign on one side only
            weights_b.append(math.sqrt(abs(scaled)))
        a = _mix(method, [a_of(i, m) for i, m in inputs.present], torch.tensor(weights_a), spec, generator)
        b = _mix(method, [b_of(i, m) for i, m in inputs.present], torch.tensor(weights_b), spec, generator)
        return a, b
    # the SVD forms: the method on the full deltas, then back to rank `rank`
    deltas = [(b_of(i, m) @ a_of(i, m)) * m.scale for i, m in inputs.present]
    delta = _mix(_core(method), deltas, torch.tensor([weights[i] for i, _ in inputs.present]), spec, generator)
    u, s, vh = torch.linalg.svd(delta, full_matrices=spec.svd_full_matrices)
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    if spec.svd_clamp is not None:
        high = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), spec.svd_clamp)
        u, vh = u.clamp(-high, high), vh.clamp(-high, high)
    return vh, u


def write_peft_adapter(adapter: Adapter, rank: int, folder: Path) -> Path:
    """The combined adapter as PEFT saves one (adapter_config.json + adapter_model.safetensors, float32), every module
    at the config's rank: rows a module lacks (cat of adapters that miss it, an SVD of a smaller matrix) are zeros, as
    PEFT allocates them, so r and α mean the same for every module."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapter.modules.items():
        a, b = adapter.tensor(module.a_key), adapter.tensor(module.b_key)
        padded_a = torch.zeros(rank, a.shape[1], dtype=torch.float32)
        padded_b = torch.zeros(b.shape[0], rank, dtype=torch.float32)
        padded_a[: a.shape[0]], padded_b[:, : b.shape[1]] = a, b
        tensors[f"base_model.model.{module.a_key}"] = padded_a
        tensors[f"base_model.model.{module.b_key}"] = padded_b
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(adapter.config, indent=2, sort_keys=True) + "\n")
    return folder





# -- mergekit's task-vector merges, on full deltas (--combine-space delta) ------------------------------------------
# mergekit 0.1.5's defaults per method (merge_methods/registry.py): the pruning, the sign election, whether the sum is
# divided by the weights that agree (normalize), and whether DARE rescales what it keeps to the pruned delta's L1 norm.
_DELTA_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"prune": None, "consensus": False, "normalize": False, "rescale": False},
    "ties": {"prune": "magnitude", "consensus": True, "normalize": True, "rescale": False},
    "dare_linear": {"prune": "random", "consensus": False, "normalize": False, "rescale": True},
    "dare_ties": {"prune": "random", "consensus": True, "normalize": False, "rescale": True},
}


def _magnitude_mask(delta: torch.Tensor, density: float,
                    threshold: float | None = None) -> tuple[torch.Tensor, float]:
    """The k = max(1, ⌊density·n⌋) largest |values| kept (mergekit's magnitude sparsification), and the threshold
    (pass it back for the same delta to skip finding it again). The threshold comes from kthvalue, O(n), not a sort
    of the whole tensor; values equal to it are kept first by position."""
    flat = delta.abs().reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    if threshold is None:
        # a Python float: kthvalue's 0-d result keeps a buffer of the tensor's size alive (measured, torch 2.13)
        threshold = float(torch.kthvalue(flat, n - k + 1).values)
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[(flat == threshold).nonzero().reshape(-1)[:missing]] = True
    return keep.reshape(delta.shape), threshold


class DeltaCombination:
    """Several adapters combined on each module's full change ΔWᵢ = sᵢ·BᵢAᵢ, by mergekit's definitions
    (merge_methods/generalized_task_arithmetic.py and sparsify.py in mergekit 0.1.5), without building a merged model
    per adapter: for adapter i with weight wᵢ, cᵢ = wᵢ·prune(ΔWᵢ), and

      * task_arithmetic:  ΔW = Σ cᵢ
      * dare_linear:      prune keeps each value with probability ``density`` and rescales what it keeps to ΔWᵢ's L1
                          norm; ΔW = Σ cᵢ
      * ties:             prune keeps the ``density`` largest |values|; each value's sign is elected, sign(Σ cᵢ) (≥ 0
                          counts as +), and ΔW = Σ cᵢ·[sign cᵢ = elected] / Σ wᵢ·[sign cᵢ = elected] (divided by 1
                          where no adapter agrees)
      * dare_ties:        DARE's pruning, then TIES' election, not divided.

    A module an adapter lacks contributes nothing (as a merged model equal to the base there would). ``delta(name)``
    computes one module's ΔW in float32 from the adapters' tensors: memory is a few tensors of that size, whatever
    the number of adapters (the methods that elect signs go over the adapters twice rather than keep them all).
    DARE's mask for (module, adapter) comes from a generator seeded by (seed, module, adapter index), so the merge
    and the parity reference draw the same masks, in any order, and a run is reproducible."""

    def __init__(self, adapters: Sequence[Adapter], spec: CombineSpec) -> None:
        spec.check(len(adapters))
        _refuse_unsupported(adapters)
        self.adapters, self.spec = list(adapters), spec
        self.weights = spec.resolved_weights(len(adapters))
        self.modules = _modules(adapters, None)
        self.rules = _DELTA_DEFAULTS[spec.method]
        self.zero_fraction: dict[str, dict[str, float]] = {}  # module -> {"delta": fraction of zeros in its ΔW}
        # (module, adapter) -> its magnitude threshold: found once, reused by every later pass over that module
        self._thresholds: dict[tuple[str, int], float] = {}
        self._one_at_a_time = threading.Lock()

    def report(self) -> dict[str, Any]:
        facts = self.spec.report(self.adapters, None)
        if self.rules["prune"] is not None:
            # filled as the merge computes each module: the report is written after it
            facts["per_module_sparsity"] = self.zero_fraction
        return facts

    def _contribution(self, name: str, i: int, module: LoraModule, device: torch.device) -> torch.Tensor:
        """cᵢ = wᵢ·prune(sᵢ·BᵢAᵢ) for one module, in the model's frame (an embedding's ΔW is (B@A)ᵀ, as PEFT's)."""
        adapter = self.adapters[i]
        a = adapter.tensor(module.a_key).to(device=device, dtype=torch.float32)
        b = adapter.tensor(module.b_key).to(device=device, dtype=torch.float32)
        delta = (b @ a).mul_(module.scale)
        adapter.release(module.a_key, module.b_key)  # the file's pages: resident memory stays at this module
        if module.kind == "embedding":
            delta = delta.T.contiguous()
        density = self.spec.density
        if self.rules["prune"] == "magnitude" and density < 1:
            keep, self._thresholds[(name, i)] = _magnitude_mask(delta, density, self._thresholds.get((name, i)))
            delta.mul_(keep)
        elif self.rules["prune"] == "random" and density < 1:
            generator = torch.Generator(device=device).manual_seed(_mask_seed(self.spec.seed, name, i))
            l1_before = float(delta.abs().sum())
            delta.mul_(torch.bernoulli(torch.full_like(delta, density), generator=generator))
            l1_after = float(delta.abs().sum())
            if self.rules["rescale"] and l1_before >= 1e-7 and l1_after >= 1e-7:  # mergekit's eps
                delta.mul_(l1_before / l1_after)
        return delta.mul_(self.weights[i])

    def delta(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The combined ΔW of module ``name`` (a Linear's (out, in), an embedding's (vocab, dim)), float32. One
        module at a time, whatever the number of merge workers: each computation holds several tensors of the
        module's size, so memory stays at one module's worth (scripts/bench_combine.py: 1.2 GB peak for ties on a
        2 GB base, 0.35 GB for a plain merge), at the cost of running these one after the other."""
        with self._one_at_a_time:
            return self._delta(name, torch.device(device))

    def _delta(self, name: str, device: torch.device) -> torch.Tensor:
        present = self.modules[name].present
        total: torch.Tensor | None = None
        for i, module in present:
            c = self._contribution(name, i, module, device)
            total = c if total is None else total.add_(c)
        assert total is not None
        if self.rules["consensus"]:
            # the elected sign of each value, then a second pass over the adapters (recomputed, not kept)
            elected = torch.where(total >= 0, 1.0, -1.0)
            del total
            mixed = torch.zeros_like(elected)
            divisor = torch.zeros_like(elected)
            for i, module in present:
                c = self._contribution(name, i, module, device)
                agree = c.sign() == elected
                mixed.add_(c.mul_(agree))
                divisor.add_(agree.to(torch.float32).mul_(self.weights[i]))
            if self.rules["normalize"]:
                mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
            total = mixed
        if self.rules["prune"] is not None:
            self.zero_fraction[name] = {"delta": float((total == 0).double().mean())}
        return total


def _mask_seed(seed: int, module: str, index: int) -> int:
    """A 63-bit seed for one (module, adapter) DARE mask, the same in every process (unlike Python's hash())."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{module}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


__all__ = ["DELTA_METHODS", "METHODS", "CombineSpec", "DeltaCombination", "combine_adapters", "new_rank",
           "write_peft_adapter"]
