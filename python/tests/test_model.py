"""The layerhost package against values computed without it: numpy, the
committed fixtures (made with numpy and PyTorch), and the ``host`` command
line."""

import json
import threading

import numpy as np
import pytest

import layerhost
from conftest import FIXTURES, MODELS, ROOT, host, host_error, read_safetensors, write_model


def relu(x):
    return np.maximum(x, 0)


def numpy_mlp(x, params):
    """The chapter's MLP (two mydense layers, relu(x @ W + b)) in float64."""
    h = x.astype(np.float64)
    for layer in ("0", "1"):
        w = params[f"{layer}.weight"].astype(np.float64)
        b = params[f"{layer}.bias"].astype(np.float64)
        h = relu(h @ w + b)
    return h


# ---- running ----


def test_mlp_prints_what_host_run_prints(tmp_path):
    x = np.load(MODELS / "mlp-input.npy")
    y = layerhost.Model(MODELS / "mlp.json")(x)
    out = tmp_path / "y.npy"
    host("run", "models/mlp.json", "--input", "models/mlp-input.npy", "--output", out)
    expected = np.load(out)
    assert y.dtype == np.float32 and y.shape == (2, 1)
    assert np.array_equal(y, expected)
    # And the numbers the README shows, as numpy prints them.
    printed = host("run", "models/mlp.json", "--input", "models/mlp-input.npy").stdout.strip()
    assert str(y) == printed


def test_mlp_matches_numpy_and_the_committed_fixture():
    x = np.load(MODELS / "mlp-input.npy")
    y = layerhost.Model(MODELS / "mlp.json")(x)
    params = read_safetensors(MODELS / "mlp.safetensors")
    np.testing.assert_allclose(y, numpy_mlp(x, params), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.load(FIXTURES / "mlp-expected.npy"), rtol=1e-5)


def test_a_pytorch_state_dict_reproduces_pytorchs_output():
    m = layerhost.Model(MODELS / "mlp.json", params=FIXTURES / "torch-mlp.safetensors")
    y = m(np.load(FIXTURES / "torch-mlp-input.npy"))
    expected = np.load(FIXTURES / "torch-mlp-expected.npy")
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_graph_model_dict_in_dict_out_matches_pytorch():
    m = layerhost.Model(MODELS / "encoder.json")
    assert m.input_names == ["tokens"] and m.output_names == ["head"]
    outs = m.run({"tokens": np.load(MODELS / "encoder-tokens.npy")})
    assert list(outs) == ["head"]
    expected = np.load(FIXTURES / "graph" / "encoder-expected.npy")
    scale = np.abs(expected).max()
    assert np.abs(outs["head"] - expected).max() <= 1e-4 * scale


def test_graph_model_of_two_inputs_matches_pytorch():
    graph = FIXTURES / "graph"
    m = layerhost.Model(graph / "encoder-masked.json")
    outs = m.run({
        "mask": np.load(graph / "encoder-masked-mask.npy"),
        "tokens": np.load(graph / "encoder-masked-tokens.npy"),
    })
    expected = np.load(graph / "encoder-masked-expected.npy")
    scale = np.abs(expected).max()
    assert np.abs(outs["head"] - expected).max() <= 1e-4 * scale


def test_other_dtypes_and_layouts_are_converted_like_the_command_line(tmp_path):
    """A float64 or Fortran-order input gives what the command line gives
    for the same file."""
    x = np.load(FIXTURES / "mlp-input-3d-fortran.npy")
    assert x.flags.f_contiguous and not x.flags.c_contiguous
    m = layerhost.Model(MODELS / "mlp.json")
    out = tmp_path / "y.npy"
    host("run", "models/mlp.json", "--input", FIXTURES / "mlp-input-3d-fortran.npy", "--output", out)
    assert np.array_equal(m(x), np.load(out))
    assert m.lent_addresses == [None]
    x64 = np.load(MODELS / "mlp-input.npy").astype(np.float64)
    np.save(tmp_path / "x64.npy", x64)
    host("run", "models/mlp.json", "--input", tmp_path / "x64.npy", "--output", out)
    assert np.array_equal(m(x64), np.load(out))
    # Small integers widened (int16 is not a host type) still run.
    tokens = np.load(MODELS / "encoder-tokens.npy")
    enc = layerhost.Model(MODELS / "encoder.json")
    assert np.array_equal(
        enc.run({"tokens": tokens.astype(np.int16)})["head"], enc.run({"tokens": tokens})["head"]
    )


def test_a_large_float32_input_is_lent_not_copied():
    x = np.random.default_rng(0).random((250_000, 64), dtype=np.float32)  # 64 MB
    m = layerhost.Model(MODELS / "mlp.json", threads=2)
    y = m(x)
    assert m.lent_addresses == [x.ctypes.data]
    params = read_safetensors(MODELS / "mlp.safetensors")
    rows = slice(0, 1000)
    np.testing.assert_allclose(y[rows], numpy_mlp(x[rows], params), rtol=1e-4, atol=1e-5)
    # A view of every other row is not C-contiguous: converted into a copy.
    y2 = m(x[::2])
    assert m.lent_addresses == [None]
    assert np.array_equal(y2, y[::2])


