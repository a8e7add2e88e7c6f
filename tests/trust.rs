//! What a user can trust: `host check-plugin` names what is wrong with a
//! plugin, every bad input gets one clear message and a non-zero exit status,
//! and a pinned model refuses a library that changed.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::{host, plugin_dir, temp_dir_with};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

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
        ],
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
        stdout.ends_with("8 passed, 0 failed, 1 skipped\n"),
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
        "infinite_output",
        "panic_in_shape",
        "panic_in_new",
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
        "error: plugin 'faulty' failed 9 of 40 conformance checks\n"
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
        ]
        .into_iter()
        .map(|name| (name, if failing.contains(&name) { fail } else { pass }))
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
        &all_pass_but(&["batch-independence", "deterministic", "threads"]),
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

    // The reasons say what was wrong, on which input.
    for fragment in [
        "FAIL forward-writes-output  input [3]: forward left 1 of the 4 elements of the \
         declared output [4] unwritten",
        "FAIL forward-writes-output  input [0, 3]: forward failed: layer 'checked' (plugin \
         'faulty') panicked",
        "FAIL batch-independence     input [7, 3]: row 0 alone differs from row 0 of the batch",
        "FAIL finite-output          input [3]: element 0 is -inf",
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
