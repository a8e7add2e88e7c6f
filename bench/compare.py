"""The host against ONNX Runtime, numpy and PyTorch eager: same models, same weights.

Runs each model in ONNX Runtime, numpy, torch eager (where torch is
installed) and `host bench`, in one go, and prints time-per-forward ratios.

    pip install numpy safetensors onnx onnxruntime threadpoolctl
    pip install torch    # optional: the torch columns and the training rows
    cargo build --release
    python3 bench/compare.py [--threads 1 2] [--min-time 1.0]
        [--isa auto avx2] [--baseline OLD/host] [--repeat 3]
        [--sections inference graph exercises training]

Optional, not run by CI. Ratios are host time / other time: below 1 means
the host is faster. Measured in one run, so they compare like with like on
a shared, noisy machine; absolute times from different runs do not.

Sections (all by default):

- inference: the seed MLP (64-8-1) and the 784-1024-1024-10 MLP with
  `centered`, at batch 1, 64 and 4096, against ONNX Runtime (MatMul, Add,
  Relu), numpy and torch (nn.Sequential of Linear and ReLU).
- graph: the encoder example (models/encoder.json with its shipped weights:
  embedding, one TransformerEncoderLayer(64, 4, 128), the mean over the
  sequence, a linear head) on int64 tokens (64, 128); the same with a key
  padding mask (tests/fixtures/graph/encoder-masked.json, each row keeping
  at least half its keys); and its multihead_attention layer alone
  (embed_dim 64, 4 heads, q = k = v) on a float32 (64, 128, 64) input with
  random weights. ONNX Runtime runs the same function built with
  onnx.helper (opset 17: Gather, MatMul, Split, Softmax, Where,
  LayerNormalization, ReduceMean, ...), torch nn.Embedding +
  nn.TransformerEncoderLayer(dropout=0, batch_first=True) + nn.Linear, or
  nn.MultiheadAttention, with the weights loaded from the same arrays.
  Under each encoder row, the host's time per node.
- exercises: tensor_reduction and fourier against numpy.
- training: one training step, below.

Every inference and graph row also runs `host run` once on the same input
and prints the largest absolute difference of each other runtime's output
from the host's: they must agree within 1e-4 times the largest output
magnitude (at least 1), or the row compares different functions; the script
then names the rows and exits with status 1 at the end.

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
import atexit
import json
import os
import shutil
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


def torch_mlp(torch, dims, params, centered):
    """The MLP as torch.nn.Sequential of Linear and ReLU, with the same
    weights (mydense's are (in, out), Linear's (out, in))."""
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        linear = torch.nn.Linear(a, b)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[f"{i}.weight"].T))
            linear.bias.copy_(torch.from_numpy(params[f"{i}.bias"]))
        layers += [linear, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers).eval()

    def forward(x):
        y = net(x)
        return y - y.mean() if centered else y
    return forward


def torch_timed(torch, forward, inputs, threads, min_time):
    """Seconds per call of `forward` on the numpy arrays `inputs`, in
    inference mode on `threads` threads, and its output."""
    torch.set_num_threads(threads)
    tensors = [torch.from_numpy(x) for x in inputs]
    with torch.inference_mode():
        seconds = timed(lambda: forward(*tensors), min_time)
        return seconds, forward(*tensors).numpy()


class OnnxGraph:
    """An ONNX graph under construction: `op` adds a node and returns the
    name of its output (or outputs), `const` an initializer."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, value):
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type, *inputs, outputs=1, **attrs):
        from onnx import helper
        names = [f"{op_type.lower()}{len(self.nodes)}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def session(self, inputs, output, threads):
        """A session for the graph, fed `inputs` ({name: array}, the first
        two axes named batch and seq) and giving `output`."""
        import onnxruntime as ort
        from onnx import TensorProto, helper
        declared = [helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(x.dtype), ["batch", "seq", *x.shape[2:]])
            for name, x in inputs.items()]
        graph = helper.make_graph(self.nodes, "graph", declared,
                                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                                  self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])


