"""What a format is: a name and its variants, its pre-flight checks, its writer (a sink fed by the one merge stream),
how parity runs what it wrote, and its tolerances with their reasons. One module per format in this folder; the
table in exporter/formats/__init__.py lists them, and the stages loop over it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from converters.tensor_stream import Encoder, StreamTensor
from exporter.context import Artifact, Context, FormatRequest
from exporter.merge_math import cast_rows
from exporter.parity.tolerances import Tolerance


class GatheredCast:
    """An encoder for a writer that needs a tensor whole: each block cast once into ``dtype`` (cast_rows: a value the
    dtype cannot hold is refused with ``fix``, when ``check_finite``), the whole tensor handed to ``done`` at the end."""

    needs_rows = True

    def __init__(self, tensor: StreamTensor, dtype: torch.dtype, check_finite: bool,
                 done: Callable[[torch.Tensor], None], fix: str | None = None) -> None:
        self.name, self.check_finite, self.done, self.fix = tensor.name, check_finite, done, fix
        self.out = torch.empty(tensor.shape, dtype=dtype)
        self.rows = self.out.reshape(-1) if self.out.dim() <= 1 else self.out

    def add(self, start: int, stop: int, rows: torch.Tensor) -> None:
        cast_rows(self.rows[start:stop], rows, self.name, self.check_finite,
                  **({} if self.fix is None else {"fix": self.fix}))

    def finish(self) -> None:
        self.done(self.out)


class Sink(Protocol):
    """A format's writer for one run. When ``consumes_stream`` it is a TensorWriter (row_unit, encoder; see
    converters/tensor_stream.py) fed every output tensor once; ``close`` finishes the files and returns the
    artifacts."""

    consumes_stream: bool

    def row_unit(self, tensor: StreamTensor) -> int: ...

    def encoder(self, tensor: StreamTensor) -> Encoder | None: ...

    def close(self) -> list[Artifact]: ...

    def abort(self) -> None: ...


class ArtifactRuntime:
    """An artifact loaded in the runtime its users run (an ONNX Runtime session, llama.cpp, transformers), for parity:
    its logits on the probes, any checks beyond the logits, then ``close()`` (the parity stage always calls it)."""

    def logits(self, probes: list[torch.Tensor]) -> torch.Tensor:
        """(total positions, vocab) float32 logits of the artifact on the probes, one probe at a time."""
        raise NotImplementedError

    def checks(self, tokenizer: Any) -> tuple[dict | None, list[str]]:
        """Extra figures for the report and failures beyond the logits (e.g. a tokenizer check)."""
        return None, []

    def close(self) -> None:
        """Release what the runtime holds (a session, a loaded model)."""


class LogitsRuntime(ArtifactRuntime):
    """A runtime that is one function from probes to logits, holding nothing between calls."""

    def __init__(self, logits: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        self._logits = logits

    def logits(self, probes: list[torch.Tensor]) -> torch.Tensor:
        return self._logits(probes)


class Format:
    """Defaults shared by the formats; each format module subclasses it once."""

    name: str = ""
    runtime: str = ""  # where parity runs the artifact
    checks_key: str = "checks"  # where the runtime's checks() figures go in the artifact's parity report
    default_variant: str | None = None
    tolerances: dict[str, Tolerance] = {}  # by the artifact's variant
    arch_tolerances: dict[tuple[str, str], Tolerance] = {}  # by (variant, HF architecture): exceptions

    def variants(self) -> tuple[str, ...]:
        """Accepted variant names (empty: the format takes none)."""
        return ()

    def preflight(self, ctx: Context, variants: list[str | None]) -> list[Any]:
        """Refuse, before the merge, whatever this format cannot write (raise ExportError and kin), and return what
        was prepared for each variant's writer, in order (kept by its request until the export stage opens the sink).
        Called once per format with every variant asked for, so work they share is done once."""
        return [self.prepare(ctx, variant) for variant in variants]

    def prepare(self, ctx: Context, variant: str | None) -> Any:
        """One variant's pre-flight (see preflight); None when nothing is prepared."""
        return None

    def output_bytes(self, ctx: Context, request: FormatRequest) -> tuple[int, int]:
        """(bytes of the files it leaves, bytes it needs on top while writing them): for the disk pre-flight."""
        raise NotImplementedError

    def open_sink(self, ctx: Context, request: FormatRequest) -> Sink:
        """The writer of one request, taking over what its pre-flight prepared (``request.prepared``)."""
        raise NotImplementedError

    def open_runtime(self, artifact: Artifact, ctx: Context) -> ArtifactRuntime:
        """The artifact loaded for parity in its users' runtime (the caller closes it)."""
        raise NotImplementedError

    def after_parity(self, artifact: Artifact, ctx: Context) -> None:
        """Anything the format records once its figures are known (ONNX: into the graph's metadata)."""

    def tolerance(self, variant: str, architecture: str | None) -> Tolerance:
        if (variant, architecture) in self.arch_tolerances:
            return self.arch_tolerances[(variant, architecture)]
        if variant not in self.tolerances:
            known = ", ".join(f"{self.name}/{v}" for v in self.tolerances)
            raise KeyError(f"no parity tolerance declared for {self.name}/{variant} (declared: {known})")
        return self.tolerances[variant]
