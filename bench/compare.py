"""Runs the same models with the same weights in ONNX Runtime, numpy and
`host bench`, in one go, and prints time-per-forward ratios.

    pip install numpy safetensors onnx onnxruntime threadpoolctl
    cargo build --release
    python3 bench/compare.py [--threads 1 2] [--min-time 1.0]
        [--isa auto avx2] [--baseline OLD/host] [--repeat 3]
        [--sections inference exercises training]

Optional, not run by CI. Ratios are host time / other time: below 1 means
the host is faster. Measured in one run, so they compare like with like on
a shared, noisy machine; absolute times from different runs do not.

It prints the CPU (model, family, the vector features that matter) and the
matrix-kernel path each host run took, as the kernels report it
(LAYER_KERNELS_REPORT=1). `--isa` times the host once per kernel path
(`auto` is the best the CPU has; `avx2` forces AVX2 on an AVX-512 CPU),
`--baseline` also times another build of the host (for before/after in the
same run), and `--repeat` runs the host variants that many times in turn
and keeps each one's median.

The training section (where torch is installed) times one training step
of the 784-1024-1024-10 MLP (linear, relu; cross_entropy, Adam) at batch
64: `host train` for N and for N + K steps, the difference divided by K
(so start-up and loading cancel), against the same step in torch eager
(gather the batch, forward, loss, backward, Adam) on the same threads.

numpy's OpenBLAS may be slowed on purpose by OPENBLAS_CORETYPE or
OPENBLAS_L2_SIZE in the environment; for a fair sgemm figure run this
script with both unset (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "target" / "release" / "host"


def timed(fn, min_time):
    """Median seconds per call after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def dense_weights(dims, rng):
    """MyDense parameters, (in, out) weights, named as the host names them."""
    params = {}
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        params[f"{i}.weight"] = rng.standard_normal((a, b)).astype(np.float32)
        params[f"{i}.bias"] = rng.standard_normal(b).astype(np.float32)
    return params


