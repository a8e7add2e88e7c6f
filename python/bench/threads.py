"""Does a model call release the GIL? Two Python threads, each running a
784-1024-1024-10 MLP (mydense layers) at batch 64 with threads=1, against
the same calls made one after the other on one thread.

    python python/bench/threads.py [--calls 200] [--repeats 5]

Prints the CPU, the time per call on one thread, the wall time of both
workloads one after the other and on two threads at once, and the ratio
(2.0 would be perfect scaling on two free cores), and the CPU time the
process used per second of the threaded run (above 1.0 only when both
threads computed at once). Not a test: timings
depend on the machine and on what else runs on it.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import layerhost

MODEL = {
    "format": 1,
    "name": "mlp-784-1024-1024-10",
    "layers": [
        {"type": "mydense", "config": {"in_units": 784, "units": 1024}},
        {"type": "mydense", "config": {"units": 1024}},
        {"type": "mydense", "config": {"units": 10}},
    ],
    "seed": 0,
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200, help="calls per workload")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp.json"
        path.write_text(json.dumps(MODEL))
        models = [layerhost.Model(path, threads=1) for _ in range(2)]
    rng = np.random.default_rng(0)
    xs = [rng.random((64, 784), dtype=np.float32) for _ in range(2)]
    for m, x in zip(models, xs):
        m(x)  # plans and parameters prepared once per input shape

    def workload(i: int) -> None:
        for _ in range(args.calls):
            models[i](xs[i])

    def sequential() -> float:
        start = time.perf_counter()
        workload(0)
        workload(1)
        return time.perf_counter() - start

    cpu_per_wall = []

    def parallel() -> float:
        threads = [threading.Thread(target=workload, args=(i,)) for i in range(2)]
        start, cpu = time.perf_counter(), time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        cpu_per_wall.append((time.process_time() - cpu) / wall)
        return wall

    seq = min(sequential() for _ in range(args.repeats))
    par = min(parallel() for _ in range(args.repeats))
    per_call = seq / (2 * args.calls)
    flops = 2 * 64 * (784 * 1024 + 1024 * 1024 + 1024 * 10)
    print(f"cpu: {cpu_name()} ({len(Path('/proc/cpuinfo').read_text().split('processor')) - 1} logical CPUs)")
    print(f"one call (batch 64, threads=1): {per_call * 1e3:.3f} ms, {flops / per_call / 1e9:.1f} GFLOP/s")
    print(f"2 x {args.calls} calls one after the other: {seq:.3f} s")
    print(f"2 x {args.calls} calls on two Python threads: {par:.3f} s")
    print(f"speedup: {seq / par:.2f}x")
    # Above 1 only if both threads computed at the same time (the GIL was
    # released); what other processes take from the cores caps it.
    print(f"cores busy while two threads ran: {max(cpu_per_wall):.2f}")
    print(f"load average: {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
