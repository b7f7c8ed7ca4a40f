"""How a training process gets its memory on glibc (Linux).

glibc serves every allocation above 32 MiB with a fresh mmap and returns it to the kernel when freed, so
each large tensor a step allocates pays a page fault per 4 KiB page, every step. A stack of 8 SAEs at
the bench shape allocates several such tensors per step, and trained 0.82x as fast as 8 SAEs one by one
because of it; with large allocations served from the heap and kept for reuse, the stack trains as fast
as the 8 (1.00-1.02x) and both are 25-50% faster (docs/results.md). The settings are glibc's
environment variables, which it reads only at start-up, so the command re-executes itself once with
them (BATCHTOPK_MALLOC=off keeps the process as it is).
"""
from __future__ import annotations

import os
import sys

HEAP_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1),
                 "MALLOC_TOP_PAD_": str(1 << 28)}


def reexec_with_heap_settings() -> None:
    """Run this command again (same arguments, same process id) with HEAP_SETTINGS in its environment,
    unless they are there already, the platform is not Linux, or BATCHTOPK_MALLOC=off. Call it first thing
    in a command's __main__, before anything large is allocated."""
    if sys.platform != "linux" or os.environ.get("BATCHTOPK_MALLOC") == "off":
        return
    if all(k in os.environ for k in HEAP_SETTINGS):
        return
    os.execve(sys.executable, sys.orig_argv, HEAP_SETTINGS | dict(os.environ))  # the user's own values win
