"""Shared helpers of the package's tests: where the repository's committed
models and fixtures are, the ``host`` command line to compare with, an
independent reader of safetensors files, and the test-only plugins."""

import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import layerhost

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "fixtures"


def host_exe() -> Path:
    """The ``host`` executable the package was built with (it carries it
    as the worker of isolated layers)."""
    exe = Path(layerhost.__file__).parent / "bin" / "host"
    assert exe.is_file(), f"the package carries no host executable at {exe}"
    return exe


def host(*args, check=True) -> subprocess.CompletedProcess:
    """Runs the command line, from the repository root, on its bundled
    plugins."""
    cmd = [str(host_exe()), *map(str, args), "--plugin-dir", str(layerhost.bundled_plugin_dir())]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def host_error(*args) -> str:
    """The command line's one-line error for ``args``, without ``error: ``."""
    result = host(*args, check=False)
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith("error: "), line
    return line[len("error: "):]


def read_safetensors(path: Path) -> dict:
    """The float32 tensors of a safetensors file, read by its format's
    definition (an 8-byte header length, a JSON header, the data), not by
    the host."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        assert entry["dtype"] == "F32", entry
        start, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(body[start:end], dtype="<f4").reshape(entry["shape"])
    return tensors


@pytest.fixture(scope="session")
def test_plugin_dir() -> Path:
    """The folder holding the test-only plugins (tests/plugins: ``faulty``),
    built by cargo in the repository's workspace."""
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is needed to build the test plugins")
    subprocess.run([cargo, "build", "-q", "-p", "faulty"], cwd=ROOT, check=True, timeout=1200)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug"


def write_model(tmp_path: Path, layers, name="model.json", **extra) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"format": 1, "layers": layers, **extra}))
    return path
