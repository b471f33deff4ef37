"""Run memory-bound tensor work on one thread.

Conversion, export and packing do many element-wise passes over parameter-sized tensors: bound by
memory bandwidth, they gain nothing from torch's intra-op threads, while on a busy machine every
parallel region waits for a descheduled thread (measured on a loaded 2-core machine: converting two
CIFAR-10 experts took 0.5 s on one thread and 17.6 s on two).
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_threaded():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
