//! What a user can trust: `host check-plugin` names what is wrong with a
//! plugin, every bad input gets one clear message and a non-zero exit status,
//! and a pinned model refuses a library that changed.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use support::*;

// ---- host check-plugin ----

/// The outcome of each check as `check-plugin` printed it, keyed by
/// (config, check name); checks that run once have the config "".
fn outcomes(stdout: &str) -> BTreeMap<(String, String), String> {
    let mut config = String::new();
    let mut table = BTreeMap::new();
    for line in stdout.lines() {
        if let Some(c) = line
            .strip_prefix("with config ")
            .and_then(|c| c.strip_suffix(':'))
        {
            config = c.to_string();
        } else if let Some((outcome, rest)) = line.split_once(' ') {
            if matches!(outcome, "PASS" | "FAIL" | "SKIP") {
                let name = rest.split_whitespace().next().expect("a check name");
                table.insert((config.clone(), name.to_string()), outcome.to_string());
            }
        }
    }
    table
}

fn expect_outcomes(
    table: &BTreeMap<(String, String), String>,
    config: &str,
    expected: &[(&str, &str)],
) {
    let actual: Vec<(&str, &str)> = table
        .iter()
        .filter(|((c, _), _)| c == config)
        .map(|((_, name), outcome)| (name.as_str(), outcome.as_str()))
        .collect();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(actual, expected, "config {config}");
}

