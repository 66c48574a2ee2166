"""How many CPU threads one thread's explanations use.

torch's CPU kernels (ATen's parallel loops, oneDNN's convolutions) run on OpenMP, whose thread count is a setting of
each calling thread. `torch.set_num_threads` is not the way to set it for one thread: it also changes the count that
every thread started later takes as its own. So the calling thread's OpenMP count is set through threadpoolctl,
after torch has given the thread its own (torch does that on the thread's first use, and would overwrite it).
XRAI's segmentation threads follow the same count (`region_threads`). A thread can also lower its own CPU priority
(`lower_this_thread_priority`), which the threads it starts inherit."""

from __future__ import annotations

import logging
import os
import sys
import threading

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


def lower_this_thread_priority(niceness: int) -> int:
    """Run the calling thread, and the threads it starts from now on (its OpenMP team, XRAI's segmentation pool),
    at CPU priority `niceness` (Linux nice, 19 = take only what no other thread wants): the kernel's scheduler then
    gives live work the cores first. Linux only, where nice is a setting of each thread; elsewhere it would apply to
    the whole process, so nothing is changed there. Returns the thread's niceness now."""
    if sys.platform != "linux":
        return 0
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, niceness)
    except OSError as error:  # a container may refuse it; the work still runs, at the priority it had
        logger.warning("explanation jobs: cannot lower the CPU priority to %d (%s)", niceness, error)
    return os.getpriority(os.PRIO_PROCESS, thread)


def region_threads(scales: int) -> int:
    """Threads for XRAI's per-scale segmentation: one per scale, at most the calling thread's torch thread count."""
    return max(1, min(scales, torch.get_num_threads()))
