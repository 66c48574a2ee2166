"""How many CPU threads one thread's explanations use.

torch's CPU kernels (ATen's parallel loops, oneDNN's convolutions) run on OpenMP, whose thread count is a setting of
each calling thread. `torch.set_num_threads` is not the way to set it for one thread: it also changes the count that
every thread started later takes as its own. So the calling thread's OpenMP count is set through threadpoolctl,
after torch has given the thread its own (torch does that on the thread's first use, and would overwrite it).
XRAI's segmentation threads follow the same count (`region_threads`)."""

from __future__ import annotations

import logging

import torch
from threadpoolctl import ThreadpoolController

logger = logging.getLogger("lantern.explain")
_controller: ThreadpoolController | None = None


def limit_this_thread(threads: int) -> int:
    """Limit the calling thread's torch CPU work to `threads` OpenMP threads; other threads keep theirs. Returns the
    count torch now reports for this thread (unchanged where torch does not run on an OpenMP runtime)."""
    global _controller
    torch.get_num_threads()  # torch's per-thread setup first: it would later overwrite what is set here
    if _controller is None:
        _controller = ThreadpoolController()
    _controller.limit(limits=threads, user_api="openmp")  # kept for the thread's life: it is not restored
    now = torch.get_num_threads()
    if now != threads:
        logger.warning("explanation threads: asked for %d, torch runs on %d (no OpenMP runtime found to set)",
                       threads, now)
    return now


def region_threads(scales: int) -> int:
    """Threads for XRAI's per-scale segmentation: one per scale, at most the calling thread's torch thread count."""
    return max(1, min(scales, torch.get_num_threads()))