#[test]
fn check_plugin_passes_the_shipped_plugins() {
    let run = host(&["check-plugin", "mydense", "--config", r#"{"units": 3}"#]);
    let table = outcomes(run.ok());
    assert_eq!(table[&(String::new(), "identity".into())], "PASS");
    assert_eq!(table[&(String::new(), "bad-config-refused".into())], "PASS");
    expect_outcomes(
        &table,
        r#"{"units":3}"#,
        &[
            ("create", "PASS"),
            ("input-shapes", "PASS"),
            ("forward-writes-output", "PASS"),
            ("batch-independence", "PASS"),
            ("deterministic", "PASS"),
            ("threads", "PASS"),
            ("finite-output", "PASS"),
            ("lent-threads", "PASS"),
            ("gradcheck", "PASS"),
        ],
    );
    // At real sizes the kernel may take a single-row path that rounds a lone
    // row differently in the last bits, or may not: that depends on the CPU
    // (AVX2 machines differ, AVX-512 ones have given identical bits). What
    // must hold everywhere: pieces of two or more rows, the only pieces the
    // host makes, match bit for bit, and single rows are within 1e-5.
    let run = host(&[
        "check-plugin",
        "mydense",
        "--config",
        r#"{"units": 1024, "in_units": 784}"#,
    ]);
    let stdout = run.ok();
    let line = stdout
        .lines()
        .find(|l| l.contains("batch-independence"))
        .unwrap_or_else(|| panic!("no batch-independence line in:\n{stdout}"));
    assert!(
        line.starts_with(
            "PASS batch-independence     whole batch equals its pieces bit for bit, single rows "
        ),
        "{stdout}"
    );
    assert!(
        line.contains("single rows bit for bit too") || line.contains("single rows within 1e-5"),
        "{stdout}"
    );

    // centered does not claim batch independence: nothing is checked.
    let lib = plugin_dir().join("libcentered.so");
    let run = host(&["check-plugin", path_str(&lib)]);
    let stdout = run.ok();
    assert!(
        stdout.contains(
            "SKIP batch-independence     the plugin does not claim batch independence; \
             nothing checked"
        ),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("10 passed, 0 failed, 1 skipped\n"),
        "{stdout}"
    );
}

#[test]
fn check_plugin_names_each_broken_behaviour_of_the_faulty_plugin() {
    let configs = [
        "wrong_output_shape",
        "batch_dependent",
        "panic_on_empty_batch",
        "nondeterministic",
        "thread_dependent",
        "panic_in_lent_task",
        "infinite_output",
        "panic_in_shape",
        "panic_in_new",
        "error_in_forward",
    ];
    let mut args = vec!["check-plugin".to_string(), "faulty".to_string()];
    for c in configs {
        args.push("--config".into());
        args.push(format!(r#"{{"fail": "{c}"}}"#));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = host(&args);
    let err = run.failed();
    assert_eq!(
        err,
        "error: plugin 'faulty' failed 13 of 64 conformance checks\n"
    );
    let table = outcomes(&run.stdout);
    let pass = "PASS";
    let fail = "FAIL";
    let all_pass_but = |failing: &[&'static str]| -> Vec<(&'static str, &'static str)> {
        [
            "create",
            "input-shapes",
            "forward-writes-output",
            "batch-independence",
            "deterministic",
            "threads",
            "finite-output",
            "lent-threads",
        ]
        .into_iter()
        .map(|name| (name, if failing.contains(&name) { fail } else { pass }))
        // faulty is forward-only.
        .chain([("gradcheck", "SKIP")])
        .collect()
    };
    expect_outcomes(
        &table,
        r#"{"fail":"wrong_output_shape"}"#,
        &all_pass_but(&["forward-writes-output"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"batch_dependent"}"#,
        &all_pass_but(&["batch-independence"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"panic_on_empty_batch"}"#,
        &all_pass_but(&["forward-writes-output"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"nondeterministic"}"#,
        &all_pass_but(&[
            "batch-independence",
            "deterministic",
            "threads",
            "lent-threads",
        ]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"thread_dependent"}"#,
        &all_pass_but(&["lent-threads"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"panic_in_lent_task"}"#,
        &all_pass_but(&["lent-threads"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"infinite_output"}"#,
        &all_pass_but(&["finite-output"]),
    );
    expect_outcomes(
        &table,
        r#"{"fail":"panic_in_shape"}"#,
        &[("create", pass), ("input-shapes", fail)],
    );
    expect_outcomes(&table, r#"{"fail":"panic_in_new"}"#, &[("create", fail)]);
    // When forward always fails, the checks that need its output are skipped.
    expect_outcomes(
        &table,
        r#"{"fail":"error_in_forward"}"#,
        &[
            ("create", pass),
            ("input-shapes", pass),
            ("forward-writes-output", fail),
            ("batch-independence", "SKIP"),
            ("deterministic", "SKIP"),
            ("threads", "SKIP"),
            ("finite-output", "SKIP"),
            ("lent-threads", "SKIP"),
            ("gradcheck", "SKIP"),
        ],
    );

    // The reasons say what was wrong, on which input.
    for fragment in [
        "FAIL forward-writes-output  input [3]: forward left 1 of the 4 elements of the \
         declared output [4] unwritten",
        "FAIL forward-writes-output  input [0, 3]: forward failed: layer 'faulty' (plugin \
         'faulty') panicked",
        "FAIL batch-independence     input [7, 3]: rows 0..3 alone differ from those rows of the \
         batch",
        "FAIL finite-output          input [3]: element 0 is -inf",
        "FAIL lent-threads           input [3]: with 4 threads lent it differs from one thread: \
         element 0 is ",
        "FAIL lent-threads           input [3]: with 4 threads lent: layer 'faulty' (plugin \
         'faulty') panicked: panicked at tests/plugins/faulty/src/lib.rs",
        "faulty: told to panic in a lent task",
    ] {
        assert!(run.stdout.contains(fragment), "{fragment}\n{}", run.stdout);
    }
}

#[test]
fn check_plugin_fails_a_library_that_is_not_a_plugin_and_refuses_bad_arguments() {
    let dir = temp_dir_with(&[("libjunk.so", "not a library")]);
    let junk = dir.path().join("libjunk.so");
    let run = host(&["check-plugin", path_str(&junk)]);
    let err = run.failed();
    assert_eq!(
        err,
        "error: plugin '".to_string() + path_str(&junk) + "' failed 1 of 1 conformance checks\n"
    );
    assert!(
        run.stdout.contains(&format!(
            "FAIL identity               {}: not a loadable shared library",
            junk.display()
        )),
        "{}",
        run.stdout
    );

    let err = host(&["check-plugin", "mydense", "--config", "[1]"])
        .failed()
        .to_string();
    assert_eq!(
        err,
        "error: --config '[1]': a layer config is a JSON object, e.g. {\"units\": 8}\n"
    );
    let err = host(&["check-plugin", "nosuch"]).failed().to_string();
    assert!(err.starts_with("error: no plugin named 'nosuch'"), "{err}");
}

// ---- every bad input: one clear message, exit status 1 ----

#[test]
fn a_missing_config_field_names_the_field() {
    let dir = model_with_layers(r#"[{"type": "mydense"}]"#);
    let err = run_model_fails(&dir, "models/mlp-input.npy");
    assert_eq!(
        err,
        "error: layer '0' (plugin 'mydense'): invalid config {}: missing field `units`\n"
    );
}

#[test]
fn an_input_of_the_wrong_rank_is_refused_naming_the_layer() {
    let dir = model_with_layers(r#"[{"type": "mydense", "config": {"units": 2}}]"#);
    let scalar = dir.path().join("scalar.npy");
    write_npy_f32(&scalar, &ArrayD::from_elem(IxDyn(&[]), 1.0));
    let err = run_model_fails(&dir, path_str(&scalar));
    assert_eq!(
        err,
        "error: layer '0' (plugin 'mydense'): needs an input of rank 1 or more, whose last \
         axis holds the features; got a scalar\n"
    );
}

/// An .npy file written byte by byte: format 1.0 with `header` as its dict.
fn raw_npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Runs the centered model on an input file holding `bytes`; returns stderr.
fn run_on_npy_bytes(bytes: &[u8]) -> (String, PathBuf, tempfile::TempDir) {
    let dir = model_with_layers(r#"[{"type": "centered"}]"#);
    let input = dir.path().join("x.npy");
    std::fs::write(&input, bytes).unwrap();
    let err = run_model_fails(&dir, path_str(&input));
    (err, input, dir)
}

#[test]
fn a_truncated_npy_is_refused_with_the_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.npy");
    write_npy_f32(&good, &uniform(&[2, 3], 1));
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.truncate(bytes.len() - 5);
    let (err, input, _dir) = run_on_npy_bytes(&bytes);
    assert_eq!(
        err,
        format!(
            "error: {}: truncated: the header's shape [2, 3] of '<f4' needs 24 bytes of data, \
             but the file holds 19\n",
            input.display()
        )
    );
    // Cut inside the header.
    let (err, input, _dir) = run_on_npy_bytes(&bytes[..20]);
    assert_eq!(
        err,
        format!(
            "error: {}: corrupt header: the file ends inside the header\n",
            input.display()
        )
    );
}

#[test]
fn a_corrupt_npy_header_is_refused() {
    for (header, says) in [
        (
            "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }\n",
            "corrupt header: 'fortran_order' must be True or False",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }\n",
            "corrupt header: 'shape' must hold non-negative integers, found 'x'",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False}\n",
            "corrupt header: the header has no 'shape' entry",
        ),
    ] {
        let (err, input, _dir) = run_on_npy_bytes(&raw_npy(header, &[0; 8]));
        assert!(
            err.starts_with(&format!("error: {}: {says}", input.display())),
            "{header}: {err}"
        );
    }
    let (err, _, _dir) = run_on_npy_bytes(b"PK\x03\x04 a zip file");
    assert!(err.contains("not a .npy file"), "{err}");
}

#[test]
fn unsupported_npy_dtypes_are_named() {
    // complex64, object, unicode string and byte string, as numpy writes them.
    for descr in ["<c8", "|O", "<U3", "|S3"] {
        let header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (1,), }}\n");
        let (err, input, _dir) = run_on_npy_bytes(&raw_npy(&header, &[0; 16]));
        assert_eq!(
            err,
            format!(
                "error: {}: unsupported dtype '{descr}': inputs must be numeric (bool, int8-64, \
                 uint8-64, float16/32/64)\n",
                input.display()
            )
        );
    }
}

#[test]
fn a_header_claiming_a_huge_shape_is_refused_before_allocating() {
    // 400 GB of f32: allocating it would abort the process, so a clean exit
    // status 1 with this message shows the size was checked first.
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 1000000), }\n";
    let (err, input, _dir) = run_on_npy_bytes(&raw_npy(header, &[0; 16]));
    assert_eq!(
        err,
        format!(
            "error: {}: truncated: the header's shape [100000, 1000000] of '<f4' needs \
             400000000000 bytes of data, but the file holds 16\n",
            input.display()
        )
    );
    // A shape whose element count overflows usize.
    let header = "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }\n";
    let (err, _, _dir) = run_on_npy_bytes(&raw_npy(header, &[]));
    assert!(
        err.contains("shape [4294967296, 4294967296] is too large"),
        "{err}"
    );
}

#[test]
fn nan_and_infinity_in_the_input_are_allowed_and_propagated() {
    let dir = model_with_layers(r#"[{"type": "faulty"}]"#);
    let x = ArrayD::from_shape_vec(
        IxDyn(&[5]),
        vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 1.5],
    )
    .unwrap();
    let input = dir.path().join("x.npy");
    let out = dir.path().join("y.npy");
    write_npy_f32(&input, &x);
    let run = |model: &str| {
        host(&[
            "run",
            model,
            "--input",
            path_str(&input),
            "--output",
            path_str(&out),
        ])
    };
    run(path_str(&dir.path().join("m.json"))).ok();
    let y = read_npy_f32(&out);
    let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&y),
        bits(&x),
        "the identity passes every value through"
    );

    // centered: the mean of [1, inf] is inf, so y = [1 - inf, inf - inf].
    let centered = model_with_layers(r#"[{"type": "centered"}]"#);
    write_npy_f32(
        &input,
        &ArrayD::from_shape_vec(IxDyn(&[2]), vec![1.0, f32::INFINITY]).unwrap(),
    );
    run(path_str(&centered.path().join("m.json"))).ok();
    let y = read_npy_f32(&out);
    assert_eq!(y[[0]], f32::NEG_INFINITY);
    assert!(y[[1]].is_nan());
}

/// A model of one mydense layer (64 -> 8) with its params file `params`.
fn dense_model_with_params(params: &str) -> tempfile::TempDir {
    temp_dir_with(&[(
        "m.json",
        &format!(
            r#"{{"format": 1, "params": "{params}",
                "layers": [{{"type": "mydense", "config": {{"units": 8}}}}]}}"#
        ),
    )])
}

#[test]
fn a_params_file_that_is_missing_truncated_or_wrong_shaped_is_refused() {
    let dir = dense_model_with_params("w.safetensors");
    let params = dir.path().join("w.safetensors");
    let err = run_model_fails(&dir, "models/mlp-input.npy");
    assert!(
        err.starts_with(&format!("error: cannot read {}: ", params.display())),
        "{err}"
    );

    // The shipped parameters of models/mlp.json hold 0.weight (64, 8): cut
    // them short.
    let shipped = std::fs::read(repo_root().join("models/mlp.safetensors")).unwrap();
    std::fs::write(&params, &shipped[..shipped.len() / 2]).unwrap();
    let err = run_model_fails(&dir, "models/mlp-input.npy");
    assert!(
        err.starts_with(&format!(
            "error: {}: not a valid safetensors file (truncated or corrupt?)",
            params.display()
        )),
        "{err}"
    );

    // Whole, but the model's input has 32 features, not 64.
    std::fs::write(&params, &shipped).unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &uniform(&[2, 32], 3));
    let err = host_fails(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(&input),
        "--allow-unused-params",
    ]);
    assert_eq!(
        err,
        format!(
            "error: {}: parameter '0.weight' has shape [64, 8] in the file, but layer '0' \
             needs [32, 8]\n",
            params.display()
        )
    );
}

/// Runs the host expecting an orderly failure and returns stderr. A `run`
/// is also given an `--output` file that already exists, which must come
/// through untouched, with no temporary file left beside it.
fn host_fails(args: &[&str]) -> String {
    if args.first() != Some(&"run") || args.contains(&"--output") {
        return host(args).failed().to_string();
    }
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("y.npy");
    std::fs::write(&out, b"precious").unwrap();
    let mut with_output = args.to_vec();
    with_output.extend(["--output", path_str(&out)]);
    let err = host(&with_output).failed().to_string();
    assert_eq!(std::fs::read(&out).unwrap(), b"precious", "{err}");
    assert_eq!(
        std::fs::read_dir(out_dir.path()).unwrap().count(),
        1,
        "a temporary file was left beside the output"
    );
    err
}

/// `host run` on the model `m.json` in `dir`, expecting it to fail.
fn run_model_fails(dir: &tempfile::TempDir, input: &str) -> String {
    host_fails(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        input,
    ])
}

// ---- plugin directories holding things that are not plugins ----

/// A plugin directory holding `libnotaplugin.so`, a real shared library
/// without the layer-api export (built with the C compiler), and
/// `libjunk.so`, a text file.
fn dir_with_non_plugins() -> tempfile::TempDir {
    let dir = temp_dir_with(&[
        ("libjunk.so", "this is not a library\n"),
        ("empty.c", "int answer(void) { return 42; }\n"),
    ]);
    let out = Command::new("cc")
        .current_dir(dir.path())
        .args(["-shared", "-fPIC", "-o", "libnotaplugin.so", "empty.c"])
        .output()
        .expect("the C compiler runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

#[test]
fn a_file_that_is_not_a_library_or_not_a_plugin_is_refused() {
    let plugins = dir_with_non_plugins();
    for (name, says) in [
        ("junk", "not a loadable shared library: "),
        (
            "notaplugin",
            "a shared library, but not a layer plugin: it carries no plugin manifest (symbol \
             layer_plugin_manifest_v1); it was not opened",
        ),
    ] {
        let model = model_with_layers(&format!(r#"[{{"type": "{name}"}}]"#));
        let err = host_fails(&[
            "run",
            path_str(&model.path().join("m.json")),
            "--input",
            "models/centered-input.npy",
            "--plugin-dir",
            path_str(plugins.path()),
        ]);
        let lib = plugins.path().join(format!("lib{name}.so"));
        assert!(
            err.starts_with(&format!("error: layer '0': {}: {says}", lib.display())),
            "{err}"
        );
    }
    // `host plugins` lists the good ones and warns about the others.
    let listing = host(&["plugins", "--plugin-dir", path_str(plugins.path())]);
    listing.ok();
    assert!(listing.stdout.contains("mydense"), "{}", listing.stdout);
    assert!(
        listing.stderr.contains("warning: skipped")
            && listing.stderr.contains("libjunk.so")
            && listing.stderr.contains("libnotaplugin.so"),
        "{}",
        listing.stderr
    );
}

// ---- pinning plugins by sha256 ----

/// The SHA-256 of a file by the system's `sha256sum`, independently of the
/// host's own hashing.
fn sha256sum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[test]
fn a_pin_mismatch_is_refused_before_the_library_is_loaded() {
    let plugins = dir_with_non_plugins();
    let junk = plugins.path().join("libjunk.so");
    let wrong = "0".repeat(64);
    // Loading libjunk.so would fail with "not a loadable shared library";
    // the pin error instead shows that the hash was checked first.
    let model = model_with_layers(&format!(
        r#"[{{"type": "junk", "name": "first", "sha256": "{wrong}"}}]"#
    ));
    let err = host_fails(&[
        "run",
        path_str(&model.path().join("m.json")),
        "--input",
        "models/centered-input.npy",
        "--plugin-dir",
        path_str(plugins.path()),
    ]);
    assert_eq!(
        err,
        format!(
            "error: layer 'first': plugin library {} has sha256 {}, but the model pins {wrong}; \
             it was not loaded. If the new library is trusted, run `host lock` on the model to \
             pin it\n",
            junk.display(),
            sha256sum(&junk)
        )
    );
}

#[test]
fn lock_pins_each_layer_keeps_the_rest_and_a_swapped_library_is_then_refused() {
    let plugins = tempfile::tempdir().unwrap();
    for name in ["centered", "mydense"] {
        let file = format!("lib{name}.so");
        std::fs::copy(plugin_dir().join(&file), plugins.path().join(&file)).unwrap();
    }
    let original = r#"{
  "name": "pinned",
  "format": 1,
  "seed": 5,
  "layers": [
    {"type": "mydense", "name": "dense", "config": {"units": 3, "in_units": 64}},
    {"config": {}, "type": "centered"}
  ]
}
"#;
    let dir = temp_dir_with(&[("m.json", original)]);
    let model = dir.path().join("m.json");
    let lock = || {
        host(&[
            "lock",
            path_str(&model),
            "--plugin-dir",
            path_str(plugins.path()),
        ])
    };
    let dense_sum = sha256sum(&plugins.path().join("libmydense.so"));
    let centered_sum = sha256sum(&plugins.path().join("libcentered.so"));
    let run = lock();
    assert_eq!(
        run.ok(),
        format!(
            "layer 'dense': pinned {dense_sum} ({})\nlayer '1': pinned {centered_sum} ({})\n",
            plugins.path().join("libmydense.so").display(),
            plugins.path().join("libcentered.so").display()
        )
    );
    let locked = std::fs::read_to_string(&model).unwrap();
    let expected = format!(
        r#"{{
  "name": "pinned",
  "format": 1,
  "seed": 5,
  "layers": [
    {{
      "type": "mydense",
      "name": "dense",
      "config": {{
        "units": 3,
        "in_units": 64
      }},
      "sha256": "{dense_sum}"
    }},
    {{
      "config": {{}},
      "type": "centered",
      "sha256": "{centered_sum}"
    }}
  ]
}}
"#
    );
    assert_eq!(locked, expected);
    assert!(lock().ok().contains("layer 'dense': unchanged"));
    assert_eq!(std::fs::read_to_string(&model).unwrap(), expected);

    let run_args = [
        "run",
        path_str(&model),
        "--input",
        "models/mlp-input.npy",
        "--plugin-dir",
        path_str(plugins.path()),
    ];
    host(&run_args).ok();

    // Another library under the pinned name is refused.
    std::fs::copy(
        plugin_dir().join("libfaulty.so"),
        plugins.path().join("libcentered.so"),
    )
    .unwrap();
    let err = host_fails(&run_args);
    assert!(
        err.starts_with(&format!(
            "error: layer '1': plugin library {} has sha256 {}, but the model pins \
             {centered_sum}; it was not loaded.",
            plugins.path().join("libcentered.so").display(),
            sha256sum(&plugins.path().join("libcentered.so"))
        )),
        "{err}"
    );
}

#[test]
fn a_failed_lock_leaves_the_model_file_as_it_was() {
    let text = "{\"format\": 1, \"layers\": [{\"type\": \"centered\"}, {\"type\": \"nosuch\"}]}";
    let dir = temp_dir_with(&[("m.json", text)]);
    let model = dir.path().join("m.json");
    let err = host_fails(&["lock", path_str(&model)]);
    assert!(
        err.starts_with("error: layer '1': no plugin named 'nosuch'"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&model).unwrap(), text);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

// ---- a plugin built against an incompatible layer-api ----
//
// Plugins built against another major version of the interface, or against
// a copy of layer-api whose core types differ, are refused with a message
// naming what differs: tests/compat.rs builds them, beside the plugins of
// older and newer minor versions that must load.
