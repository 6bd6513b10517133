"""The command line: parse, build a frozen plan, call the pipeline. Errors print as one line and exit non-zero."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from exporter.combine import METHODS as COMBINE_METHODS
from exporter.combine import CombineSpec
from exporter.context import ExportPlan, parse_size
from exporter.errors import ExportError
from exporter.pipeline import run_pipeline

log = logging.getLogger("lora_export")


class OnceOption(click.Option):
    """An option that takes one value and refuses to be given twice (click would silently keep the last)."""

    def __init__(self, *args, default=None, show_default: bool = False, **kwargs) -> None:
        self.single_default = default
        if show_default and default is not None:
            kwargs["show_default"] = str(default)
        super().__init__(*args, multiple=True, **kwargs)

    def process_value(self, ctx: click.Context, value):
        values = super().process_value(ctx, value)
        if len(values) > 1:
            raise click.UsageError(f"{self.opts[0]} was given {len(values)} times "
                                   f"({', '.join(map(str, values))}); give it once.", ctx)
        return values[0] if values else self.single_default


def once(*args, **kwargs):
    return click.option(*args, cls=OnceOption, **kwargs)


def format_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """--to given any number of times, each a comma list; duplicates collapse, order kept."""
    items = [item.strip() for value in values for item in value.split(",") if item.strip()]
    return tuple(dict.fromkeys(items)) or ("safetensors",)


def parse_weights(text: str | None) -> tuple[float, ...]:
    """--weights 1.0,0.5 -> (1.0, 0.5); None -> () (1 each)."""
    if text is None:
        return ()
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise ExportError(f"--weights {text}", "is not a comma list of numbers.", "write it like 1.0,0.5.") from None


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # gguf-py narrates every file it writes at INFO (endianness, the temporary file's name): keep its warnings only.
    logging.getLogger("gguf").setLevel(logging.WARNING if verbose <= 1 else logging.DEBUG)


def _fail(error: ExportError) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(error.exit_code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Every way a command can end badly, as one line and an exit code: an ExportError (2, or 3 for parity), Ctrl-C
    (130), anything unexpected (1, "internal error"; the traceback only under -v)."""
    try:
        yield
    except ExportError as e:
        _fail(e)
    except KeyboardInterrupt:
        click.echo("interrupted: the run was stopped; nothing was written.", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: say so in one line
        verbose = (click.get_current_context().find_root().params.get("verbose") or 0) > 0
        if verbose:
            traceback.print_exc()
        click.echo(f"internal error: {type(e).__name__}: {e}. Please report it"
                   + ("" if verbose else " (run with -v for the traceback)") + ".", err=True)
        sys.exit(1)


def _print_result(ctx) -> None:
    table = ctx.parity.table if ctx.parity else None
    if table:
        click.echo(table)
    click.echo(f"wrote {ctx.plan.out} (report: {ctx.plan.out / 'report.json'})")
    for pushed in ctx.published:
        click.echo(f"pushed {pushed['repo_id']}: {pushed['pr_url'] or pushed['url']}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """lora-export: merge a LoRA adapter exactly, export it, and check it against base + adapter."""
    _setup_logging(verbose, quiet)


@main.command()
@once("--base", default=None, help="Base model: a Hugging Face folder, or a Hub id org/name[@revision] (downloaded: "
      "config, tokenizer and the safetensors weights only). [default: the adapter's base_model_name_or_path]")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="PEFT adapter: a folder (adapter_config.json + adapter_model.safetensors) or a Hub id "
                   "org/name[@revision]. Repeat it or give a comma list to combine several (with --combine).")
@once("--combine", type=click.Choice(COMBINE_METHODS), default=None,
      help="How several adapters become one. Adapter space (PEFT's add_weighted_adapter, by its names): sum (every "
           "adapter's change with its weight, exactly: what merge_and_unload(adapter_names=...) merges), cat, linear, "
           "svd, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, "
           "magnitude_prune_svd. Delta space (mergekit's, on each full change; --combine-space delta): "
           "task_arithmetic, ties, dare_linear, dare_ties.")
@once("--combine-space", type=click.Choice(["adapter", "delta"]), default=None,
      help="Which family --combine names: adapter (PEFT's methods on the LoRA factors) or delta (mergekit's on the "
           "full deltas, as if every adapter were first merged into a model). [default: delta for task_arithmetic, "
           "else adapter]")
@once("--weights", default=None, help="Combining: one weight per adapter, a comma list (default 1 each).")
@once("--density", type=float, default=None,
      help="Combining with ties, dare_* or magnitude_prune*: the fraction of values kept (0-1].")
@once("--majority-sign-method", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
      help="Combining with ties / dare_ties: how the sign of each value is elected.")
@once("--svd-rank", type=int, default=None, help="Combining with *svd: the new rank. [default: the largest input rank]")
@once("--svd-clamp", type=float, default=None, help="Combining with *svd: clamp at this quantile (e.g. 0.99).")
@once("--seed", type=int, default=0, show_default=True,
      help="Combining with dare_*: the seed of the random masks (in adapter space, PEFT's masks after "
           "torch.manual_seed(SEED)).")
@once("--out", required=True, type=click.Path(path_type=Path), help="Output folder (must not exist or be empty).")
@click.option("--to", "formats", multiple=True,
              help="Export format; repeat it or give a comma list (default safetensors): safetensors (in "
                   "--dtype), safetensors:nf4|nf4-dq|fp4|fp4-dq|int8 (bitsandbytes), gguf[:TYPE] (f32 f16 bf16 q8_0 "
                   "q4_0 q4_1 q5_0 q5_1; q4_k_m q5_k_m q6_k need lora-export[llama]), gguf-lora (the adapter for "
                   "llama.cpp --lora), onnx[:fp32|fp16][-nocache] (KV cache unless -nocache), peft (several "
                   "adapters combined in adapter space, as one PEFT adapter folder).")
@once("--gguf-pre", default=None,
      help="GGUF: the BPE pre-tokenizer name (llama-bpe, qwen2, gpt-2, …) when it cannot be identified.")
@once("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
      help="Dtype of the merged safetensors weights. [default: the base's]")
@once("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
      help="Where the float32 merge runs.")
@once("--parity", type=click.Choice(["on", "off"]), default="on", show_default=True,
      help="Compare the output with base + adapter (unmerged) and fail the run when it differs.")
@once("--original-base", default=None,
      help="For a quantized (bitsandbytes) base: the full-precision model it was made from, checked to be it.")
@once("--merge-into", type=click.Choice(["dequantized", "original"]), default="dequantized", show_default=True,
      help="For a quantized base: merge into its dequantized weights (what training saw) or into --original-base's.")
@once("--min-effect-kept", type=click.FloatRange(max=1.0), default=0.5, show_default=True,
      help="Parity: warn when an artifact keeps less than this share of the adapter's effect (1 - KL(ref||artifact) "
           "/ KL(ref||base)); a quantized format can erase a small adapter.")
@click.option("--require-effect-kept", is_flag=True, help="Fail parity, not just warn, below --min-effect-kept.")
@once("--parity-memory", type=click.Choice(["auto", "whole", "streamed"]), default="auto", show_default=True,
      help="Parity: hold each model whole (faster) or load it module by module (memory flat in model size); auto "
           "picks whole when the model fits in the memory available.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder (only after the run succeeds).")
@click.option("--allow-pickle", is_flag=True, help="Accept adapter_model.bin (loaded with weights_only=True).")
@once("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--no-check-finite", is_flag=True, help="Do not fail on NaN/Inf in the adapter or the merged tensors.")
@click.option("--accept-parity-failure", is_flag=True, help="Keep the output even when parity fails (exit 0).")
@once("--max-abs", type=float, default=None, help="Parity: max |Δlogit| allowed (overrides the default).")
@once("--max-kl", type=float, default=None, help="Parity: mean KL(ref‖out) allowed (overrides the default).")
@once("--min-top1", type=click.FloatRange(0.0, 1.0), default=None,
      help="Parity: top-1 agreement on decisive positions (0-1).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@once("--push-to", default=None, help="After parity passes, publish to this Hub repo (org/name): merged safetensors "
      "there, GGUF to org/name-GGUF, ONNX to org/name-ONNX, bitsandbytes to org/name-bnb-TYPE, gguf-lora to "
      "org/name-LoRA-GGUF, each with a model card. Run the same command again to resume an interrupted upload.")
@click.option("--private", is_flag=True, help="Create the pushed repos as private.")
@once("--revision", "push_revision", default=None, help="Push to this branch (created when missing) instead of main.")
@click.option("--create-pr", is_flag=True, help="Open a pull request on each pushed repo instead of committing.")
def run(base: str | None, adapters: tuple[str, ...], combine: str | None, combine_space: str | None,
        weights: str | None, density: float | None,
        majority_sign_method: str, svd_rank: int | None, svd_clamp: float | None, seed: int, out: Path,
        formats: tuple[str, ...], gguf_pre: str | None, dtype: str | None,
        device: str, parity: str, original_base: str | None, merge_into: str, min_effect_kept: float,
        require_effect_kept: bool, parity_memory: str,
        overwrite: bool, allow_pickle: bool, max_shard_size: str, no_check_finite: bool,
        accept_parity_failure: bool, max_abs: float | None, max_kl: float | None, min_top1: float | None,
        no_progress: bool, push_to: str | None, private: bool, push_revision: str | None, create_pr: bool) -> None:
    """Merge ADAPTER into BASE and export it.

    \b
    Examples:
      lora-export run --base ./Llama-3.2-1B --adapter ./my-lora --out ./merged --dtype bfloat16
      lora-export run --base ./Llama-3.2-1B --adapter ./my-lora --out ./gguf --to gguf:q8_0,gguf:q4_k_m
      lora-export run --base ./Llama-3.2-1B --adapter ./my-lora --out ./all --to safetensors --to gguf:f16
    lora-export run --base ./Llama-3.2-1B --adapter ./my-lora --out ./onnx --to onnx:fp16
      lora-export run --base meta-llama/Llama-3.2-1B --adapter me/my-lora --out ./m --to safetensors,gguf:q4_k_m
      --push-to me/my-model
      lora-export run --base ./Llama-3.2-1B --adapter ./task-lora --adapter ./style-lora --combine sum
      --weights 1.0,0.5 --out ./both
      lora-export run --base ./Llama-3.2-1B --adapter ./a,./b,./c --combine ties --combine-space delta
      --density 0.5 --out ./ties
    """
    with reported_errors():
        adapter_list = [a.strip() for spec in adapters for a in spec.split(",") if a.strip()]
        spec = None
        if combine is not None:
            spec = CombineSpec(combine, parse_weights(weights), density=density,
                               majority_sign_method=majority_sign_method, svd_rank=svd_rank, svd_clamp=svd_clamp,
                               seed=seed, space=combine_space)
        elif weights is not None or combine_space is not None:
            flag = "--weights" if weights is not None else "--combine-space"
            raise ExportError(flag, "is about combining adapters, and no --combine was given.",
                              f"pass --combine METHOD, or drop {flag}.")
        plan = ExportPlan(
            base=base, adapter=adapter_list[0], more_adapters=tuple(adapter_list[1:]), combine=spec,
            out=out.resolve(), formats=format_list(formats),
            dtype=dtype, device=device, parity=parity == "on", parity_memory=parity_memory, overwrite=overwrite,
            min_effect_kept=min_effect_kept, require_effect_kept=require_effect_kept, original_base=original_base,
            merge_into=merge_into,
            allow_pickle=allow_pickle,
            max_shard_size=parse_size(max_shard_size), check_finite=not no_check_finite,
            accept_parity_failure=accept_parity_failure, max_abs=max_abs, max_kl=max_kl, min_top1=min_top1,
            progress=not no_progress, gguf_pre=gguf_pre, push_to=push_to, private=private,
            push_revision=push_revision, create_pr=create_pr,
        )
        ctx = run_pipeline(plan)
    _print_result(ctx)


@main.command()
@click.argument("adapter")
@once("--base", default=None, help="Base model, to check the fit and estimate the output size.")
@once("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
      help="Output dtype for the size estimate. [default: the base's]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(adapter: str, base: str | None, dtype: str | None, as_json: bool) -> None:
    """Show what ADAPTER does: rank, alpha and scale per module, variants, patterns, output size.

    \b
    Example:
      lora-export inspect ./my-lora --base ./Llama-3.2-1B
    """
    from exporter.inspect import describe, format_description

    with reported_errors():
        info = describe(adapter, base, dtype)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@main.command()
@once("--out", type=click.Path(path_type=Path), default=None,
      help="Where to keep the demo's inputs and output. [default: a temporary folder, removed after]")
def demo(out: Path | None) -> None:
    """Build a tiny model and adapter, run the whole pipeline, print the parity table. No downloads.

    The bf16 base and its adapter are merged once and exported as safetensors, ONNX (fp32, KV cache) and, when
    llama.cpp's Python binding is installed (lora-export[llama]), GGUF F16; each is checked in its own runtime.

    \b
    Example:
      lora-export demo
      lora-export demo --out ./demo   # keep the base, adapter and merged model
    """
    from exporter.demo import build_demo, demo_formats

    with tempfile.TemporaryDirectory(prefix="lora-export-demo-") as tmp:
        root = (out or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        base, adapter = build_demo(root / "inputs")
        click.echo(f"demo inputs: base {base}, adapter {adapter}")
        with reported_errors():
            ctx = run_pipeline(ExportPlan(base=str(base), adapter=str(adapter), out=root / "merged", overwrite=True,
                                          formats=demo_formats()))
        _print_result(ctx)


if __name__ == "__main__":
    main()
