"""``lora-export inspect``: what an adapter does, module by module, and how big the merged model will be."""

from __future__ import annotations

import math
from typing import Any

from exporter.adapter import load_adapter
from exporter.hub import fetch_adapter, fetch_base


def describe(adapter_spec: str, base_spec: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    adapter = load_adapter(fetch_adapter(adapter_spec, allow_pickle=False)[0], allow_pickle=False)
    cfg = adapter.config
    info: dict[str, Any] = {
        "adapter": str(adapter.path),
        "base_model_name_or_path": adapter.base_model_name,
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": adapter.use_rslora, "use_dora": adapter.use_dora,
        "target_modules": cfg.get("target_modules"),
        "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
        "modules_to_save": cfg.get("modules_to_save") or [],
        "replaced_tensors": {n: list(adapter.shape(k)) for n, k in adapter.replacements.items()},
        "modules": [
            {"module": m.name, "kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
             "dora": m.is_dora}
            for m in adapter.modules.values()
        ],
    }
    if base_spec is not None:
        from exporter.base import load_base
        from exporter.layout import build_layout
        from exporter.stages.load import choose_dtype

        base = load_base(fetch_base(base_spec)[0])
        out_dtype = choose_dtype(dtype, base)
        layout = build_layout(base, adapter, out_dtype)  # raises a MismatchError when they do not fit
        info["base"] = str(base.path)
        info["fits_base"] = True
        info["output_dtype"] = str(out_dtype).replace("torch.", "")
        info["output_bytes"] = sum(t.spec().nbytes for t in layout.tensors)
        info["config_updates"] = layout.config_updates
        info["notes"] = layout.notes
    return info


def _human_bytes(n: int) -> str:
    if n <= 0:
        return "0 B"
    k = min(int(math.log(n, 1000)), 4)
    return f"{n / 1000**k:.2f} {['B', 'kB', 'MB', 'GB', 'TB'][k]}"


def format_description(info: dict[str, Any]) -> str:
    lines = [
        f"adapter: {info['adapter']}  (trained on {info['base_model_name_or_path']})",
        f"r={info['r']}  lora_alpha={info['lora_alpha']}  rsLoRA={info['use_rslora']}  DoRA={info['use_dora']}",
        f"target_modules: {info['target_modules']}",
    ]
    if info["rank_pattern"] or info["alpha_pattern"]:
        lines.append(f"rank_pattern: {info['rank_pattern']}  alpha_pattern: {info['alpha_pattern']}")
    if info["replaced_tensors"]:
        lines.append("replaced (modules_to_save): " + ", ".join(f"{n} {s}" for n, s in info["replaced_tensors"].items()))
    width = max((len(m["module"]) for m in info["modules"]), default=6)
    lines.append("")
    lines.append(f"{'module'.ljust(width)}  kind       rank  alpha     scale  dora")
    for m in info["modules"]:
        lines.append(f"{m['module'].ljust(width)}  {m['kind']:<9}  {m['rank']:>4}  {m['alpha']:>5g}  "
                     f"{m['scale']:>8.4g}  {'yes' if m['dora'] else ''}")
    if "output_bytes" in info:
        lines += ["", f"base: {info['base']} (fits)", f"merged output: {_human_bytes(info['output_bytes'])} in "
                  f"{info['output_dtype']}"]
        for note in info["notes"]:
            lines.append(f"note: {note}")
    return "\n".join(lines)
