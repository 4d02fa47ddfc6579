"""The process's memory: resident-set readings and the glibc allocator knobs a streamed prune relies on."""
from __future__ import annotations

import ctypes
import platform
import resource


def rss_mb(field: str = "VmHWM") -> float:
    """Resident memory of this process in MiB: its peak so far (VmHWM) or now (VmRSS).

    Read from /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a prune
    started as a subprocess of a large process (comprune compare, a notebook) would report the launcher's
    peak instead of its own. VmHWM belongs to this process's own address space."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no procfs: KiB on Linux, bytes on macOS
    return peak / 1024 / (1024 if platform.system() == "Darwin" else 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (see rss_mb)."""
    return rss_mb("VmHWM")


_LIBC = None


def _libc():
    """glibc through ctypes, or None where it is not available (other libcs, other systems)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 - glibc-only symbols: fail here, not at the call
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def release_memory():
    """Give freed heap memory back to the OS (glibc's malloc_trim). Blocks are tens to hundreds of MB of
    mid-sized allocations; without this the process's RSS creeps up by ~20 MB per block read."""
    if _libc():
        _libc().malloc_trim(0)


def lean_allocator():
    """Make glibc return large freed blocks to the OS at once. By default its mmap threshold grows after
    each large free until tensors of tens of MB come from the heap, which is then kept: a streamed prune's
    resident memory creeps up by the size of several activation buffers. Costs some page faults per large
    allocation, which is why only --stream does it."""
    if _libc():
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
        _libc().mallopt(M_MMAP_THRESHOLD, 256 << 10)
        _libc().mallopt(M_TRIM_THRESHOLD, 1 << 20)
        _libc().mallopt(M_ARENA_MAX, 2)
