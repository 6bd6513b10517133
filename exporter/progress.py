"""Progress bars for long work, and what a step costs in memory."""

from __future__ import annotations

import threading

import psutil
from tqdm import tqdm

from exporter.context import Context


def progress(ctx: Context, desc: str, total: int) -> tqdm:
    return tqdm(total=total, unit="module", desc=desc, disable=not ctx.plan.progress, leave=False)


class PeakRss:
    """The process's largest resident set size while the block runs (polled every 20 ms), and apart from it the
    largest anonymous part (resident minus file-backed pages: a mapped GGUF's pages are page cache the kernel can
    evict, not memory the run holds)."""

    def __init__(self) -> None:
        self.peak = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while True:
            info = me.memory_info()
            self.peak = max(self.peak, info.rss)
            self.peak_anon = max(self.peak_anon, info.rss - getattr(info, "shared", 0))
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
