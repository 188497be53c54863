"""Wall time of the default CLI path on this machine: `bdiff fit mixture` (10 000 2-D points)
and `bdiff sample --n 10000`, each as a fresh process (imports included).

    python benchmarks/cli_timing.py [--dataset mixture] [--n 10000]
    python benchmarks/cli_timing.py --dataset digits --n 2000
"""
import argparse
import subprocess
import tempfile
import time


def timed(command):
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mixture")
    parser.add_argument("--n", type=int, default=10_000, help="samples to draw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ckpt, samples = f"{folder}/m.safetensors", f"{folder}/s.npy"
        fit_s = timed(["bdiff", "fit", args.dataset, "-o", ckpt])
        sample_s = timed(["bdiff", "sample", "-c", ckpt, "--n", str(args.n), "-o", samples])
    print(f"bdiff fit {args.dataset}: {fit_s:.1f} s; bdiff sample --n {args.n}: {sample_s:.1f} s; "
          f"together {fit_s + sample_s:.1f} s")


if __name__ == "__main__":
    main()
