"""Where a training step's time goes: smoothed targets (the kernel) versus the network
forward/backward and optimiser, at the default batch and reference sizes on 2-D data.

    python benchmarks/profile_training.py [--dataset mixture] [--steps 100]
"""
import argparse
import time

import torch

import bdiff.losses as losses
from bdiff.datasets import BUILTINS
from bdiff.trainer import FitConfig, Trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mixture")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    trainer = Trainer(BUILTINS[args.dataset].load("train"), FitConfig(backend=args.backend), args.dataset)
    spent = {"targets": 0.0}
    original = losses.smoothed_targets

    def timed_targets(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        spent["targets"] += time.perf_counter() - start
        return result

    losses.smoothed_targets = timed_targets
    for _ in range(10):  # warm-up
        trainer.train_step()
    spent["targets"] = 0.0
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    total = time.perf_counter() - start
    print(f"{args.dataset}: {min(len(trainer.refs), trainer.cfg.max_refs)} of {len(trainer.refs)} "
          f"references per step, batch {trainer.cfg.batch_size}, "
          f"{args.steps} steps in {total:.2f} s ({1000 * total / args.steps:.1f} ms/step)")
    print(f"smoothed targets: {1000 * spent['targets'] / args.steps:.1f} ms/step "
          f"({100 * spent['targets'] / total:.0f}% of the step)")


if __name__ == "__main__":
    main()