def test_python_threads_running_one_model_get_what_one_thread_gets():
    m = layerhost.Model(MODELS / "mlp.json", threads=1)
    rng = np.random.default_rng(1)
    xs = [rng.random((500, 64), dtype=np.float32) for _ in range(4)]
    expected = [m(x) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = m(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert np.array_equal(got, want)


def test_the_gil_is_released_while_a_layer_runs(tmp_path, test_plugin_dir, monkeypatch):
    """The faulty plugin's second call blocks until a file exists, for a
    minute at most. This thread creates it only after seeing the plugin
    waiting, which it can only see if the call released the GIL; if not,
    the call fails after a minute and so does this test."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    monkeypatch.setenv("LAYER_TEST_READY", str(ready))
    monkeypatch.setenv("LAYER_TEST_RELEASE", str(release))
    model = write_model(tmp_path, [{"type": "faulty", "config": {"fail": "block_until_signalled"}}])
    m = layerhost.Model(model, plugin_dirs=[test_plugin_dir], threads=1)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    m(x)
    result = {}
    worker = threading.Thread(target=lambda: result.update(y=m(x)))
    worker.start()
    event = threading.Event()
    while not ready.exists() and worker.is_alive():
        event.wait(0.01)
    release.touch()
    worker.join()
    assert np.array_equal(result["y"], x)


# ---- parameters, inspect, plugins ----


def test_params_are_the_files_tensors_as_copies():
    m = layerhost.Model(MODELS / "mlp.json")
    params = m.params((2, 64))
    stored = read_safetensors(MODELS / "mlp.safetensors")
    assert list(params) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    for name, values in stored.items():
        assert np.array_equal(params[name], values)
    params["0.weight"][:] = 0
    assert np.array_equal(m.params((2, 64))["0.weight"], stored["0.weight"])
    # Shapes that depend on the input are taken from the file, as `host
    # params` does without --input-shape.
    assert all(np.array_equal(m.params()[k], v) for k, v in stored.items())


def test_a_graph_models_params_are_its_state_dict():
    params = layerhost.Model(MODELS / "encoder.json").params()
    stored = read_safetensors(MODELS / "encoder.safetensors")
    assert sorted(params) == sorted(stored)
    for name, values in stored.items():
        assert np.array_equal(params[name], values), name


def test_params_whose_shape_depends_on_an_unknown_input_are_refused():
    m = layerhost.Model(MODELS / "dense-centered.json")
    with pytest.raises(layerhost.ParamsError) as err:
        m.params()
    expected = host_error("params", MODELS / "dense-centered.json")
    assert str(err.value) == expected
    assert m.params((3, 64))["0.weight"].shape == (64, 128)


def test_initialized_params_are_what_host_params_prints(tmp_path):
    model = write_model(
        tmp_path, [{"type": "mydense", "config": {"units": 3}}], seed=5
    )
    m = layerhost.Model(model)
    w = m.params((2, 4))["0.weight"]
    assert w.shape == (4, 3)
    printed = host("params", model, "0.weight", "--input-shape", "2,4").stdout
    # `host params` prints the name, then the array as numpy prints it.
    assert str(w) in printed
    # The seed keyword replaces the file's: other values.
    assert not np.array_equal(layerhost.Model(model, seed=6).params((2, 4))["0.weight"], w)
    # And a run uses those parameters: relu(x @ W + 0) (biases start at 0).
    x = np.ones((2, 4), np.float32)
    bias = m.params((2, 4))["0.bias"]
    np.testing.assert_allclose(m(x), relu(x @ w + bias), rtol=1e-6)


def test_inspect_is_host_inspect_json():
    m = layerhost.Model(MODELS / "mlp.json")
    expected = json.loads(host("inspect", MODELS / "mlp.json", "--json", "--input-shape", "2,64").stdout)
    got = m.inspect((2, 64))
    assert got == expected
    # 64*8 + 8 + 8*1 + 1 parameters.
    assert got["total_params"] == 529
    probed = json.loads(host("inspect", MODELS / "encoder.json", "--json").stdout)
    assert layerhost.Model(MODELS / "encoder.json").inspect() == probed


def test_plugins_lists_every_shipped_plugin_from_the_package():
    found = layerhost.plugins()
    shipped = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "Cargo.toml").is_file())
    names = [p["name"] for p in found]
    assert sorted(set(names)) == shipped
    bundled = layerhost.bundled_plugin_dir()
    assert all(p["path"].startswith(str(bundled)) for p in found)
    listed = host("plugins").stdout.splitlines()[1:]
    for plugin in found:
        row = next(line for line in listed if line.split()[0] == plugin["name"])
        assert row.split()[1:3] == [plugin["version"], plugin["interface"]]


def test_row_sharding_is_refused_for_a_model_with_centered():
    assert layerhost.Model(MODELS / "mlp.json").row_sharding_refusal((10, 64)) is None
    reason = layerhost.Model(MODELS / "dense-centered.json").row_sharding_refusal((10, 64))
    assert reason == "layer '1' (centered) is not batch-independent"


# ---- errors ----


def test_error_classes_are_one_family():
    for cls in (layerhost.ModelError, layerhost.PluginError, layerhost.ParamsError, layerhost.InputError):
        assert issubclass(cls, layerhost.Error) and issubclass(cls, Exception)
    assert layerhost.Error.__module__ == "layerhost"


def test_model_errors_carry_the_command_lines_message(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "layers": [}')
    with pytest.raises(layerhost.ModelError) as err:
        layerhost.Model(bad)
    np.save(tmp_path / "x.npy", np.ones((2, 64), np.float32))
    assert str(err.value) == host_error("run", bad, "--input", tmp_path / "x.npy")
    with pytest.raises(layerhost.ModelError):
        layerhost.Model(tmp_path / "missing.json")


def test_plugin_errors_carry_the_command_lines_message(tmp_path):
    model = write_model(tmp_path, [{"type": "mydense", "config": {"units": 0, "nope": 1}}])
    with pytest.raises(layerhost.PluginError) as err:
        layerhost.Model(model)
    np.save(tmp_path / "x.npy", np.ones((2, 64), np.float32))
    assert str(err.value) == host_error("run", model, "--input", tmp_path / "x.npy")
    missing = write_model(tmp_path, [{"type": "no_such_layer"}], name="missing.json")
    with pytest.raises(layerhost.PluginError, match="no_such_layer"):
        layerhost.Model(missing)


def test_params_errors_carry_the_command_lines_message(tmp_path):
    # The torch MLP's file holds (64, 8) weights: an input of 32 features
    # needs (32, 8).
    m = layerhost.Model(MODELS / "mlp.json")
    x = np.ones((2, 32), np.float32)
    with pytest.raises(layerhost.ParamsError) as err:
        m(x)
    np.save(tmp_path / "x.npy", x)
    assert str(err.value) == host_error("run", MODELS / "mlp.json", "--input", tmp_path / "x.npy")
    with pytest.raises(layerhost.ParamsError):
        layerhost.Model(MODELS / "mlp.json", params=tmp_path / "none.safetensors")(np.ones((2, 64), np.float32))


def test_input_errors(tmp_path):
    enc = layerhost.Model(MODELS / "encoder.json")
    tokens = np.load(MODELS / "encoder-tokens.npy")
    # Floats are never truncated to integers, as on the command line.
    with pytest.raises(layerhost.InputError, match="cannot convert float64 to int64"):
        enc.run({"tokens": tokens.astype(np.float64)})
    with pytest.raises(layerhost.InputError, match="has no input 'ids'"):
        enc.run({"ids": tokens})
    with pytest.raises(layerhost.InputError, match="tokens are not given"):
        enc.run({})
    with pytest.raises(layerhost.InputError, match="call run"):
        layerhost.Model(FIXTURES / "graph" / "encoder-masked.json")(tokens)
    # A linear layer of 64 features given 3: the layer refuses the shape.
    linear = write_model(tmp_path, [{"type": "linear", "config": {"in_features": 64, "out_features": 2}}])
    x = np.ones((2, 3), np.float32)
    with pytest.raises(layerhost.InputError) as err:
        layerhost.Model(linear)(x)
    np.save(tmp_path / "x.npy", x)
    assert str(err.value) == host_error("run", linear, "--input", tmp_path / "x.npy")


def test_a_plugin_panic_is_an_exception_and_the_interpreter_goes_on(tmp_path, test_plugin_dir):
    model = write_model(tmp_path, [{"type": "faulty", "config": {"fail": "panic_in_forward"}}])
    m = layerhost.Model(model, plugin_dirs=[test_plugin_dir])
    x = np.ones((2, 3), np.float32)
    for _ in range(2):
        with pytest.raises(layerhost.PluginError) as err:
            m(x)
        assert "panicked" in str(err.value) and "told to panic in forward" in str(err.value)
    np.save(tmp_path / "x.npy", x)
    cli = host_error("run", model, "--input", tmp_path / "x.npy", "--plugin-dir", test_plugin_dir)
    assert str(err.value) == cli
    assert layerhost.Model(MODELS / "mlp.json")(np.load(MODELS / "mlp-input.npy")).shape == (2, 1)


def test_isolated_plugin_that_crashes_is_an_exception(tmp_path, test_plugin_dir):
    model = write_model(tmp_path, [{"type": "faulty", "config": {"fail": "segfault"}}])
    m = layerhost.Model(model, plugin_dirs=[test_plugin_dir], isolate=True, timeout=60)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(layerhost.PluginError) as err:
        m(x)
    np.save(tmp_path / "x.npy", x)
    cli = host_error("--isolate", "run", model, "--input", tmp_path / "x.npy", "--plugin-dir", test_plugin_dir)
    assert str(err.value) == cli
    assert "crashed: SIGSEGV" in cli
    # An isolated run of a working plugin gives what an in-process one gives.
    mlp = MODELS / "mlp.json"
    x = np.load(MODELS / "mlp-input.npy")
    assert np.array_equal(layerhost.Model(mlp, isolate=True)(x), layerhost.Model(mlp)(x))
