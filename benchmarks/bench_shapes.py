"""Benchmark the procedural shapes generator: images per second for 50,000 32×32 images.

Prints a table and writes outputs/benchmarks/shapes.json. Each configuration (plain, with
clutter, with clusters) is generated --repeats times, interleaved, and the median is kept;
the script re-executes itself with a steady allocator (benchmarks/timing.py).

    python benchmarks/bench_shapes.py [--n 50000] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

from timing import interleaved, steady_malloc

if __name__ == "__main__":
    steady_malloc()

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from moe_exp.data.shapes import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "default": {},
    "clutter=3": {"clutter": 3},
    "clusters=rotate90,invert,channel_swap": {
        "clusters": ["rotate90", "invert", "channel_swap"],
        "cluster_fraction": 0.5,
    },
    "6 shapes x 8 colours, clutter=2, clusters=flip": {
        "num_shapes": 6,
        "num_colours": 8,
        "clutter": 2,
        "clusters": ["flip"],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generate_shapes(256, seed=0, image_size=args.image_size)  # warm-up
    times = interleaved(
        {
            name: lambda options=options: generate_shapes(
                args.n, seed=0, image_size=args.image_size, **options
            )
            for name, options in CONFIGS.items()
        },
        args.repeats,
        warmup=0,
    )

    results = []
    print(f"{args.n} images of {args.image_size}x{args.image_size}, {args.threads} thread(s), "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'configuration':<48} {'seconds':>8} {'images/s':>10}")
    for name, ts in times.items():
        median = statistics.median(ts)
        rate = args.n / median
        results.append({"config": name, "seconds": median, "images_per_s": rate, "all_s": ts})
        print(f"{name:<48} {median:8.2f} {rate:10.0f}")

    out = ROOT / "outputs" / "benchmarks" / "shapes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "n": args.n,
        "image_size": args.image_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
