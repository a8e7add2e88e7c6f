//! The small cases of the hostile-input issue, through the real `host`
//! binary: a NaN through `mydense`, names holding escape sequences, a long
//! model with a duplicate name, out-of-range command-line numbers, and a
//! plugin library or directory that others may write. Each ends in a clear
//! message and exit status, never a panic; nothing raw reaches the terminal.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use ndarray::{array, ArrayD};
use support::*;

/// Asserts a command-line refusal: exit status 1, as every error, one
/// `error:` line saying `expected`, no panic.
fn assert_usage_error(run: &Run, expected: &str) {
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains(expected),
        "want {expected:?} in {}",
        errors[0]
    );
}

/// Asserts that stderr holds no escape sequence, control or bidi character
/// (but its own newlines).
fn assert_no_raw_controls(stderr: &str) {
    let bad = stderr.chars().find(|&c| {
        (c.is_control() && c != '\n') || ('\u{2066}'..='\u{2069}').contains(&c) || c == '\u{202e}'
    });
    assert!(bad.is_none(), "raw {bad:?} in {stderr:?}");
}

#[test]
fn mydense_keeps_nan_as_torch_relu_does() {
    let dir = temp_dir_with(&[(
        "m.json",
        r#"{"format": 1, "layers": [{"type": "mydense", "config": {"units": 1},
            "init": {"weight": "ones", "bias": "zeros"}}]}"#,
    )]);
    let x: ArrayD<f32> = array![[f32::NAN, 1.0], [1.0, 2.0], [-3.0, 1.0]].into_dyn();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &x);
    let out = dir.path().join("y.npy");
    host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(&input),
        "--output",
        path_str(&out),
    ])
    .ok();
    let y = read_npy_f32(&out);
    assert_eq!(y.shape(), &[3, 1]);
    assert!(y[[0, 0]].is_nan(), "relu(NaN) gave {}", y[[0, 0]]);
    assert_eq!(y[[1, 0]], 3.0);
    assert_eq!(y[[2, 0]], 0.0);
}