def onnx_linear(g, x, params, prefix):
    """torch.nn.Linear: x · Wᵀ + b, Wᵀ stored as the initializer."""
    w = g.const(f"{prefix}.weight.T", params[f"{prefix}.weight"].T)
    return g.op("Add", g.op("MatMul", x, w), g.const(f"{prefix}.bias", params[f"{prefix}.bias"]))


def onnx_attention(g, x, params, prefix, heads, mask=None):
    """torch.nn.MultiheadAttention(batch_first=True) self-attention on x
    (b, s, E), as torch computes it: one in-projection split into q, k, v;
    q scaled by 1/√d; per head softmax(q kᵀ) v, keys where the bool `mask`
    (b, s) is true set to -inf first; the heads concatenated, projected."""
    e = params[f"{prefix}.in_proj_weight"].shape[1]
    d = e // heads
    qkv = g.op("Add", g.op("MatMul", x, g.const(f"{prefix}.in_proj_weight.T",
                                                 params[f"{prefix}.in_proj_weight"].T)),
               g.const(f"{prefix}.in_proj_bias", params[f"{prefix}.in_proj_bias"]))
    q, k, v = g.op("Split", qkv, g.const(f"{prefix}.split", np.array([e] * 3, np.int64)),
                   axis=2, outputs=3)
    by_head = g.const(f"{prefix}.by_head", np.array([0, 0, heads, d], np.int64))
    scale = g.const(f"{prefix}.scale", np.array(np.sqrt(1 / d), np.float32))
    q = g.op("Transpose", g.op("Reshape", g.op("Mul", q, scale), by_head), perm=[0, 2, 1, 3])
    k = g.op("Transpose", g.op("Reshape", k, by_head), perm=[0, 2, 3, 1])
    v = g.op("Transpose", g.op("Reshape", v, by_head), perm=[0, 2, 1, 3])
    scores = g.op("MatMul", q, k)
    if mask is not None:
        keys = g.op("Unsqueeze", mask, g.const(f"{prefix}.mask_axes", np.array([1, 2], np.int64)))
        scores = g.op("Where", keys, g.const(f"{prefix}.minus_inf", np.array(-np.inf, np.float32)),
                      scores)
    context = g.op("MatMul", g.op("Softmax", scores, axis=-1), v)
    context = g.op("Reshape", g.op("Transpose", context, perm=[0, 2, 1, 3]),
                   g.const(f"{prefix}.merged", np.array([0, 0, e], np.int64)))
    return onnx_linear(g, context, params, f"{prefix}.out_proj")


def onnx_encoder(g, params, heads, tokens, mask=None):
    """models/encoder.json: embedding; TransformerEncoderLayer (post-norm,
    relu) as design.md spells it out; the mean over the sequence; head."""
    def layer_norm(x, prefix):
        return g.op("LayerNormalization", x,
                    g.const(f"{prefix}.weight", params[f"{prefix}.weight"]),
                    g.const(f"{prefix}.bias", params[f"{prefix}.bias"]), axis=-1, epsilon=1e-5)

    x = g.op("Gather", g.const("embed.weight", params["embed.weight"]), tokens, axis=0)
    a = onnx_attention(g, x, params, "encoder.self_attn", heads, mask)
    h = layer_norm(g.op("Add", x, a), "encoder.norm1")
    f = onnx_linear(g, g.op("Relu", onnx_linear(g, h, params, "encoder.linear1")), params,
                    "encoder.linear2")
    y = layer_norm(g.op("Add", h, f), "encoder.norm2")
    return onnx_linear(g, g.op("ReduceMean", y, axes=[1], keepdims=0), params, "head")


