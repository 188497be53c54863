"""The one place that decides which kernel implementation runs.

Order: an explicit `backend` argument, else the BDIFF_BACKEND environment variable, else
`triton` for CUDA tensors when Triton and a driver are present, else the fast torch path.
"""
import ctypes
import functools
import os
import sys

import torch

from bdiff.errors import BdiffError
from bdiff.kernels import (field_matching_chunked, field_matching_naive, field_matching_reference,
                           field_matching_torch, sde_step_reference, sde_step_torch)
from bdiff.kernels.torch_path import sde_noise, stream_seed  # noqa: F401  (stream_seed: the samplers')

BACKENDS = ("triton", "torch", "chunked", "naive", "reference")


def triton_installed():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def triton_available():
    """True when Triton imports and can launch: a CUDA driver, or the CPU interpreter."""
    return triton_installed() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def resolve(backend, device):
    """Name of the backend that will run on tensors living on `device`."""
    name = backend or os.environ.get("BDIFF_BACKEND") or "auto"
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise BdiffError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name == "triton" and not triton_available():
        raise BdiffError("backend 'triton' needs Triton and a CUDA GPU (or TRITON_INTERPRET=1)")
    return name


def draw(factory, *args, generator, device, **kwargs):
    """A random draw made on `generator`'s own device (so a seed gives the same numbers on any
    device) and moved to `device`, where the data it meets lives."""
    return factory(*args, generator=generator, device=generator.device, **kwargs).to(device)


def use_all_cores():
    """Every core for torch's threads, unless OMP_NUM_THREADS (a positive count) says how many:
    several jobs on one machine each taking every core oversubscribe it."""
    setting = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(setting) if setting.isdigit() and int(setting) > 0 else os.cpu_count() or 1
    torch.set_num_threads(threads)


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
RETAINED_FREE_MEMORY = 2**30


def retain_freed_memory():
    """Keep freed tensor memory in the process for the next tensor (glibc only; True when set).
    glibc hands blocks over its mmap threshold (128 KiB at first) back to the kernel when they
    are freed, and trims the heap's free top; a sampler pass allocates and frees megabytes of
    activations, and the next pass faults every page in again. Blocks up to 32 MiB from the heap
    and up to 1 GiB of free heap kept: 10 times fewer page faults, and `bdiff sample --n 10000`
    took 8.1 s instead of 11.2 s on the 2-core machine (NOTES.md); fit's small batches did not
    move. A user's own MALLOC_* settings are left alone."""
    if not sys.platform.startswith("linux") or any(key.startswith("MALLOC_") for key in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, RETAINED_FREE_MEMORY))


def prepare_host():
    """What every command does first: torch on every core (use_all_cores) and freed memory kept
    for the next tensor (retain_freed_memory)."""
    use_all_cores()
    retain_freed_memory()


MAX_SEED = 2**63 - 1


def check_seed(seed):
    if not 0 <= seed <= MAX_SEED:
        raise BdiffError(f"--seed must be between 0 and 2^63 - 1, got {seed}")


def check_memory(nbytes, what):
    """One clear error before an allocation that cannot fit in this machine's memory (an
    allocator failure mid-run is an opaque RuntimeError)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > total:
        raise BdiffError(f"{what} needs about {nbytes / 2**30:.3g} GiB of memory; this machine has "
                         f"{total / 2**30:.3g} GiB")


def check_device(device):
    """The device name, or one clear error for an unknown one or a missing GPU."""
    if device != "cpu" and not device.startswith("cuda"):
        raise BdiffError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BdiffError("--device cuda asked for, but no CUDA GPU is available")
    return device


def field_matching(x, y, eps, exclude=None, backend=None):
    """log ŝ(x) - log(#refs) and the softmax-weighted mean of (y - x)/ε (ε a float, or one per
    row of x); see kernels/."""
    name = resolve(backend, x.device)
    if name == "triton":
        from bdiff.kernels.triton_field import field_matching_triton
        return field_matching_triton(x, y, eps, exclude)
    if name == "reference":
        lse, mean = field_matching_reference(x, y, eps, exclude)
        return lse.to(x.dtype), mean.to(x.dtype)
    impl = {"torch": field_matching_torch, "chunked": field_matching_chunked,
            "naive": field_matching_naive}[name]
    return impl(x, y, eps, exclude)


def sde_step(x, s, g, h, seed, step, offset=0, delta=None, backend=None):
    """One Euler-Maruyama step of the Bellman (delta=None) or preconditioned SDE."""
    name = resolve(backend, x.device)
    if name == "triton":
        from bdiff.kernels.triton_sde import sde_step_triton
        return sde_step_triton(x, s, g, h, seed, step, offset, delta)
    if name == "reference":
        noise = sde_noise(x.shape, seed, step, offset, x.device)
        return sde_step_reference(x, s, g, noise, h, delta).to(x.dtype)
    return sde_step_torch(x, s, g, h, seed, step, offset, delta)


def oracle_sde_step(x, refs, eps, log_c, s_floor, h, seed, step, offset=0, delta=None, backend=None):
    """One SDE step driven by the exact smoothed fields against `refs`: fused into one Triton
    launch for small D, else the field reduction followed by the step."""
    name = resolve(backend, x.device)
    if name == "triton":
        from bdiff.kernels.triton_field import SMALL_D
        if x.shape[1] <= SMALL_D:
            from bdiff.kernels.triton_sde import oracle_sde_step_triton
            return oracle_sde_step_triton(x, refs, eps, log_c, s_floor, h, seed, step, offset, delta)
    lse, mean = field_matching(x, refs, eps, None, name)
    s = torch.exp(lse - log_c)
    s = torch.where(s > s_floor, s, torch.zeros_like(s))  # g = s·mean is then zero as well
    return sde_step(x, s, s.unsqueeze(1) * mean, h, seed, step, offset, delta, name)
