//! How plugins are loaded: nothing of a plugin runs before its manifest is
//! checked, a pinned plugin runs from the bytes that were hashed, a plugin
//! that would abort on a panic is refused, a panic in a layer's `Drop` is an
//! error, and layers of different element types meet only where they agree.

mod support;

use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use support::*;

/// Compiles `source` (C) into `dir/lib<name>.so`.
fn c_library(dir: &Path, name: &str, source: &str) {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let out = Command::new("cc")
        .current_dir(dir)
        .args(["-shared", "-fPIC", "-o"])
        .arg(format!("lib{name}.so"))
        .arg(&c)
        .output()
        .expect("the C compiler runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(c).unwrap();
}

/// A constructor that runs when the library is opened and creates the file
/// named by `$LAYER_TEST_MARK`: proof that the library's code ran.
const MARK_ON_OPEN: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void leave_a_mark(void) {
    const char *path = getenv("LAYER_TEST_MARK");
    if (path) { FILE *f = fopen(path, "w"); if (f) { fputs("opened\n", f); fclose(f); } }
}
"#;

/// A manifest for `name` as the export macro writes it, as C source.
fn manifest_c(name: &str, panic: &str) -> String {
    let json = format!(
        r#"{{"name":"{name}","version":"9.9.9","description":"a C library with a manifest","abi":[1,1],"layer_api":"1.1.0","offers":[],"needs":[],"panic":"{panic}"}}"#
    )
    .replace('"', "\\\"");
    format!(
        "__attribute__((visibility(\"default\"))) const unsigned char \
         layer_plugin_manifest_v1[4096] = \"LPMANIF1{json}\";\n"
    )
}

fn host_with_mark(mark: &Path, args: &[&str]) -> Run {
    build_plugins();
    let out = Command::new(host_exe())
        .args(args)
        .env("LAYER_TEST_MARK", mark)
        .current_dir(repo_root())
        .output()
        .expect("host runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn plugins_are_listed_from_their_manifests_without_running_their_code() {
    let dir = tempfile::tempdir().unwrap();
    c_library(
        dir.path(),
        "marked",
        &format!(
            "{MARK_ON_OPEN}{}__attribute__((visibility(\"default\"))) unsigned char \
             layer_plugin_table_v1[512];\n",
            manifest_c("marked", "unwind")
        ),
    );
    let mark = dir.path().join("mark");
    let listing = host_with_mark(&mark, &["plugins", "--plugin-dir", path_str(dir.path())]);
    let stdout = listing.ok();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("marked "))
        .unwrap_or_else(|| panic!("marked missing from:\n{stdout}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[..3], ["marked", "9.9.9", "1.1"], "{line}");
    assert!(!mark.exists(), "listing plugins ran the library's code");

    // The mark does appear when the library is opened (it has a manifest
    // and a table symbol of the core's size, whose contents are refused
    // once opened): so its absence above means something.
    let model = model_with_layers(r#"[{"type": "marked"}]"#);
    let run = host_with_mark(
        &mark,
        &[
            "run",
            path_str(&model.path().join("m.json")),
            "--input",
            "models/mlp-input.npy",
            "--plugin-dir",
            path_str(dir.path()),
        ],
    );
    assert!(
        run.failed().contains("its interface table is 0 bytes long"),
        "{}",
        run.stderr
    );
    assert!(mark.exists(), "loading a plugin opens it");
}

#[test]
fn a_library_without_a_manifest_is_refused_unopened() {
    let dir = tempfile::tempdir().unwrap();
    c_library(dir.path(), "nomanifest", MARK_ON_OPEN);
    let mark = dir.path().join("mark");
    let model = model_with_layers(r#"[{"type": "nomanifest"}]"#);
    let lib = dir.path().join("libnomanifest.so");
    let run = host_with_mark(
        &mark,
        &[
            "run",
            path_str(&model.path().join("m.json")),
            "--input",
            "models/mlp-input.npy",
            "--plugin-dir",
            path_str(dir.path()),
        ],
    );
    assert_eq!(
        run.failed(),
        format!(
            "error: layer '0': {}: a shared library, but not a layer plugin: it carries no \
             plugin manifest (symbol layer_plugin_manifest_v1); it was not opened\n",
            lib.display()
        )
    );
    let check = host_with_mark(&mark, &["check-plugin", path_str(&lib)]);
    assert_eq!(check.code, Some(1), "{}", check.stdout);
    let listing = host_with_mark(&mark, &["plugins", "--plugin-dir", path_str(dir.path())]);
    assert!(
        listing.stderr.contains("carries no plugin manifest"),
        "{}",
        listing.stderr
    );
    assert!(!mark.exists(), "a library without a manifest was opened");
}

#[test]
fn a_pinned_plugin_runs_from_the_very_bytes_that_were_hashed() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libcentered.so");
    std::fs::copy(plugin_dir().join("libcentered.so"), &path).unwrap();
    let pin = {
        let out = Command::new("sha256sum").arg(&path).output().unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    };
    let plugin = host::registry::load(&path, Some("centered"), Some(&pin)).unwrap();
    assert_eq!(plugin.sha256, pin);

    // Swap another library in at the path: the loaded plugin is unaffected,
    // because the file at the path was opened once, read, hashed, and the
    // bytes read were loaded from a sealed in-memory copy.
    std::fs::remove_file(&path).unwrap();
    std::fs::copy(plugin_dir().join("libmydense.so"), &path).unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir_text = dir.path().to_str().unwrap();
    assert!(
        !maps.lines().any(|l| l.contains(dir_text)),
        "the library file itself is mapped:\n{maps}"
    );
    assert!(
        maps.lines()
            .any(|l| l.contains("/memfd:layer-plugin-centered")),
        "no sealed copy of centered is mapped:\n{maps}"
    );
    let layer = host::runtime::ModelLayer::new("c", plugin, &serde_json::json!({})).unwrap();
    let plan = layer.plan(&[4]).unwrap();
    let x = host::tensor::Tensor::F32(
        ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0, 2.0, 3.0, 6.0]).unwrap(),
    );
    let y = layer
        .run_once(
            &plan,
            &[Some(&x)],
            &host::params::ParamStore::default(),
            |_| {},
        )
        .unwrap();
    assert_eq!(
        y[0],
        host::tensor::Tensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[4]), vec![-2.0, -1.0, 0.0, 3.0]).unwrap()
        ),
        "still centered's code"
    );
    layer.close().unwrap();
}