def torch_encoder(torch, params, heads):
    """The same encoder in torch: nn.Embedding, nn.TransformerEncoderLayer
    (dropout 0, batch_first, eval), the mean over the sequence, nn.Linear;
    the safetensors keys are its state_dict's."""
    nn = torch.nn
    vocab, d = params["embed.weight"].shape

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.encoder = nn.TransformerEncoderLayer(
                d, heads, params["encoder.linear1.weight"].shape[0], dropout=0.0, batch_first=True)
            self.head = nn.Linear(d, params["head.weight"].shape[0])

        def forward(self, tokens, mask=None):
            h = self.encoder(self.embed(tokens), src_key_padding_mask=mask)
            return self.head(h.mean(dim=1))

    model = Encoder()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    return model.eval()


def torch_attention(torch, params, prefix, heads):
    """nn.MultiheadAttention(E, heads, batch_first=True) on q = k = v."""
    mha = torch.nn.MultiheadAttention(params[f"{prefix}.in_proj_weight"].shape[1], heads,
                                      batch_first=True)
    mha.load_state_dict({k[len(prefix) + 1:]: torch.from_numpy(v) for k, v in params.items()})

    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    return SelfAttention().eval()


def torch_export_session(torch, forward, inputs, threads):
    """ONNX Runtime on torch's own ONNX export of `forward` (what a torch
    user would run in ONNX Runtime), traced on `inputs` ({name: array}) at
    opset 17. torch's fused attention kernel has no export, so the math path
    is traced."""
    import io
    import warnings
    import onnxruntime as ort

    class Traced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.run = forward

        def forward(self, *xs):
            return self.run(*xs)

    buffer = io.BytesIO()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Traced(), tuple(torch.from_numpy(x) for x in inputs.values()),
                              buffer, input_names=list(inputs), output_names=["y"],
                              dynamo=False, opset_version=17)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(buffer.getvalue(), so, providers=["CPUExecutionProvider"])


