"""examples/ray_batch_inference.py on a local Ray instance, against `host
run` on the whole input."""

import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MODELS, ROOT, host

EXAMPLE = ROOT / "examples" / "ray_batch_inference.py"

if os.environ.get("CI") != "true":
    pytest.importorskip("ray.data")


def example():
    spec = importlib.util.spec_from_file_location("ray_batch_inference", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ray_batch_inference_equals_host_run_bit_for_bit(tmp_path):
    rows, blocks, batch = 100_000, 4, 4096
    x = np.random.default_rng(7).standard_normal((rows, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "scored"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    started = time.monotonic()
    subprocess.run(
        [
            sys.executable, EXAMPLE, MODELS / "mlp.json",
            "--input", tmp_path / "x.npy", "--output-dir", out,
            "--blocks", str(blocks), "--batch-size", str(batch),
            "--workers", "2", "--num-cpus", "2", "--time-limit", "600",
        ],
        check=True,
        env=env,
        timeout=900,
    )
    print(f"ray_batch_inference.py on {rows} rows took {time.monotonic() - started:.1f} s")
    ex = example()
    y = ex.read_output(out)
    host("run", "models/mlp.json", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--quiet")
    expected = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float32 and y.shape == expected.shape == (rows, 1)
    assert np.array_equal(y, expected)
    assert len(list(out.glob("*.parquet"))) >= blocks
    sizes = ex.batch_sizes(out)
    assert sizes.min() >= 2 and sizes.max() <= batch


def test_a_model_with_centered_is_refused_before_ray_starts(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((10, 64), np.float32))
    with pytest.raises(SystemExit) as refused:
        example().score(str(MODELS / "dense-centered.json"), str(tmp_path / "x.npy"), str(tmp_path / "out"))
    assert "layer '1' (centered) is not batch-independent" in str(refused.value)
    assert not (tmp_path / "out").exists()
