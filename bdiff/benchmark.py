"""Kernel and engine speed: each backend across sizes, with time, throughput, peak memory and
the ratio to the naive materialised PyTorch baseline."""
import math
import os
import statistics
import threading
import time

import torch

from bdiff.backend import field_matching, oracle_sde_step, sde_step, triton_available
from bdiff.errors import BdiffError

OPS = ("field_fwd", "field_fwd_bwd", "sde_step", "sde_oracle")
BACKENDS = ("naive", "torch", "triton", "keops")
# Skip a naive run whose B x M matrices would not fit (it holds about three of them).
NAIVE_LIMIT_BYTES = 6 * 2**30
# fp32 peak of known GPUs (FLOP/s, non-tensor-core), for achieved-vs-peak on CUDA.
FP32_PEAK = {"H100": 67e12, "H200": 67e12, "A100": 19.5e12, "L40S": 91.6e12, "RTX 4090": 82.6e12}


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator stats, or the process RSS sampled from
    /proc every millisecond on the CPU (PyTorch's CPU allocations are invisible to tracemalloc)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_bytes = 0

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.top = self.base
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.top = max(self.top, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak_bytes = max(self.top, self._rss()) - self.base
        return False


CSV_KEYS = ["op", "backend", "B", "M", "D", "device", "median_s", "pairs_per_s", "peak_mem_mb",
            "ratio_vs_naive", "gflops", "fraction_of_peak", "note"]


def keops_available():
    try:
        import pykeops  # noqa: F401
        from pykeops.torch import LazyTensor  # noqa: F401
    except Exception:  # noqa: BLE001 - any import or build failure means "not available"
        return False
    return True


def field_matching_keops(x, y, eps):
    """KeOps: log-sum-exp and softmax-weighted mean as two symbolic reductions (no B x M)."""
    from pykeops.torch import LazyTensor
    xi, yj = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :])
    logits = -((xi - yj) ** 2).sum(-1) / (2 * eps)
    lse = logits.logsumexp(dim=1).view(-1)
    weighted_y = logits.sumsoftmaxweight(yj, dim=1)
    return lse - math.log(y.shape[0]), (weighted_y - x) / eps


def _operation(op, backend, batch, refs, dim, device, generator):
    """A zero-argument callable running one op once, plus its work in pairs and FLOPs."""
    x = torch.randn(batch, dim, generator=generator).to(device)
    y = torch.randn(refs, dim, generator=generator).to(device)
    eps = 0.5 * dim
    if op in ("field_fwd", "field_fwd_bwd"):
        if op == "field_fwd_bwd" and backend == "triton":
            return None  # no backward kernel: training computes its targets without gradients
        if backend == "keops":
            if op == "field_fwd_bwd":
                return None
            return (lambda: field_matching_keops(x, y, eps)), batch * refs, 6.0 * batch * refs * dim
        if op == "field_fwd":
            def run():
                with torch.no_grad():
                    return field_matching(x, y, eps, None, backend)
            return run, batch * refs, 4.0 * batch * refs * dim
        upstream = torch.randn(batch, dim, generator=generator).to(device)

        def run_bwd():
            xg = x.detach().requires_grad_()
            lse, mean = field_matching(xg, y, eps, None, backend)
            (lse.sum() + (mean * upstream).sum()).backward()
            return xg.grad
        return run_bwd, batch * refs, 12.0 * batch * refs * dim
    if op == "sde_step":
        if backend == "keops":
            return None
        s = torch.rand(batch, generator=generator).to(device)
        g = torch.randn(batch, dim, generator=generator).to(device)
        name = "reference" if backend == "naive" else backend  # unfused float64 ops
        return (lambda: sde_step(x, s, g, 0.01, 0, 0, 0, None, name)), batch * dim, 10.0 * batch * dim
    if backend == "keops":
        return None
    name = "naive" if backend == "naive" else backend
    return ((lambda: oracle_sde_step(x, y, eps, 0.0, 0.0, 0.01, 0, 0, 0, None, name)),
            batch * refs, 4.0 * batch * refs * dim)


def median_time(run, repeats, device):
    """Median wall time of `repeats` runs; the caller has already warmed `run` up."""
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def available_backends(device):
    """Backends that can run on `device`, with a reason for each that cannot."""
    usable, skipped = [], {}
    for name in BACKENDS:
        if name == "triton" and not (torch.device(device).type == "cuda" and triton_available()):
            skipped[name] = "Triton kernels are not timed on the CPU (the interpreter is a test tool)"
        elif name == "keops" and not keops_available():
            skipped[name] = "pykeops is not installed (pip install -e '.[keops]')"
        else:
            usable.append(name)
    return usable, skipped


def run_benchmark(ops=OPS, sizes=(1024, 4096, 16384), dims=(2, 64), backends=None, repeats=3,
                  device="cpu", on_record=None):
    """Time every (op, size, dim, backend); returns (records, notes)."""
    for op in ops:
        if op not in OPS:
            raise BdiffError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    usable, skipped = available_backends(device)
    if backends:
        for name in backends:
            if name not in BACKENDS:
                raise BdiffError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        usable = [b for b in backends if b in usable]
        skipped = {b: why for b, why in skipped.items() if b in backends}
    if any(n < 1 for n in sizes) or any(d < 1 for d in dims) or repeats < 1:
        raise BdiffError("sizes, dims and repeats must be positive")
    generator = torch.Generator().manual_seed(0)
    peak_flops = _device_peak(device)
    records = []
    for op in ops:
        for dim in dims:
            for size in sizes:
                naive_time = None
                for backend in sorted(usable, key=lambda b: b != "naive"):
                    record = {"op": op, "backend": backend, "B": size, "M": size, "D": dim,
                              "device": str(device)}
                    if backend == "naive" and op != "sde_step" and 3 * 4 * size * size > NAIVE_LIMIT_BYTES:
                        record.update(median_s=None, note="skipped: the B x M matrices exceed memory")
                        records.append(record)
                        continue
                    built = _operation(op, backend, size, size, dim, device, generator)
                    if built is None:
                        continue
                    run, pairs, flops = built
                    # The warm-up run (compilation, allocator, caches) doubles as the memory
                    # measurement, so the RSS watcher thread never competes with timed runs.
                    with PeakMemory(device) as memory:
                        run()
                    median = median_time(run, repeats, device)
                    if backend == "naive":
                        naive_time = median
                    record.update(median_s=median, pairs_per_s=pairs / median,
                                  peak_mem_mb=memory.peak_bytes / 2**20,
                                  ratio_vs_naive=(naive_time / median) if naive_time else None,
                                  gflops=flops / median / 1e9)
                    if peak_flops:
                        record["fraction_of_peak"] = flops / median / peak_flops
                    records.append(record)
                    if on_record is not None:
                        on_record(record)
    return records, skipped


def _device_peak(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in FP32_PEAK.items() if key in name), None)

