"""The kernel acceptance numbers on this machine:

    python benchmarks/kernels.py                # B = M = 16384 at D = 2, 64 (naive, torch, keops)
                                                # and peak memory of the torch path at 65536
    python benchmarks/kernels.py --full         # the whole grid: 1k..64k x D in {2, 16, 64, 784}

Writes benchmarks/results/kernels.json. The same engine runs `bdiff benchmark`.
"""
import argparse
import json
import os

import torch

from bdiff.benchmark import run_benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "kernels.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    records = []
    if args.full:
        records += run_benchmark(sizes=(1024, 4096, 16384, 65536), dims=(2, 16, 64, 784),
                                 repeats=3, on_record=print)[0]
    else:
        records += run_benchmark(ops=("field_fwd", "field_fwd_bwd"), sizes=(16384,), dims=(2, 64),
                                 backends=("naive", "torch", "keops"), repeats=3, on_record=print)[0]
        records += run_benchmark(ops=("field_fwd", "sde_oracle"), sizes=(65536,), dims=(2, 64),
                                 backends=("torch",), repeats=1, on_record=print)[0]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(records, handle, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
