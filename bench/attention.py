"""Attention against ONNX Runtime and PyTorch, in one run.

Times `multihead_attention` alone (bench/attention.json: self-attention,
E 64, 4 heads) and models/encoder.json with `host bench`, beside ONNX
Runtime and PyTorch (eager) running the same modules:
nn.MultiheadAttention(64, 4, batch_first=True), and Embedding(1000, 64) ->
TransformerEncoderLayer(64, 4, 128, dropout=0, batch_first=True) -> mean
over the sequence -> Linear(64, 10) (random weights: only time matters).
Each variant is run --repeat times in turn and its fastest run kept; the
ratios compare like with like.

    pip install numpy torch onnx onnxruntime
    cargo build --release && python3 bench/attention.py [--baseline DIR]...

--baseline DIR times the host again with the plugins in DIR found first
(a copy of another build's libmultihead_attention.so, say), for a before
and after in the same run.
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = ROOT / "bench" / "attention.json"
ENCODER = ROOT / "models" / "encoder.json"
E, HEADS, VOCAB = 64, 4, 1000


def host_bench(host, model, batch, seq, threads, min_time, plugin_dir):
    """Seconds per forward of the whole model and of its attention node."""
    cmd = [str(host), "bench", str(model), "--batch", str(batch), "--threads", str(threads),
           "--min-time", str(min_time), "--json"]
    if model == ENCODER:
        cmd += ["--input-shape", f"tokens={batch},{seq}"]
    else:
        cmd += ["--input-shape", f"x={batch},{seq},{E}"]
    if plugin_dir:
        cmd += ["--plugin-dir", plugin_dir]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    attention = [layer["seconds"] for layer in report["layers"]
                 if layer["plugin"] == "multihead_attention"]
    return report["seconds"], attention[0]


def median_time(run, min_time):
    for _ in range(3):
        run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_time:
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, E)
        self.layer = nn.TransformerEncoderLayer(E, HEADS, 128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 10)

    def forward(self, tokens):
        return self.head(self.layer(self.embed(tokens)).mean(dim=1))


def ort_session(module, example, name, threads):
    buffer = io.BytesIO()
    # torch's fused attention kernel has no ONNX export: trace the math path.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(module, (example,), buffer, input_names=[name], output_names=["y"],
                              dynamo=False, opset_version=17)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=ROOT / "target" / "release" / "host")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", action="append", default=[], metavar="DIR")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    attention, encoder = Attention().eval(), Encoder().eval()
    x = torch.rand(args.batch, args.seq, E)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq))
    ort_attention = ort_session(attention, x, "x", args.threads)
    ort_encoder = ort_session(encoder, tokens, "tokens", args.threads)
    x_np, tokens_np = x.numpy(), tokens.numpy()

    variants = [("host", None)] + [(f"host [{d}]", d) for d in args.baseline]
    runs = {}
    for _ in range(args.repeat):
        for label, plugin_dir in variants:
            _, alone = host_bench(args.host, ATTENTION, args.batch, args.seq, args.threads,
                                  args.min_time, plugin_dir)
            whole, node = host_bench(args.host, ENCODER, args.batch, args.seq, args.threads,
                                     args.min_time, plugin_dir)
            runs.setdefault((label, "attention"), []).append(alone)
            runs.setdefault((label, "encoder"), []).append(whole)
            runs.setdefault((label, "encoder's attention node"), []).append(node)
        with torch.no_grad():
            for label, model, run in [
                ("onnxruntime", "attention", lambda: ort_attention.run(None, {"x": x_np})),
                ("onnxruntime", "encoder", lambda: ort_encoder.run(None, {"tokens": tokens_np})),
                ("torch", "attention", lambda: attention(x)),
                ("torch", "encoder", lambda: encoder(tokens)),
            ]:
                runs.setdefault((label, model), []).append(median_time(run, args.min_time))

    best = {key: min(times) for key, times in runs.items()}
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs; batch {args.batch}, sequence {args.seq}, "
          f"{args.threads} thread(s); onnxruntime {ort.__version__}, torch {torch.__version__}; "
          f"fastest of {args.repeat}")
    for (label, model), seconds in best.items():
        print(f"  {label:28s} {model:26s} {seconds * 1e3:9.3f} ms")
    for label, _ in variants:
        ratios = "  ".join(
            f"{model} {best[(label, model)] / best[(other, model)]:.2f}x {other}"
            for model in ("attention", "encoder") for other in ("onnxruntime", "torch"))
        print(f"  {label}: {ratios}")


if __name__ == "__main__":
    main()
