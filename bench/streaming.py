"""Streaming a large input through `host run`: peak memory and throughput
of the streamed path (default --batch-size) against the in-memory path (one
chunk holding the whole input), on the same input, in one go.

    cargo build --release
    python3 bench/streaming.py [--rows 262144] [--features 1024] [--repeat 3]

Needs numpy and GNU time (/usr/bin/time -v, for the peak resident set).
Writes the input (rows x features float32: 1 GiB by default) to a
temporary directory once; the model is bench/stream-mlp.json (mydense
1024 -> 256 -> 16). Optional, not run by CI.
"""
import argparse
import filecmp
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "target" / "release" / "host"
MODEL = ROOT / "bench" / "stream-mlp.json"


def write_input(path, rows, features):
    """Uniform [0, 1) float32, written a block at a time so that this
    script does not hold the input either."""
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, features))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 16384):
        end = min(rows, start + 16384)
        x[start:end] = rng.random((end - start, features), dtype=np.float32)
    x.flush()
    del x


def timed_run(args):
    """(wall seconds, peak resident MiB) of one `host run`."""
    out = subprocess.run(
        ["/usr/bin/time", "-v", str(HOST), "run", *args, "--quiet"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"host failed:\n{out.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    hours, minutes, seconds = wall.groups()
    seconds = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    return seconds, rss_kib / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=262144)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        x = tmp / "x.npy"
        write_input(x, opts.rows, opts.features)
        size_mib = x.stat().st_size / 2**20
        base = [str(MODEL), "--input", str(x)]
        if opts.threads:
            base += ["--threads", str(opts.threads)]
        ways = {
            "streamed (default --batch-size)": [],
            "in memory (--batch-size = rows)": ["--batch-size", str(opts.rows)],
        }
        outputs = {}
        results = {}
        # Alternate the two, so that both see the same machine load; the
        # first round also brings the input into the page cache.
        timed_run(base + ["--output", str(tmp / "warm.npy")])
        for _ in range(opts.repeat):
            for i, (name, extra) in enumerate(ways.items()):
                outputs[name] = tmp / f"y{i}.npy"
                t, rss = timed_run(base + extra + ["--output", str(outputs[name])])
                results.setdefault(name, []).append((t, rss))
        print(f"input: {opts.rows} x {opts.features} float32 ({size_mib:.0f} MiB), "
              f"model {MODEL.name}, {opts.repeat} runs each (median time, max peak)")
        medians = {}
        for name, runs in results.items():
            times = sorted(t for t, _ in runs)
            medians[name] = times[len(times) // 2]
            peak = max(r for _, r in runs)
            print(f"{name:34} {medians[name]:6.2f} s  {opts.rows / medians[name]:10.0f} rows/s  "
                  f"{size_mib / medians[name]:7.0f} MiB/s  peak {peak:7.1f} MiB")
        streamed, whole = medians.values()
        print(f"streamed throughput / in-memory throughput: {whole / streamed:.3f}")
        same = filecmp.cmp(*outputs.values(), shallow=False)
        print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