def ort_session(dims, params, centered, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    for i in range(len(dims) - 1):
        inits += [numpy_helper.from_array(params[f"{i}.weight"], f"w{i}"),
                  numpy_helper.from_array(params[f"{i}.bias"], f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"])]
        prev = f"r{i}"
    if centered:
        nodes += [helper.make_node("ReduceMean", [prev], ["mean"], keepdims=1),
                  helper.make_node("Sub", [prev, "mean"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", [prev], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def numpy_forward(dims, params, centered):
    def forward(x):
        for i in range(len(dims) - 1):
            x = np.maximum(x @ params[f"{i}.weight"] + params[f"{i}.bias"], 0)
        return x - x.mean() if centered else x
    return forward


# The features that decide which matrix kernels can run, as /proc/cpuinfo
# spells them.
VECTOR_FLAGS = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile"]


def cpu_description():
    """The CPU's model name, family/model and the vector features present."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    flags = set(info.get("flags", "").split())
    present = [f for f in VECTOR_FLAGS if f in flags]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, "
            f"model {info.get('model', '?')}), {os.cpu_count()} logical CPUs; "
            f"vector features: {' '.join(present) or 'none of ' + ' '.join(VECTOR_FLAGS)}")


class HostVariant:
    """One host binary and kernel path to time: the same build with
    LAYER_KERNELS_ISA set, or another build (an older commit)."""

    def __init__(self, label, host, isa):
        self.label, self.host, self.isa = label, host, isa
        self.paths = set()  # kernel paths the runs reported

    def bench(self, model_json, params_file, batch, features, threads, min_time):
        cmd = [str(self.host), "bench", str(model_json), "--batch", str(batch), "--features",
               str(features), "--threads", str(threads), "--min-time", str(min_time), "--json"]
        if params_file:
            cmd += ["--params", str(params_file)]
        env = dict(os.environ, LAYER_KERNELS_REPORT="1")
        env.pop("LAYER_KERNELS_ISA", None)
        if self.isa != "auto":
            env["LAYER_KERNELS_ISA"] = self.isa
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
        for line in run.stderr.splitlines():
            if line.startswith("layer-kernels: matmul runs on "):
                self.paths.add(line.split()[4])
        return json.loads(run.stdout)


def host_benches(variants, repeat, *args):
    """Each variant's report with the median time of `repeat` runs, the
    variants run in turn so that each sees the same machine."""
    runs = {v.label: [] for v in variants}
    for _ in range(repeat):
        for v in variants:
            runs[v.label].append(v.bench(*args))
    return {label: sorted(reports, key=lambda r: r["seconds"])[len(reports) // 2]
            for label, reports in runs.items()}


def mlp_model(dims, centered):
    layers = [{"type": "mydense", "config": {"in_units": dims[0], "units": dims[1]}}]
    layers += [{"type": "mydense", "config": {"units": b}} for b in dims[2:]]
    if centered:
        layers.append({"type": "centered"})
    return {"format": 1, "name": "bench", "layers": layers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--isa", nargs="+", default=["auto"],
                    help="kernel paths to time the host on: auto (the best the CPU has), "
                         "avx512, avx2, baseline; the first one is compared with the others")
    ap.add_argument("--baseline", type=Path,
                    help="another build's host binary (its plugins beside it), timed in the same "
                         "run on the CPU's best path")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each host variant per row, in turn; the median is kept")
    ap.add_argument("--sections", nargs="+", default=["inference", "exercises", "training"],
                    choices=["inference", "exercises", "training"])
    args = ap.parse_args()
    if not HOST.exists():
        sys.exit(f"{HOST} not found: run `cargo build --release` first")
    import onnxruntime as ort
    from threadpoolctl import threadpool_info, threadpool_limits

    variants = [HostVariant("host" if i == 0 else isa, HOST, isa) for i, isa in enumerate(args.isa)]
    if args.baseline:
        variants.append(HostVariant("base", args.baseline, "auto"))
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="layer-bench-"))
    print(f"CPU: {cpu_description()}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"BLAS {[i.get('internal_api') + ' ' + str(i.get('architecture')) for i in threadpool_info()]}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set and may slow numpy's OpenBLAS")
    print("host variants: " + "; ".join(
        f"{v.label} = {v.host}" + ("" if v.isa == "auto" else f" with LAYER_KERNELS_ISA={v.isa}")
        for v in variants))

    if "inference" in args.sections:
        inference_rows(args, rng, tmp, variants)
    if "exercises" in args.sections:
        exercise_rows(args, rng, tmp, variants)
    if "training" in args.sections:
        training_rows(args, tmp)
    for v in variants:
        print(f"matrix kernels that ran in {v.label}: {', '.join(sorted(v.paths)) or 'not reported'}")


def inference_rows(args, rng, tmp, variants):
    from threadpoolctl import threadpool_limits
    # The machine's sgemm rate, through numpy's BLAS on float32.
    a = rng.random((4096, 784), dtype=np.float32)
    b = rng.random((784, 1024), dtype=np.float32)
    for threads in args.threads:
        with threadpool_limits(threads):
            t = timed(lambda: a @ b, args.min_time)
        print(f"numpy sgemm 4096x784x1024, {threads} thread(s): {2 * 4096 * 784 * 1024 / t / 1e9:.1f} GFLOP/s")

    extra = variants[1:]
    print(f"{'model':32s} {'batch':>5s} {'thr':>3s} {'host us':>10s} {'ort us':>10s} {'numpy us':>10s}"
          f" {'host/ort':>8s} {'host/np':>8s} {'host GF/s':>9s}"
          + "".join(f" {v.label + ' us':>10s} {v.label + '/ort':>9s} {'host/' + v.label:>9s}"
                    for v in extra))
    for name, dims, centered in [("seed-mlp 64-8-1", [64, 8, 1], False),
                                 ("mlp 784-1024-1024-10 +centered", [784, 1024, 1024, 10], True)]:
        params = dense_weights(dims, rng)
        params_file = tmp / f"{dims[0]}.safetensors"
        save_file(params, str(params_file))
        model_json = tmp / f"{dims[0]}.json"
        model_json.write_text(json.dumps(mlp_model(dims, centered)))
        np_forward = numpy_forward(dims, params, centered)
        for threads in args.threads:
            session = ort_session(dims, params, centered, threads)
            for batch in (1, 64, 4096):
                x = rng.random((batch, dims[0]), dtype=np.float32)
                t_ort = timed(lambda: session.run(None, {"x": x}), args.min_time)
                with threadpool_limits(threads):
                    t_np = timed(lambda: np_forward(x), args.min_time)
                reports = host_benches(variants, args.repeat, model_json, params_file, batch,
                                       dims[0], threads, args.min_time)
                report = reports["host"]
                t_host = report["seconds"]
                print(f"{name:32s} {batch:5d} {threads:3d} {t_host * 1e6:10.1f} {t_ort * 1e6:10.1f} "
                      f"{t_np * 1e6:10.1f} {t_host / t_ort:8.3f} {t_host / t_np:8.3f} "
                      f"{report['flops'] / t_host / 1e9:9.2f}"
                      + "".join(f" {reports[v.label]['seconds'] * 1e6:10.1f}"
                                f" {reports[v.label]['seconds'] / t_ort:9.3f}"
                                f" {t_host / reports[v.label]['seconds']:9.3f}" for v in extra))
                for layer in report["layers"]:
                    if layer["flops"] and batch == 4096 and layer["plugin"] == "mydense":
                        print(f"{'':34s}layer {layer['name']} ({layer['plugin']}): "
                              f"{layer['flops'] / layer['seconds'] / 1e9:.1f} GFLOP/s")


def exercise_rows(args, rng, tmp, variants):
    from threadpoolctl import threadpool_limits
    # The chapter's exercises, against numpy (ONNX has no such operators).
    print(f"{'layer':32s} {'batch':>5s} {'thr':>3s} {'host us':>10s} {'numpy us':>10s} {'host/np':>8s}")
    n, units = 64, 16
    w = (rng.standard_normal((n, n, units)) / n).astype(np.float32)
    save_file({"0.weight": w}, str(tmp / "reduction.safetensors"))
    reduction = tmp / "reduction.json"
    reduction.write_text(json.dumps({"format": 1, "name": "tensor_reduction", "layers": [
        {"type": "tensor_reduction", "config": {"in_units": n, "units": units}}]}))
    fourier = tmp / "fourier.json"
    fourier.write_text(json.dumps({"format": 1, "name": "fourier", "layers": [{"type": "fourier"}]}))
    w_flat = w.reshape(n * n, units)
    cases = [
        ("tensor_reduction 64 -> 16", reduction, tmp / "reduction.safetensors", n,
         lambda x: (x[:, :, None] * x[:, None, :]).reshape(len(x), -1) @ w_flat),
        ("fourier n=1024 (complex)", fourier, None, 1024,
         lambda x: np.fft.rfft(x)[:, : x.shape[1] // 2]),
    ]
    for name, model_json, params_file, features, np_fn in cases:
        x = rng.random((4096, features), dtype=np.float32)
        for threads in args.threads:
            with threadpool_limits(threads):
                t_np = timed(lambda: np_fn(x), args.min_time)
            report = variants[0].bench(model_json, params_file, 4096, features, threads,
                                       args.min_time)
            t_host = report["seconds"]
            print(f"{name:32s} {4096:5d} {threads:3d} {t_host * 1e6:10.1f} {t_np * 1e6:10.1f} "
                  f"{t_host / t_np:8.3f}")


def host_train_seconds(model_json, data, steps, threads):
    """Wall seconds of `host train` for `steps` steps."""
    cmd = [str(HOST), "train", str(model_json), "--data", str(data), "--loss", "cross_entropy",
           "--optimizer", "adam", "--lr", "1e-4", "--batch-size", "64", "--epochs", "1000",
           "--max-steps", str(steps), "--quiet", "--out", str(data.with_suffix(".out")),
           ]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return time.perf_counter() - start


def training_rows(args, tmp):
    """One training step of the 784 MLP at batch 64, host against torch eager."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("training: torch is not installed here; no training rows")
        return
    dims = [784, 1024, 1024, 10]
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        if i:
            layers.append({"type": "relu"})
        layers.append({"type": "linear", "config": {"in_features": a, "out_features": b}})
    model_json = tmp / "train-784.json"
    model_json.write_text(json.dumps({"format": 1, "name": "train-784", "layers": layers}))
    rng = np.random.default_rng(1)
    examples = 1024
    x = rng.random((examples, 784), dtype=np.float32)
    y = rng.integers(0, 10, examples)
    data = tmp / "train-784.npz"
    np.savez(data, input=x, target=y)
    print(f"torch {torch.__version__}; a training step of 784-1024-1024-10 (linear, relu), "
          f"cross_entropy, Adam, batch 64")
    print(f"{'training step':32s} {'batch':>5s} {'thr':>3s} {'host us':>10s} {'torch us':>10s}"
          f" {'host/torch':>10s}")
    for threads in args.threads:
        short, extra = 3, 40
        t_host = []
        for _ in range(max(args.repeat, 3)):
            t_host.append((host_train_seconds(model_json, data, short + extra, threads)
                           - host_train_seconds(model_json, data, short, threads)) / extra)
        t_host = sorted(t_host)[len(t_host) // 2]
        torch.set_num_threads(threads)
        net = torch.nn.Sequential(
            torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(), torch.nn.Linear(1024, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        order = torch.randperm(examples)
        state = {"at": 0}

        def step():
            at = state["at"]
            rows = order[at:at + 64]
            state["at"] = (at + 64) % examples
            opt.zero_grad()
            loss = F.cross_entropy(net(xt[rows]), yt[rows])
            loss.backward()
            opt.step()

        t_torch = timed(step, args.min_time)
        print(f"{'784-1024-1024-10 train step':32s} {64:5d} {threads:3d} {t_host * 1e6:10.1f} "
              f"{t_torch * 1e6:10.1f} {t_host / t_torch:10.3f}")


if __name__ == "__main__":
    main()
