//! The proof that someone outside this repository can write a plugin with
//! what we publish: the example plugin in `examples/plugin-template/` is
//! copied into a temporary directory outside the workspace, built there with
//! cargo against `layer-api` by path only, and run through the real `host`.

mod support;

use std::path::Path;
use std::process::Command;

use ndarray::{ArrayD, IxDyn};
use support::*;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Copies the template into `crate_dir`, pointing its `layer-api` dependency
/// at this repository's copy by absolute path.
fn copy_template(crate_dir: &Path) {
    let template = repo_root().join("examples/plugin-template");
    let manifest = std::fs::read_to_string(template.join("Cargo.toml")).unwrap();
    let relative = r#"layer-api = { path = "../../layer-api" }"#;
    assert!(
        manifest.contains(relative),
        "the template's Cargo.toml names layer-api as {relative}"
    );
    let absolute = format!(
        "layer-api = {{ path = {:?} }}",
        path_str(&repo_root().join("layer-api"))
    );
    // Its own workspace root, wherever the temporary directory lies.
    let manifest = format!("{}\n[workspace]\n", manifest.replace(relative, &absolute));
    std::fs::create_dir_all(crate_dir.join("src")).unwrap();
    std::fs::write(crate_dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(template.join("src/lib.rs"), crate_dir.join("src/lib.rs")).unwrap();
    // The workspace's lock file pins the same versions of abi_stable, ndarray
    // and serde that the host was built with, so nothing needs resolving.
    std::fs::copy(repo_root().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();
}

/// Builds the crate in `crate_dir` and returns the library's path. The
/// target directory persists under the workspace's own, so that its
/// dependencies are compiled once, not on every test run.
fn build(crate_dir: &Path) -> std::path::PathBuf {
    let target_dir = plugin_dir()
        .parent()
        .expect("profile dir is inside the target dir")
        .join("out-of-tree");
    let out = Command::new(env!("CARGO"))
        .current_dir(crate_dir)
        .args(["build", "--offline", "--target-dir"])
        .arg(&target_dir)
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building the out-of-tree plugin failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join("debug/libscale.so")
}

#[test]
fn a_plugin_built_outside_the_workspace_runs_in_the_host() {
    let outside = tempfile::tempdir().unwrap();
    assert!(!outside.path().starts_with(repo_root()));
    let crate_dir = outside.path().join("scale");
    copy_template(&crate_dir);
    let library = build(&crate_dir);

    // A plugin directory of its own, as a user would make one.
    let plugins = outside.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let installed = plugins.join("libscale.so");
    std::fs::copy(&library, &installed).unwrap();

    let listing = host(&["plugins", "--plugin-dir", path_str(&plugins)]);
    let line = listing
        .ok()
        .lines()
        .find(|l| l.starts_with("scale "))
        .unwrap_or_else(|| panic!("scale missing from:\n{}", listing.stdout))
        .to_string();
    let fields: Vec<&str> = line
        .split("  ")
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .collect();
    let interface = format!(
        "{}.{}",
        layer_api::abi::ABI_MAJOR,
        layer_api::abi::ABI_MINOR
    );
    assert_eq!(
        fields,
        [
            "scale",
            "0.1.0",
            interface.as_str(),
            "y = x * factor, one factor per feature",
            path_str(&installed),
        ]
    );

    let x =
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, -2.0, 3.0, 0.5, 4.0, -6.0]).unwrap();
    let input = outside.path().join("x.npy");
    write_npy_f32(&input, &x);
    let model = outside.path().join("m.json");
    let out = outside.path().join("y.npy");
    let run = |params: &[&str]| {
        let mut args = vec![
            "run",
            path_str(&model),
            "--input",
            path_str(&input),
            "--output",
            path_str(&out),
            "--plugin-dir",
            path_str(&plugins),
        ];
        args.extend_from_slice(params);
        host(&args).ok();
        read_npy_f32(&out)
    };

    // The config's initial value, for every factor.
    std::fs::write(
        &model,
        r#"{"format": 1, "layers": [{"type": "scale", "config": {"initial": 2.5}}]}"#,
    )
    .unwrap();
    let y = run(&[]);
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.as_slice().unwrap(), &[2.5, -5.0, 7.5, 1.25, 10.0, -15.0]);

    // Factors from a parameter file, one per feature.
    let factor = [1.0f32, -2.0, 0.5];
    let bytes: Vec<u8> = factor.iter().flat_map(|v| v.to_le_bytes()).collect();
    let params = outside.path().join("p.safetensors");
    safetensors::serialize_to_file(
        [(
            "0.factor",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &bytes).unwrap(),
        )],
        None,
        &params,
    )
    .unwrap();
    let y = run(&["--params", path_str(&params)]);
    assert_eq!(y.as_slice().unwrap(), &[1.0, 4.0, 1.5, 0.5, -8.0, -3.0]);

    // Its backward, built outside the repository, agrees with finite
    // differences of its forward.
    let report = host(&["check-plugin", "scale", "--plugin-dir", path_str(&plugins)]);
    assert!(
        report.ok().lines().any(|l| l.starts_with("PASS gradcheck")),
        "{}",
        report.stdout
    );
}

#[test]
fn the_readme_shows_the_template_as_it_is() {
    // The README's plugin example is the template, word for word, so that
    // what the test above proves is what a reader copies.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let template = repo_root().join("examples/plugin-template");
    for (file, fence) in [("Cargo.toml", "```toml\n"), ("src/lib.rs", "```rust\n")] {
        let text = std::fs::read_to_string(template.join(file)).unwrap();
        assert!(
            readme.contains(&format!("{fence}{text}```\n")),
            "README.md does not show examples/plugin-template/{file} as it is"
        );
    }
}
