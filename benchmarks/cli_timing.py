"""Wall time of the default CLI path on this machine: `bdiff fit mixture` (10 000 2-D points)
and `bdiff sample --n 10000`, each as a fresh process (imports included). It also prints the
CPU and its float32 matrix-multiply rate on one thread: these commands are bound by it (one
2-core machine here trained at 17 steps/s, those before it at about 52; NOTES.md).

    python benchmarks/cli_timing.py [--dataset mixture] [--n 10000]
    python benchmarks/cli_timing.py --dataset digits --n 2000
"""
import argparse
import platform
import subprocess
import tempfile
import time


def timed(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def cpu_name():
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def matmul_gflops(seconds=1.0):
    """float32 GFLOP/s of one thread on a training-sized product (1024 x 256 by 256 x 256)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 256), torch.randn(256, 256)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    rate = count * 2 * 1024 * 256 * 256 / (time.perf_counter() - start) / 1e9
    torch.set_num_threads(threads)
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mixture")
    parser.add_argument("--n", type=int, default=10_000, help="samples to draw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ckpt, samples = f"{folder}/m.safetensors", f"{folder}/s.npy"
        fit_s = timed(["bdiff", "fit", args.dataset, "-o", ckpt])
        sample_s = timed(["bdiff", "sample", "-c", ckpt, "--n", str(args.n), "-o", samples])
    print(f"{cpu_name()}: float32 matmul {matmul_gflops():.0f} GFLOP/s on one thread")
    print(f"bdiff fit {args.dataset}: {fit_s:.1f} s; bdiff sample --n {args.n}: {sample_s:.1f} s; "
          f"together {fit_s + sample_s:.1f} s")


if __name__ == "__main__":
    main()
