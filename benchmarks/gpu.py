"""One command for a CUDA machine: the field-matching kernels checked against float64, then
timed — naive, chunked torch, PyTorch's memory-efficient SDPA (with its log-sum-exp), Triton
and KeOps — at B = M from 4 096 to 65 536 and D = 2, 16, 64; then `bdiff fit mixture` and
`bdiff sample --n 10000` end to end on CUDA (fresh processes, CLI defaults). Writes JSON and a
PNG of time against size. The SDPA row is the candidate for Triton's D > 8 path (docs/design.md
§6): the measurement decides.

    python benchmarks/gpu.py [--json benchmarks/results/gpu.json] [--png benchmarks/results/gpu.png]

On a CPU (`--device cpu --sizes 256 --dims 2 --no-end-to-end`) it runs as a smoke test: the
CUDA-only variants are reported as skipped.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bdiff.backend import field_matching, triton_available  # noqa: E402
from bdiff.benchmark import PeakMemory, field_matching_keops, keops_available, median_time  # noqa: E402
from bdiff.kernels import field_matching_reference  # noqa: E402


def field_matching_sdpa(x, y, eps):
    """Memory-efficient SDPA (CUDA): queries [x/ε, -1/(2ε)] against keys [y, ‖y‖²], zero-padded
    to a multiple of 8 columns; the values are the keys, so the first D output columns are the
    weighted mean of y, and the op's log-sum-exp is log ŝ up to ‖x‖²/(2ε) and log M."""
    batch, dim = x.shape
    width = 8 * math.ceil((dim + 1) / 8)
    query = torch.zeros(1, 1, batch, width, device=x.device)
    key = torch.zeros(1, 1, y.shape[0], width, device=x.device)
    query[0, 0, :, :dim], query[0, 0, :, dim] = x / eps, -0.5 / eps
    key[0, 0, :, :dim], key[0, 0, :, dim] = y, (y * y).sum(1)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, key, None, True, 0.0, False, scale=1.0)[:2]
    lse = lse[0, 0, :batch] - (x * x).sum(1) / (2 * eps) - math.log(y.shape[0])
    return lse, (out[0, 0, :, :dim] - x) / eps


def variants(device):
    """name -> callable(x, y, eps), or name -> reason it cannot run here."""
    cuda = torch.device(device).type == "cuda"
    found = {"naive": lambda x, y, eps: field_matching(x, y, eps, None, "naive"),
             "chunked": lambda x, y, eps: field_matching(x, y, eps, None, "chunked"),
             "torch": lambda x, y, eps: field_matching(x, y, eps, None, "torch")}
    found["sdpa"] = field_matching_sdpa if cuda else "memory-efficient SDPA runs on CUDA only"
    found["triton"] = ((lambda x, y, eps: field_matching(x, y, eps, None, "triton"))
                       if cuda and triton_available() else "Triton is timed on CUDA only")
    found["keops"] = field_matching_keops if keops_available() else "pykeops is not installed"
    return found


def check(found, device, dims):
    """Largest errors against float64 on odd sizes (B = 1 531, M = 2 049), per variant and D."""
    rows = []
    generator = torch.Generator().manual_seed(1)
    for dim in dims:
        x = torch.randn(1531, dim, generator=generator).to(device)
        y = torch.randn(2049, dim, generator=generator).to(device)
        eps = 0.5 * dim
        ref_lse, ref_mean = field_matching_reference(x, y, eps)
        for name, run in found.items():
            if isinstance(run, str):
                continue
            try:
                with torch.no_grad():
                    lse, mean = run(x, y, eps)
                rows.append({"variant": name, "D": dim,
                             "lse_abs_err": float((lse.double() - ref_lse).abs().max()),
                             "mean_rel_err": float((mean.double() - ref_mean).abs().max() / ref_mean.abs().max())})
            except Exception as error:  # noqa: BLE001 - one broken variant must not end the run
                rows.append({"variant": name, "D": dim, "error": f"{type(error).__name__}: {error}"})
    return rows


def timings(found, device, sizes, dims, repeats):
    rows = []
    generator = torch.Generator().manual_seed(0)
    for dim in dims:
        for size in sizes:
            x = torch.randn(size, dim, generator=generator).to(device)
            y = torch.randn(size, dim, generator=generator).to(device)
            for name, run in found.items():
                row = {"variant": name, "B": size, "M": size, "D": dim}
                if isinstance(run, str):
                    rows.append(dict(row, skipped=run))
                    continue
                if name == "naive" and 3 * 4 * size * size > 0.5 * _memory_bytes(device):
                    rows.append(dict(row, skipped="the B x M matrices exceed memory"))
                    continue
                try:
                    with torch.no_grad(), PeakMemory(device) as memory:
                        run(x, y, 0.5 * dim)  # warm-up: compilation, allocator
                    with torch.no_grad():
                        median = median_time(lambda: run(x, y, 0.5 * dim), repeats, device)
                    rows.append(dict(row, median_s=median, pairs_per_s=size * size / median,
                                     peak_mem_mb=memory.peak_bytes / 2**20))
                except Exception as error:  # noqa: BLE001
                    rows.append(dict(row, error=f"{type(error).__name__}: {error}"))
                print(rows[-1], flush=True)
    return rows


def _memory_bytes(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def end_to_end(device):
    """Wall time of `bdiff fit mixture` and `bdiff sample --n 10000` in fresh processes."""
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        model = os.path.join(folder, "m.safetensors")
        for name, command in (("fit_mixture_s", ["fit", "mixture", "-o", model, "--device", device]),
                              ("sample_10000_s", ["sample", "-c", model, "--n", "10000", "--device", device,
                                                  "-o", os.path.join(folder, "s.npy")])):
            start = time.perf_counter()
            subprocess.run(["bdiff", *command], check=True, capture_output=True)
            result[name] = time.perf_counter() - start
    return result


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims = sorted({r["D"] for r in rows})
    figure, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for axis, dim in zip(axes[0], dims):
        for name in dict.fromkeys(r["variant"] for r in rows):
            points = [(r["B"], r["median_s"]) for r in rows if r["D"] == dim and r["variant"] == name
                      and r.get("median_s")]
            if points:
                axis.loglog(*zip(*points), marker="o", label=name)
        axis.set(title=f"field matching, D = {dim}", xlabel="B = M", ylabel="median s")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", default="4096,16384,65536")
    parser.add_argument("--dims", default="2,16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--json", default="benchmarks/results/gpu.json")
    parser.add_argument("--png", default="benchmarks/results/gpu.png")
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu for a smoke test")
    sizes = [int(v) for v in args.sizes.split(",")]
    dims = [int(v) for v in args.dims.split(",")]
    found = variants(args.device)
    report = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "correctness": check(found, args.device, dims)}
    for row in report["correctness"]:
        print(row, flush=True)
    report["timings"] = timings(found, args.device, sizes, dims, args.repeats)
    if not args.no_end_to_end:
        report["end_to_end"] = end_to_end(args.device)
        print(report["end_to_end"], flush=True)
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=1, allow_nan=False)
    plot(report["timings"], args.png)
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
