"""Runs the same models with the same weights in ONNX Runtime, numpy and
`host bench`, in one go, and prints time-per-forward ratios.

    pip install numpy safetensors onnx onnxruntime
    cargo build --release
    python3 bench/compare.py [--threads 1 2] [--min-time 1.0]

Optional, not run by CI. Ratios are host time / other time: below 1 means
the host is faster. Measured in one run, so they compare like with like on
a shared, noisy machine; absolute times from different runs do not.
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


def host_bench(model_json, params_file, batch, features, threads, min_time):
    cmd = [str(HOST), "bench", str(model_json), "--batch", str(batch), "--features", str(features),
           "--threads", str(threads), "--min-time", str(min_time), "--json"]
    if params_file:
        cmd += ["--params", str(params_file)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


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
    args = ap.parse_args()
    if not HOST.exists():
        sys.exit(f"{HOST} not found: run `cargo build --release` first")
    import onnxruntime as ort
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="layer-bench-"))
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"BLAS {[i.get('internal_api') + ' ' + str(i.get('architecture')) for i in threadpool_info()]}")

    # The machine's sgemm rate, through numpy's BLAS on float32.
    a = rng.random((4096, 784), dtype=np.float32)
    b = rng.random((784, 1024), dtype=np.float32)
    for threads in args.threads:
        with threadpool_limits(threads):
            t = timed(lambda: a @ b, args.min_time)
        print(f"numpy sgemm 4096x784x1024, {threads} thread(s): {2 * 4096 * 784 * 1024 / t / 1e9:.1f} GFLOP/s")

    print(f"{'model':32s} {'batch':>5s} {'thr':>3s} {'host us':>10s} {'ort us':>10s} {'numpy us':>10s}"
          f" {'host/ort':>8s} {'host/np':>8s} {'host GF/s':>9s}")
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
                report = host_bench(model_json, params_file, batch, dims[0], threads, args.min_time)
                t_host = report["seconds"]
                print(f"{name:32s} {batch:5d} {threads:3d} {t_host * 1e6:10.1f} {t_ort * 1e6:10.1f} "
                      f"{t_np * 1e6:10.1f} {t_host / t_ort:8.3f} {t_host / t_np:8.3f} "
                      f"{report['flops'] / t_host / 1e9:9.2f}")
                for layer in report["layers"]:
                    if layer["flops"] and batch == 4096 and layer["plugin"] == "mydense":
                        print(f"{'':34s}layer {layer['name']} ({layer['plugin']}): "
                              f"{layer['flops'] / layer['seconds'] / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