def host_run(model_json, params_file, inputs, threads, out):
    """The model's output from `host run` on the .npy files `inputs` names
    ({input name: path}; the name None for a chain's one input)."""
    cmd = [str(HOST), "run", str(model_json), "--params", str(params_file), "--output", str(out),
           "--threads", str(threads), "--quiet"]
    for name, path in inputs.items():
        cmd += ["--input", str(path) if name is None else f"{name}={path}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
    return np.load(out)


# Rows whose outputs differed from the host's, reported at the end.
MISMATCHES = []
TOLERANCE = 1e-4


def output_check(row, reference, outputs):
    """The largest absolute difference of each of `outputs` ({runtime:
    array}) from the host's `reference`, as a line to print. Within
    TOLERANCE times the largest magnitude of the reference (at least 1),
    they compute the same function; else the row is recorded as a
    mismatch, as its timings would compare different things."""
    largest = float(np.abs(reference).max(initial=0))
    parts = []
    for runtime, out in outputs.items():
        if out.shape != reference.shape:
            MISMATCHES.append(f"{row}: {runtime}'s output has shape {out.shape}, "
                              f"the host's {reference.shape}")
            parts.append(f"{runtime} shape {out.shape} MISMATCH")
            continue
        diff = float(np.abs(out.astype(np.float64) - reference).max(initial=0))
        same = diff <= TOLERANCE * max(1.0, largest)  # False for NaN
        if not same:
            MISMATCHES.append(f"{row}: {runtime} differs from host run by up to {diff:.3g}")
        parts.append(f"{runtime} {diff:.1e}" + ("" if same else " MISMATCH"))
    return (f"max |output - host run's|: {', '.join(parts)} (outputs up to {largest:.3g}; "
            f"same within {TOLERANCE:g} x max(1, that))")


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

    def bench(self, model_json, params_file, batch, features, threads, min_time, inputs=None):
        """`host bench --json`: a chain on a made-up (batch, features) input,
        or a model on the .npy files `inputs` names ({input name: path})."""
        cmd = [str(self.host), "bench", str(model_json), "--threads", str(threads),
               "--min-time", str(min_time), "--json"]
        if batch is not None:
            cmd += ["--batch", str(batch), "--features", str(features)]
        for name, path in (inputs or {}).items():
            cmd += ["--input", f"{name}={path}"]
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
            # "layer-kernels: <kernel> runs on <path> (...)"
            if line.startswith("layer-kernels: ") and " runs on " in line:
                kernel, rest = line[len("layer-kernels: "):].split(" runs on ", 1)
                self.paths.add(f"{rest.split()[0]} ({kernel})")
        return json.loads(run.stdout)


def host_benches(variants, repeat, *args, **kwargs):
    """Each variant's report with the median time of `repeat` runs, the
    variants run in turn so that each sees the same machine."""
    runs = {v.label: [] for v in variants}
    for _ in range(repeat):
        for v in variants:
            runs[v.label].append(v.bench(*args, **kwargs))
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
    sections = ["inference", "graph", "exercises", "training"]
    ap.add_argument("--sections", nargs="+", default=sections, choices=sections)
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
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # inputs of up to tens of MB
    print(f"CPU: {cpu_description()}")
    print(f"onnxruntime {ort.__version__}, numpy {np.__version__}, "
          f"BLAS {[i.get('internal_api') + ' ' + str(i.get('architecture')) for i in threadpool_info()]}")
    try:
        import torch
        print(f"torch {torch.__version__} (eager, inference_mode)")
    except ImportError:
        torch = None
        print("torch is not installed here: no torch columns (pip install torch to add them)")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set and may slow numpy's OpenBLAS")
    print("host variants: " + "; ".join(
        f"{v.label} = {v.host}" + ("" if v.isa == "auto" else f" with LAYER_KERNELS_ISA={v.isa}")
        for v in variants))

    if "inference" in args.sections:
        inference_rows(args, rng, tmp, variants, torch)
    if "graph" in args.sections:
        graph_rows(args, rng, tmp, variants, torch)
    if "exercises" in args.sections:
        exercise_rows(args, rng, tmp, variants)
    if "training" in args.sections:
        training_rows(args, tmp)
    for v in variants:
        print(f"matrix kernels that ran in {v.label}: {', '.join(sorted(v.paths)) or 'not reported'}")
    if MISMATCHES:
        sys.exit("outputs that differ from the host's (their rows time different functions):\n  "
                 + "\n  ".join(MISMATCHES))


def inference_rows(args, rng, tmp, variants, torch):
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
          + (f" {'torch us':>10s}" if torch else "")
          + f" {'host/ort':>8s} {'host/np':>8s}" + (f" {'host/torch':>10s}" if torch else "")
          + f" {'host GF/s':>9s}"
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
        torch_forward = torch_mlp(torch, dims, params, centered) if torch else None
        for threads in args.threads:
            session = ort_session(dims, params, centered, threads)
            for batch in (1, 64, 4096):
                x = rng.random((batch, dims[0]), dtype=np.float32)
                x_file = tmp / "x.npy"
                np.save(x_file, x)
                t_ort = timed(lambda: session.run(None, {"x": x}), args.min_time)
                with threadpool_limits(threads):
                    t_np = timed(lambda: np_forward(x), args.min_time)
                outputs = {"ort": session.run(None, {"x": x})[0], "numpy": np_forward(x)}
                if torch:
                    t_torch, outputs["torch"] = torch_timed(torch, torch_forward, [x], threads,
                                                            args.min_time)
                reports = host_benches(variants, args.repeat, model_json, params_file, batch,
                                       dims[0], threads, args.min_time)
                report = reports["host"]
                t_host = report["seconds"]
                print(f"{name:32s} {batch:5d} {threads:3d} {t_host * 1e6:10.1f} {t_ort * 1e6:10.1f} "
                      f"{t_np * 1e6:10.1f}" + (f" {t_torch * 1e6:10.1f}" if torch else "")
                      + f" {t_host / t_ort:8.3f} {t_host / t_np:8.3f}"
                      + (f" {t_host / t_torch:10.3f}" if torch else "")
                      + f" {report['flops'] / t_host / 1e9:9.2f}"
                      + "".join(f" {reports[v.label]['seconds'] * 1e6:10.1f}"
                                f" {reports[v.label]['seconds'] / t_ort:9.3f}"
                                f" {t_host / reports[v.label]['seconds']:9.3f}" for v in extra))
                reference = host_run(model_json, params_file, {None: x_file}, threads,
                                     tmp / "y.npy")
                print(f"{'':34s}{output_check(f'{name}, batch {batch}', reference, outputs)}")
                for layer in report["layers"]:
                    if layer["flops"] and batch == 4096 and layer["plugin"] == "mydense":
                        print(f"{'':34s}layer {layer['name']} ({layer['plugin']}): "
                              f"{layer['flops'] / layer['seconds'] / 1e9:.1f} GFLOP/s")


def graph_rows(args, rng, tmp, variants, torch):
    """The encoder example (format 2) at batch 64, sequence 128, without and
    with a key padding mask, and its attention layer alone, against the
    same functions with the same weights in ONNX Runtime (built with
    onnx.helper, and, where torch is installed, torch's own ONNX export of
    the same modules: the faster of the two is compared with) and torch
    eager; each output checked against `host run`'s."""
    from safetensors.numpy import load_file

    batch, seq = 64, 128
    encoder_json = ROOT / "models" / "encoder.json"
    encoder_params = load_file(str(ROOT / "models" / "encoder.safetensors"))
    spec = {n["name"]: n for n in json.loads(encoder_json.read_text())["nodes"]}
    vocab = spec["embed"]["config"]["num_embeddings"]
    heads = spec["encoder.self_attn"]["config"]["num_heads"]
    e = spec["encoder.self_attn"]["config"]["embed_dim"]
    tokens = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    # Each row keeps its first half or more of the keys visible.
    lengths = rng.integers(seq // 2, seq + 1, batch)
    mask = np.arange(seq)[None, :] >= lengths[:, None]
    x = rng.random((batch, seq, e), dtype=np.float32)

    # The attention layer alone: a graph of one node on a float input,
    # with weights in the ranges torch initializes them to, and biases
    # nonzero (torch starts them at zero) so that they are checked too.
    attention_json = tmp / "attention.json"
    attention_json.write_text(json.dumps({
        "format": 2, "name": "attention",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "seq", e]}],
        "nodes": [{"name": "attn", "type": "multihead_attention",
                   "config": {"embed_dim": e, "num_heads": heads},
                   "inputs": {"query": "x", "key": "x", "value": "x"}}],
        "outputs": ["attn"]}))
    bound = np.sqrt(6 / (4 * e))
    attention_params = {
        "attn.in_proj_weight": rng.uniform(-bound, bound, (3 * e, e)).astype(np.float32),
        "attn.in_proj_bias": rng.uniform(-0.1, 0.1, 3 * e).astype(np.float32),
        "attn.out_proj.weight": rng.uniform(-e ** -0.5, e ** -0.5, (e, e)).astype(np.float32),
        "attn.out_proj.bias": rng.uniform(-0.1, 0.1, e).astype(np.float32),
    }
    attention_file = tmp / "attention.safetensors"
    save_file(attention_params, str(attention_file))

    # (row name, model, parameter file, inputs, ONNX graph of the same
    # function on the input names, torch module on the input tensors)
    cases = [
        (f"encoder E{e} h{heads} s{seq}", encoder_json, ROOT / "models" / "encoder.safetensors",
         {"tokens": tokens},
         lambda g: onnx_encoder(g, encoder_params, heads, "tokens"),
         lambda: torch_encoder(torch, encoder_params, heads)),
        (f"encoder E{e} h{heads} s{seq} +mask",
         ROOT / "tests" / "fixtures" / "graph" / "encoder-masked.json",
         ROOT / "models" / "encoder.safetensors", {"tokens": tokens, "mask": mask},
         lambda g: onnx_encoder(g, encoder_params, heads, "tokens", "mask"),
         lambda: torch_encoder(torch, encoder_params, heads)),
        (f"multihead_attention E{e} h{heads} s{seq}", attention_json, attention_file, {"x": x},
         lambda g: onnx_attention(g, "x", attention_params, "attn", heads),
         lambda: torch_attention(torch, attention_params, "attn", heads)),
    ]

    extra = variants[1:]
    print(f"{'graph model':32s} {'batch':>5s} {'thr':>3s} {'host us':>10s} {'ort us':>10s}"
          + (f" {'torch us':>10s}" if torch else "") + f" {'host/ort':>8s}"
          + (f" {'host/torch':>10s}" if torch else "") + f" {'host GF/s':>9s}"
          + "".join(f" {v.label + ' us':>10s} {v.label + '/ort':>9s} {'host/' + v.label:>9s}"
                    for v in extra))
    for name, model_json, params_file, inputs, onnx_build, torch_build in cases:
        files = {}
        for input_name, value in inputs.items():
            files[input_name] = tmp / f"{input_name}.npy"
            np.save(files[input_name], value)
        t_model = torch_build() if torch else None
        for threads in args.threads:
            g = OnnxGraph()
            session = g.session(inputs, onnx_build(g), threads)
            t_ort = timed(lambda: session.run(None, inputs), args.min_time)
            outputs = {"ort": session.run(None, inputs)[0]}
            if torch:
                t_torch, outputs["torch"] = torch_timed(torch, t_model, list(inputs.values()),
                                                        threads, args.min_time)
                # ONNX Runtime on torch's export too; the faster of the two
                # ONNX Runtime graphs is the one compared with.
                exported = torch_export_session(torch, t_model, inputs, threads)
                t_export = timed(lambda: exported.run(None, inputs), args.min_time)
                outputs["ort (torch export)"] = exported.run(None, inputs)[0]
                t_helper, t_ort = t_ort, min(t_ort, t_export)
            reports = host_benches(variants, args.repeat, model_json, params_file, None, None,
                                   threads, args.min_time, inputs=files)
            report = reports["host"]
            t_host = report["seconds"]
            print(f"{name:32s} {batch:5d} {threads:3d} {t_host * 1e6:10.1f} {t_ort * 1e6:10.1f}"
                  + (f" {t_torch * 1e6:10.1f}" if torch else "") + f" {t_host / t_ort:8.3f}"
                  + (f" {t_host / t_torch:10.3f}" if torch else "")
                  + f" {report['flops'] / t_host / 1e9:9.2f}"
                  + "".join(f" {reports[v.label]['seconds'] * 1e6:10.1f}"
                            f" {reports[v.label]['seconds'] / t_ort:9.3f}"
                            f" {t_host / reports[v.label]['seconds']:9.3f}" for v in extra))
            reference = host_run(model_json, params_file, files, threads, tmp / "y.npy")
            print(f"{'':34s}{output_check(f'{name}, {threads} thread(s)', reference, outputs)}")
            if torch:
                print(f"{'':34s}ort us: onnx.helper graph {t_helper * 1e6:.1f}, "
                      f"torch's export {t_export * 1e6:.1f} (the faster is compared with)")
            if len(report["layers"]) > 1:
                nodes = sorted(report["layers"], key=lambda n: -n["seconds"])
                total = sum(n["seconds"] for n in nodes)
                print(f"{'':34s}host nodes (median us, share of their sum): " + ", ".join(
                    f"{n['name']} {n['seconds'] * 1e6:.0f} ({n['seconds'] / total:.0%})"
                    for n in nodes))


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
           "--threads", str(threads)]
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
