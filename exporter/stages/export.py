"""export: open every requested format's writer, pull each tensor of the merge stream once, let every writer encode
it (each block written at its place, from the worker that computed it), and close the files. A format that needs
no tensor (gguf-lora) just writes at close.

Everything lands in the staging folder; the runner renames it into place only after every stage has passed.
"""

from __future__ import annotations

from tqdm import tqdm

from converters.errors import ConverterError
from converters.ordered_pool import default_workers
from converters.tensor_stream import StreamTensor
from exporter.context import Context
from exporter.errors import ExportError, StageCheckError
from exporter.formats import format_of


class ExportStage:
    name = "export"

    def run(self, ctx: Context) -> None:
        sinks = []
        try:
            for request in ctx.formats:
                sinks.append((request, format_of(request).open_sink(ctx, request)))
                request.prepared = None  # the sink owns it now (a GGUF vocabulary goes once its header is written)
            writers = [sink for _, sink in sinks if sink.consumes_stream]
            if writers:
                self._pump(ctx, writers)
            for _, sink in sinks:
                ctx.artifacts.extend(sink.close())
        except BaseException as e:  # Ctrl-C included: no half-written file stays open
            for _, sink in sinks:
                sink.abort()
            if isinstance(e, ConverterError):  # bad input a writer found; anything else is a bug (exit 1)
                raise ExportError(f"--to {','.join(map(str, ctx.formats))}", f"{e}.") from e
            raise
        self._summarise_merge(ctx)

    @staticmethod
    def _pump(ctx: Context, writers: list) -> None:
        """The merge stream pulled through every writer: one tensor per core on the CPU, each with single-threaded
        torch (converters/ordered_pool.py)."""
        total = sum(t.numel * t.dtype.itemsize for t in ctx.merge.tensors)
        workers = default_workers() if ctx.device.type == "cpu" else 1
        with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=not ctx.plan.progress,
                  leave=False) as bar:
            def written(tensor: StreamTensor) -> None:
                bar.update(tensor.numel * tensor.dtype.itemsize)

            ctx.merge.pump(writers, workers, on_written=written)

    @staticmethod
    def _summarise_merge(ctx: Context) -> None:
        merged = ctx.merge.statistics()
        if merged and all(m["unchanged"] for m in merged):
            ctx.note("the adapter changes nothing: every merged tensor equals the base (an untrained adapter with "
                     "lora_B = 0, or a scale of 0?)")

    def check(self, ctx: Context) -> None:
        for artifact in ctx.artifacts:
            if not artifact.staged.exists():
                raise StageCheckError(str(artifact.staged), "was not written.", "report this as a bug.")
        if len(ctx.artifacts) < len(ctx.formats):
            raise StageCheckError("export", f"{len(ctx.formats)} formats asked for, {len(ctx.artifacts)} written.",
                                  "report this as a bug.")
