"""Score a dataset with a layerhost model on Ray Data, and write the
outputs as Parquet shards.

    python examples/ray_batch_inference.py MODEL --input X.npy --output-dir OUT/

The rows of X.npy (axis 0) are cut into blocks; each Ray worker loads the
model once (a callable class: `map_batches` keeps one instance per actor)
and runs it on batches of rows, reading them from X.npy itself (memory
mapped), so the input never passes through the driver. Each output shard
holds, per row, its index in X.npy (`id`), the size of the batch it was
run in (`batch_rows`) and the output row flattened into float columns
`y0`, `y1`, ...; `read_output(OUT)` puts them back together in row order,
with the shape recorded in OUT/layerhost-output.json.

Cutting rows into batches gives the result of one run on the whole input,
bit for bit, only for a batch-independent model (each output row depends
on its input row alone): a model with such a layer as `centered`, which
subtracts the mean of the whole tensor, is refused before anything runs,
with the reason. A batch is never run with one row (kernels take a faster
path for a single row whose rounding differs in the last bits): should Ray
hand over a one-row batch, it is run as two copies of that row.

Without --address the script starts a local Ray instance on the loopback
interface only (no dashboard, no usage statistics); with --address it
joins a running cluster (`--address auto` on a cluster node, or
`ray://HEAD:10001`), where X.npy, the model file and OUT/ must be at the
same paths on every node (a shared file system), and every node needs the
layerhost package installed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

import layerhost

META = "layerhost-output.json"


class RowScorer:
    """One per Ray worker: loads the model once, then scores batches of row
    indices by reading those rows from the memory-mapped input."""

    def __init__(self, model: str, input: str, params: Optional[str] = None, threads: int = 1):
        self.model = layerhost.Model(model, params=params, threads=threads)
        self.x = np.load(input, mmap_mode="r")

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        ids = batch["id"]
        rows = np.ascontiguousarray(self.x[ids])
        if len(ids) == 1:
            y = self.model(np.concatenate([rows, rows]))[:1]
        else:
            y = self.model(rows)
        flat = y.reshape(len(ids), -1)
        out = {"id": ids, "batch_rows": np.full(len(ids), len(ids), dtype=np.int64)}
        for j in range(flat.shape[1]):
            out[f"y{j}"] = flat[:, j]
        return out


def score(
    model: str,
    input: str,
    output_dir: str,
    *,
    params: Optional[str] = None,
    blocks: int = 4,
    batch_size: int = 4096,
    workers: int = 2,
) -> int:
    """Scores every row of `input` into Parquet shards in `output_dir`, on
    the Ray instance `ray.init` connected to. Returns the number of rows."""
    model, input = os.path.abspath(model), os.path.abspath(input)
    x = np.load(input, mmap_mode="r")
    if x.ndim < 2:
        raise SystemExit(f"error: {input}: rows need a batch axis; its shape is {x.shape}")
    probe = layerhost.Model(model, params=params, threads=1)
    refusal = probe.row_sharding_refusal((2,) + x.shape[1:])
    if refusal is not None:
        raise SystemExit(
            f"error: {model}: cannot be run on blocks of rows with the result of one run: {refusal}"
        )
    if batch_size < 2:
        raise SystemExit("error: --batch-size: give at least 2 rows")
    row_shape = probe(np.ascontiguousarray(x[:2])).shape[1:]
    del probe

    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # The row indices are made before the workers start: they hold every
    # CPU they are given, and a read task waiting for one would never run.
    ds = ray.data.range(len(x), override_num_blocks=blocks).materialize()
    scored = ds.map_batches(
        RowScorer,
        fn_constructor_kwargs={"model": model, "input": input, "params": params},
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=workers,
        num_cpus=1,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored.write_parquet(str(out))
    (out / META).write_text(json.dumps({"rows": len(x), "row_shape": list(row_shape)}))
    return len(x)


def _shards(output_dir: str, columns=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(output_dir).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(str(f), columns=columns) for f in files])


def read_output(output_dir: str) -> np.ndarray:
    """The outputs written by `score`, in row order, in their shape."""
    out = Path(output_dir)
    meta = json.loads((out / META).read_text())
    table = _shards(output_dir).sort_by("id")
    ids = table["id"].to_numpy()
    if not np.array_equal(ids, np.arange(meta["rows"])):
        raise ValueError(f"{out}: the shards do not hold each row once")
    width = int(np.prod(meta["row_shape"], dtype=np.int64))
    columns = [table[f"y{j}"].to_numpy() for j in range(width)]
    flat = np.stack(columns, axis=1) if columns else np.empty((meta["rows"], 0), np.float32)
    return flat.reshape([meta["rows"], *meta["row_shape"]])


def batch_sizes(output_dir: str) -> np.ndarray:
    """The size of the batch each row was run in."""
    return _shards(output_dir, ["batch_rows"])["batch_rows"].to_numpy()


def _out_of_time(signum, frame):
    raise TimeoutError("--time-limit reached")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the model file (batch-independent, one input, one output)")
    parser.add_argument("--input", required=True, help="the rows to score, an .npy file")
    parser.add_argument("--output-dir", required=True, help="where the Parquet shards go")
    parser.add_argument("--params", help="parameters instead of the model file's")
    parser.add_argument("--blocks", type=int, default=4, help="blocks the rows are cut into")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per model call")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors, each with the model")
    parser.add_argument("--address", help="a running Ray cluster (default: a local instance)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local instance")
    parser.add_argument(
        "--time-limit", type=int, help="give up (and stop Ray) after this many seconds"
    )
    args = parser.parse_args(argv)
    if args.time_limit:
        signal.signal(signal.SIGALRM, _out_of_time)
        signal.alarm(args.time_limit)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(
            num_cpus=args.num_cpus,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
        )
    try:
        rows = score(
            args.model,
            args.input,
            args.output_dir,
            params=args.params,
            blocks=args.blocks,
            batch_size=args.batch_size,
            workers=args.workers,
        )
    finally:
        ray.shutdown()
    print(f"scored {rows} rows into {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
