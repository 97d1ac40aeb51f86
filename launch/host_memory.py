"""Keep freed host memory in the process instead of handing it back to the kernel after every step (glibc).

XLA:CPU allocates a train step's temporaries afresh at every step and frees them at its end. With glibc's
defaults, the memory its worker threads free goes back to the kernel (their arenas trim it), and the next step
takes a page fault on every page it touches again: 175-273 MiB of faults per step at the issue-15 shape (`none`,
`rmt`, `lm2`), 12-14% of the step's CPU time spent in the kernel (benchmarks/PERF_NOTES.md, section 9). One
arena for all threads, no mmap for large blocks and no trimming keep the pages mapped (most of them: some
processes still fault, for reasons not found): a process holds on to its peak host memory, which a training
process reaches anyway.

Applied when the `launch` package is imported (every launcher, and the benchmarks through it), before
JAX starts its threads; a library user can `import launch` first thing. Off with LM2_KEEP_HOST_MEMORY=0, and a
no-op where the C library is not glibc.
"""

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to one arena, no mmap and no trimming; True when it did."""
  if os.environ.get("LM2_KEEP_HOST_MEMORY", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not Linux with glibc
    return False
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: SIZE_MAX, never
