#!/usr/bin/env python3
"""What --isolate costs: `host bench` in process and isolated, taken
alternately in the same run, on the seed MLP at batch 1 and the
784-1024-1024-10 MLP at batch 64 and 4096.

    cargo build --release && python3 bench/isolation.py [--rounds 5]

Prints, per case, the median whole-forward time of each mode over the
rounds, the time added per layer call (isolated minus in process, divided
by the layers), and the isolated throughput as a fraction of in process.
Needs only the Python standard library.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.path.join(ROOT, "target", "release", "host")

CASES = [
    # (label, model, batch, features, threads)
    ("seed MLP 64-8-1, batch 1, 1 thread", "models/mlp.json", 1, 64, 1),
    ("MLP 784-1024-1024-10, batch 64, 2 threads", "models/mlp-784.json", 64, None, 2),
    ("MLP 784-1024-1024-10, batch 4096, 2 threads", "models/mlp-784.json", 4096, None, 2),
]


def bench(model, batch, features, threads, isolate, min_time):
    cmd = [HOST, "bench", os.path.join(ROOT, model), "--batch", str(batch),
           "--threads", str(threads), "--min-time", str(min_time), "--json"]
    if features is not None:
        cmd += ["--features", str(features)]
    if isolate:
        cmd.append("--isolate")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report = json.loads(out)
    return report["seconds"], len(report["layers"])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=1.0)
    args = parser.parse_args()
    if not os.path.exists(HOST):
        sys.exit(f"error: {HOST} not found: run `cargo build --release` first")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.rounds} rounds, alternating")
    for label, model, batch, features, threads in CASES:
        times = {False: [], True: []}
        layers = 0
        for _ in range(args.rounds):
            for isolate in (False, True):
                t, layers = bench(model, batch, features, threads, isolate, args.min_time)
                times[isolate].append(t)
        inproc = statistics.median(times[False])
        isolated = statistics.median(times[True])
        added = (isolated - inproc) / layers
        print(f"{label}: in process {inproc * 1e6:.2f} us, isolated {isolated * 1e6:.2f} us; "
              f"added per layer call {added * 1e6:.2f} us; "
              f"isolated throughput {inproc / isolated:.3f} of in process")


if __name__ == "__main__":
    main()