#[test]
fn names_with_escape_sequences_are_refused_and_shown_escaped() {
    let names = [
        ("\u{1b}[31mred", r#""\u{1b}[31mred""#),
        ("a\nb", r#""a\nb""#),
        ("a\rb", r#""a\rb""#),
        ("a\tb", r#""a\tb""#),
        ("del\u{7f}", r#""del\u{7f}""#),
        ("c1\u{9b}31m", r#""c1\u{9b}31m""#),
        ("txt\u{202e}exe", r#""txt\u{202e}exe""#),
    ];
    for (name, shown) in names {
        let layer = serde_json::json!([{"type": "relu", "name": name}]);
        let dir = temp_dir_with(&[("m.json", &format!(r#"{{"format": 1, "layers": {layer}}}"#))]);
        let run = host(&["inspect", path_str(&dir.path().join("m.json"))]);
        let err = run.failed();
        assert!(
            err.contains(&format!("layer name {shown} is not valid")),
            "{err}"
        );
        assert_no_raw_controls(err);

        let graph = serde_json::json!({
            "format": 2,
            "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}],
            "nodes": [{"name": "n", "type": "relu", "inputs": ["x"]}],
            "outputs": ["n"]});
        let mut as_input = graph.clone();
        as_input["inputs"][0]["name"] = name.into();
        let mut as_node = graph.clone();
        as_node["nodes"][0]["name"] = name.into();
        let mut as_reference = graph.clone();
        as_reference["outputs"][0] = name.into();
        for (model, expected) in [
            (as_input, format!("input name {shown} is not valid")),
            (as_node, format!("node name {shown} is not valid")),
            (
                as_reference,
                format!("\"outputs\": {shown} holds a control"),
            ),
        ] {
            let dir = temp_dir_with(&[("g.json", &model.to_string())]);
            let run = host(&["inspect", path_str(&dir.path().join("g.json"))]);
            let err = run.failed();
            assert!(err.contains(&expected), "want {expected:?}: {err}");
            assert_no_raw_controls(err);
        }
    }
}

#[test]
fn escape_sequences_elsewhere_in_a_model_never_reach_the_terminal_raw() {
    let esc = "\u{1b}]0;pwned\u{7}\u{1b}[2J";
    let models = [
        // A plugin type: the registry's refusal quotes it escaped.
        serde_json::json!({"format": 1, "layers": [{"type": esc}]}),
        // An unknown field: serde's message quotes the field name.
        serde_json::json!({"format": 1, "layers": [{"type": "relu", esc: 1}]}),
        serde_json::json!({"format": 1, "name": esc, "layers": [{"type": "relu"}]}),
        serde_json::json!({"format": 1, "layers": [{"type": "relu", "sha256": esc}]}),
        serde_json::json!({"format": 1, "layers": [{"type": "relu", "init": {esc: "zeros"}}]}),
    ];
    for model in models {
        let dir = temp_dir_with(&[("m.json", &model.to_string())]);
        let run = host(&["inspect", path_str(&dir.path().join("m.json"))]);
        let err = run.failed();
        assert!(err.contains(r"\u{1b}]0;pwned\u{7}"), "{model}: {err}");
        assert_no_raw_controls(err);
    }
}

#[test]
fn a_duplicate_name_in_a_long_model_is_found_naming_both_layers() {
    // 20000 layers: the check is a hash lookup per layer, not a scan of
    // the ones before (the issue's figures are in the commit message).
    let mut layers: Vec<_> = (0..20_000)
        .map(|i| serde_json::json!({"type": "relu", "name": format!("l{i}")}))
        .collect();
    layers.push(serde_json::json!({"type": "relu", "name": "l7"}));
    let dir = temp_dir_with(&[(
        "m.json",
        &serde_json::json!({"format": 1, "layers": layers}).to_string(),
    )]);
    let run = host(&["inspect", path_str(&dir.path().join("m.json"))]);
    let err = run.failed();
    assert!(
        err.contains("layers 7 and 20000 are both named 'l7': layer names must be unique"),
        "{err}"
    );
}

#[test]
fn bench_refuses_times_sizes_and_thread_counts_out_of_range() {
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "models/mlp.json", "--features", "64"];
        args.extend_from_slice(extra);
        host(&args)
    };
    for time in ["nan", "inf", "-1", "1e300", "3601"] {
        let arg = format!("--min-time={time}");
        assert_usage_error(
            &bench(&["--batch", "2", &arg]),
            &format!("'{time}' is not a time: give a number of seconds from 0 to 3600"),
        );
    }
    let max = usize::MAX.to_string();
    assert_usage_error(
        &bench(&["--batch", &max]),
        &format!("'{max}' is not a number of rows: give one from 0 to 4294967296"),
    );
    for threads in ["0", "100000"] {
        assert_usage_error(
            &bench(&["--batch", "2", "--threads", threads, "--min-time", "0"]),
            &format!("'{threads}' is not a thread count: give a number from 1 to "),
        );
    }
    // Within the row limit but past the memory budget: refused before
    // anything is allocated, naming the input, its size and the budget.
    let err = bench(&["--batch", "4294967296"]).failed().to_string();
    assert!(
        err.contains(
            "the made-up input 'input' of shape (4294967296, 64) float32 needs 1099511627776 \
             bytes, more than the memory budget of"
        ),
        "{err}"
    );
    let err = host(&[
        "bench",
        "models/mlp.json",
        "--batch",
        "2",
        "--features",
        &max,
    ])
    .failed()
    .to_string();
    assert!(
        err.contains(&format!(
            "the made-up input 'input' of shape (2, {max}) float32 needs"
        )),
        "{err}"
    );
}

#[test]
fn run_refuses_thread_counts_and_batch_sizes_out_of_range() {
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "models/mlp.json", "--input", "models/mlp-input.npy"];
        args.extend_from_slice(extra);
        host(&args)
    };
    for threads in ["0", "100000", "-1"] {
        let arg = format!("--threads={threads}");
        assert_usage_error(
            &run(&[&arg]),
            &format!("'{threads}' is not a thread count: give a number from 1 to "),
        );
    }
    let max = usize::MAX.to_string();
    assert_usage_error(
        &run(&["--batch-size", &max]),
        &format!("'{max}' is not a batch size: give a number of rows of at least 2"),
    );
    // The largest batch size taken is one chunk for any real input.
    run(&["--batch-size", "4294967296", "--quiet"]).ok();
}

/// A private directory holding a copy of the `relu` and `gelu` plugins.
fn plugin_copy() -> tempfile::TempDir {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    for name in ["librelu.so", "libgelu.so"] {
        std::fs::copy(plugin_dir().join(name), dir.path().join(name)).unwrap();
        chmod(&dir.path().join(name), 0o755);
    }
    dir
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn inspect_with(plugins: &Path, extra: &[&str]) -> Run {
    let model = temp_dir_with(&[(
        "m.json",
        r#"{"format": 1, "layers": [{"type": "relu"}, {"type": "gelu"}, {"type": "relu"}]}"#,
    )]);
    let path = model.path().join("m.json");
    let mut args = vec![
        "inspect",
        path_str(&path),
        "--input-shape",
        "2,64",
        "--plugin-dir",
        path_str(plugins),
    ];
    args.extend_from_slice(extra);
    host(&args)
}

#[test]
fn a_plugin_directory_writable_by_others_is_warned_about_once_or_refused_when_strict() {
    let plugins = plugin_copy();
    // Private (0700, as tempfile makes it): no word about it.
    let quiet = inspect_with(plugins.path(), &[]);
    quiet.ok();
    assert!(!quiet.stderr.contains("warning"), "{}", quiet.stderr);

    chmod(plugins.path(), 0o777);
    let run = inspect_with(plugins.path(), &[]);
    run.ok();
    let warning = format!(
        "warning: plugin directory {} is writable by others: anyone could replace a plugin in \
         it (chmod o-w {0}; --strict refuses it)\n",
        plugins.path().display()
    );
    // Two plugins from the directory, one warning.
    assert_eq!(run.stderr, warning);

    let run = inspect_with(plugins.path(), &["--strict"]);
    let err = run.failed();
    assert_eq!(
        err,
        format!(
            "error: layer '0': plugin directory {} is writable by others: anyone could replace \
             a plugin in it; refused under --strict (chmod o-w {0})\n",
            plugins.path().display()
        )
    );
    // The sticky bit (as on /tmp) keeps others from replacing what they do
    // not own, but not from adding a plugin the search finds first: still
    // a warning.
    chmod(plugins.path(), 0o1777);
    assert_eq!(inspect_with(plugins.path(), &[]).stderr, warning);
    chmod(plugins.path(), 0o700);
}

#[test]
fn a_plugin_library_writable_by_others_is_warned_about_or_refused_when_strict() {
    let plugins = plugin_copy();
    let library = plugins.path().join("libgelu.so");
    chmod(&library, 0o757);
    let run = inspect_with(plugins.path(), &[]);
    run.ok();
    assert_eq!(
        run.stderr,
        format!(
            "warning: plugin library {} is writable by others: anyone could replace its code \
             (chmod o-w {0}; --strict refuses it)\n",
            library.display()
        )
    );
    let err = inspect_with(plugins.path(), &["--strict"])
        .failed()
        .to_string();
    assert_eq!(
        err,
        format!(
            "error: layer '1': plugin library {} is writable by others: anyone could replace \
             its code; refused under --strict (chmod o-w {0})\n",
            library.display()
        )
    );
    // Writable by its group only: not others, no warning.
    chmod(&library, 0o775);
    let run = inspect_with(plugins.path(), &["--strict"]);
    run.ok();
    assert_eq!(run.stderr, "");
}
