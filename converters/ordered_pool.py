"""Ordered parallel map with bounded lookahead: the tool both the merge and the GGUF conversion use to keep both
cores busy while results are consumed (written) strictly in order and only a few items are ever in memory.

torch releases the GIL inside its kernels, so plain threads run tensor work in parallel. Each worker should run torch
single-threaded (see single_threaded_torch): for the tensor sizes here, torch's intra-op threads cost more than they
give (measured 2x slower per tensor with 2 threads on 2 cores).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def default_workers(limit: int = 4) -> int:
    return max(1, min(limit, os.cpu_count() or 1))


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order, at most 2 × workers items in flight."""
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="lora-export") as pool:
        in_flight: deque = deque()
        try:
            for item in items:
                in_flight.append((item, pool.submit(fn, item)))
                if len(in_flight) >= 2 * workers:
                    done, future = in_flight.popleft()
                    yield done, future.result()
            while in_flight:
                done, future = in_flight.popleft()
                yield done, future.result()
        except BaseException:
            # An error or Ctrl-C: items not yet started are dropped, so the run ends after the ones already running
            # rather than after every queued item (each a whole tensor merged and encoded).
            pool.shutdown(wait=True, cancel_futures=True)
            raise
