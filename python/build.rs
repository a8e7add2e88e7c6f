//! Builds what the wheel carries beside the extension module: every plugin
//! in the repository's plugins/ folder and the `host` executable (the
//! worker isolated layers run in), in release mode, and copies them into
//! the package (layerhost/plugins/, layerhost/bin/), where maturin picks
//! them up and the package looks by default. So `pip install ./python` is
//! the one command that installs a working package.
//!
//! The repository's own workspace builds them (into its target/, so that a
//! `cargo build --release` done before is reused): they are that
//! workspace's crates, with its lock file and profile (`panic = "unwind"`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let crate_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = crate_dir
        .parent()
        .expect("python/ sits in the repository")
        .to_path_buf();
    for watched in [
        "plugins",
        "host/src",
        "host/Cargo.toml",
        "layer-api",
        "layer-abi",
        "kernels",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }

    let plugins = plugin_packages(&root.join("plugins"));
    let target_dir = bundle_target_dir(&root);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(&root)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        .args(["-p", "host"]);
    for name in &plugins {
        build.args(["-p", name]);
    }
    // Flags cargo set for this build script's own crate, not for the
    // workspace built here.
    build
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET");
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the plugins: {e}"));
    assert!(
        status.success(),
        "building the plugins and the host executable failed ({status})"
    );

    let built = target_dir.join("release");
    let package = crate_dir.join("layerhost");
    let plugin_dir = package.join("plugins");
    let _ = std::fs::remove_dir_all(&plugin_dir);
    std::fs::create_dir_all(&plugin_dir).expect("create layerhost/plugins");
    for name in &plugins {
        let file = format!("lib{}.so", name.replace('-', "_"));
        copy(&built.join(&file), &plugin_dir.join(&file));
    }
    let bin_dir = package.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("create layerhost/bin");
    copy(&built.join("host"), &bin_dir.join("host"));
}

/// The package name of each crate in `plugins/`.
fn plugin_packages(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read plugins/")
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("Cargo.toml")).ok())
        .filter_map(|manifest| {
            manifest.lines().find_map(|line| {
                let value = line.strip_prefix("name")?.trim_start().strip_prefix('=')?;
                Some(value.trim().trim_matches('"').to_string())
            })
        })
        .collect();
    names.sort();
    names
}

/// The workspace's target/, unless it is where this crate itself is being
/// built (`CARGO_TARGET_DIR` pointing there): a nested cargo would then wait
/// for the lock its parent holds.
fn bundle_target_dir(root: &Path) -> PathBuf {
    let own = root.join("target");
    let parent = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
    let same = parent.is_some_and(|p| p.canonicalize().ok() == own.canonicalize().ok() || p == own);
    if same {
        own.join("layerhost-bundle")
    } else {
        own
    }
}

fn copy(from: &Path, to: &Path) {
    // Replaced, not written over: a running process may have the old file
    // mapped.
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), to.display()));
}