#[test]
fn a_plugin_built_to_abort_on_panic_is_refused_in_process_and_runs_isolated() {
    build_plugins();
    // The faulty test plugin, its own crate compiled with panic=abort (its
    // manifest records the strategy the export macro saw), into a target
    // directory of its own so the usual build is left alone.
    let target = repo_root().join("target/panic-abort");
    let out = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args(["rustc", "-p", "faulty", "--lib", "--crate-type", "cdylib"])
        .arg("--target-dir")
        .arg(&target)
        .args(["--", "-C", "panic=abort"])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libfaulty.so");
    std::fs::copy(target.join("debug/libfaulty.so"), &lib).unwrap();
    let model = model_with_layers(r#"[{"type": "faulty"}]"#);
    let run = host(&[
        "run",
        path_str(&model.path().join("m.json")),
        "--input",
        "models/centered-input.npy",
        "--plugin-dir",
        path_str(dir.path()),
    ]);
    assert_eq!(
        run.failed(),
        format!(
            "error: layer '0': {}: built with panic = \"abort\", so a panic in it would end the \
             host; it is not loaded in-process. Rebuild it with panic = \"unwind\" (cargo's \
             default), or run it in a worker process with --isolate\n",
            lib.display()
        )
    );
    // In a worker it runs (its output as the unwinding build's in
    // process), and its panic ends only the worker.
    let run_with = |layers: &str, plugins: &Path, isolate: bool| {
        let model = model_with_layers(layers);
        let mut args = vec![
            "run".to_string(),
            path_str(&model.path().join("m.json")).to_string(),
            "--input".to_string(),
            "models/centered-input.npy".to_string(),
            "--plugin-dir".to_string(),
            path_str(plugins).to_string(),
        ];
        if isolate {
            args.push("--isolate".to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        host(&args)
    };
    let identity = r#"[{"type": "faulty"}]"#;
    assert_eq!(
        run_with(identity, dir.path(), true).ok(),
        run_with(identity, &plugin_dir(), false).ok()
    );
    let panics = r#"[{"type": "faulty", "config": {"fail": "panic_in_forward"}}]"#;
    assert_eq!(
        run_with(panics, dir.path(), true).failed(),
        "error: layer '0' (plugin 'faulty') aborted in forward\n"
    );
}

#[test]
fn a_panic_in_a_layers_drop_is_reported_and_no_output_is_written() {
    let model = model_with_layers(r#"[{"type": "faulty", "config": {"fail": "panic_in_drop"}}]"#);
    let out = model.path().join("y.npy");
    std::fs::write(&out, b"the previous output").unwrap();
    let run = host(&[
        "run",
        path_str(&model.path().join("m.json")),
        "--input",
        "models/centered-input.npy",
        "--output",
        path_str(&out),
    ]);
    let err = run.failed();
    assert!(
        err.starts_with("error: layer '0' (plugin 'faulty') panicked: while being dropped: "),
        "{err}"
    );
    assert!(err.contains("told to panic in drop"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous output");
    let leftovers: Vec<_> = std::fs::read_dir(model.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn layers_whose_element_types_disagree_are_refused_naming_both() {
    let model = model_with_layers(
        r#"[{"type": "cast", "name": "to_ids", "config": {"to": "int64"}},
            {"type": "mydense", "name": "dense", "config": {"units": 2}}]"#,
    );
    let err = run_model(&model, "models/mlp-input.npy");
    assert_eq!(
        err.failed(),
        format!(
            "error: {}: layer 'to_ids' (plugin 'cast') outputs int64, but the next layer, \
             'dense' (plugin 'mydense') accepts float32; put a layer between them that \
             converts, or choose layers whose types agree\n",
            model.path().join("m.json").display()
        )
    );
}

#[test]
fn an_int64_output_is_written_as_int64() {
    let model = model_with_layers(r#"[{"type": "cast", "config": {"to": "int64"}}]"#);
    let input = model.path().join("x.npy");
    let x = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.4f32, -2.6, 3e9, 0.0]).unwrap();
    write_npy_f32(&input, &x);
    let out = model.path().join("y.npy");
    run_model_with(&model, &input, &out).ok();
    let y: ArrayD<i64> = ndarray_npy::read_npy(&out).unwrap();
    assert_eq!(y.shape(), &[2, 2]);
    assert_eq!(
        y.iter().copied().collect::<Vec<_>>(),
        [1, -3, 3_000_000_000, 0]
    );
    // Printed, it stays integers.
    let printed = run_model(&model, path_str(&input));
    assert_eq!(
        printed.ok(),
        "[[         1         -3]\n [3000000000          0]]\n"
    );
}

#[test]
fn a_float64_input_is_converted_for_a_float32_layer_and_kept_for_a_float64_one() {
    let model = model_with_layers(r#"[{"type": "mydense", "config": {"units": 3}}]"#);
    let x64 = ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![0.1f64, 0.2, 0.3, 1.0 / 3.0]).unwrap();
    let x32 = x64.mapv(|v| v as f32);
    let in64 = model.path().join("x64.npy");
    let in32 = model.path().join("x32.npy");
    ndarray_npy::write_npy(&in64, &x64).unwrap();
    write_npy_f32(&in32, &x32);
    let (out64, out32) = (model.path().join("y64.npy"), model.path().join("y32.npy"));
    run_model_with(&model, &in64, &out64).ok();
    run_model_with(&model, &in32, &out32).ok();
    let (y64, y32) = (read_npy_f32(&out64), read_npy_f32(&out32));
    assert!(y64
        .iter()
        .zip(&y32)
        .all(|(a, b)| a.to_bits() == b.to_bits()));

    // cast takes float64 as it is: 1/3 survives to the last bit.
    let keep = model_with_layers(r#"[{"type": "cast", "config": {"to": "float64"}}]"#);
    let out = keep.path().join("y.npy");
    run_model_with(&keep, &in64, &out).ok();
    let y: ArrayD<f64> = ndarray_npy::read_npy(&out).unwrap();
    assert_eq!(y, x64);
}

fn run_model_with(dir: &tempfile::TempDir, input: &Path, output: &Path) -> Run {
    host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(input),
        "--output",
        path_str(output),
    ])
}
