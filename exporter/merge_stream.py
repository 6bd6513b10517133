"""The merge as the export stage pulls it: every output tensor once, in base order, computed block by block while
every format's writer encodes the same blocks (one pass, many sinks). The merge stage (exporter/stages/merge.py)
builds it; the export stage pumps it; it owns the workers' per-tensor statistics and the time the merge took."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from converters.tensor_stream import StreamTensor, TensorWriter, pump


class MergeStream:
    def __init__(self, tensors: list[StreamTensor], order: list[str]) -> None:
        """``order``: every output tensor's name in layout order, which the statistics are sorted by."""
        self.tensors = tensors
        self.seconds = 0.0  # wall time of pump(): the merge and every writer's encoding of its blocks
        self._order = {name: i for i, name in enumerate(order)}
        self._statistics: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(self, statistics: dict[str, Any]) -> None:
        """One merged tensor's figures (scale, ‖ΔW‖/‖W‖ …), from whichever worker merged it."""
        with self._lock:
            self._statistics.append(statistics)

    def statistics(self) -> list[dict[str, Any]]:
        """Every merged tensor's figures, in layout order (workers finish in any order)."""
        with self._lock:
            return sorted(self._statistics, key=lambda m: self._order[m["tensor"]])

    def pump(self, writers: Sequence[TensorWriter], workers: int,
             on_written: Callable[[StreamTensor], None] | None = None) -> None:
        """Merge every tensor and hand its blocks to every writer, ``workers`` tensors at a time."""
        start = time.perf_counter()
        try:
            pump(self.tensors, writers, workers, on_written=on_written)
        finally:
            self.seconds += time.perf_counter() - start
