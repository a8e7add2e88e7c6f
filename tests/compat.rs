//! Compatibility across versions of the layer interface, in both directions,
//! proven with real plugins that cargo builds and the real `host` loads:
//!
//! * a plugin built against interface 1.0 (the frozen copies of layer-abi
//!   and layer-api in `tests/compat/`) loads and runs in this host;
//! * a plugin built against a later 1.x (a copy of this layer-abi with the
//!   minor version bumped, a table entry, a capability and a manifest field
//!   added, and of this layer-api filling them in) loads and runs in this
//!   host, which never looks past what it knows;
//! * a plugin built against a layer-api of another major version, over the
//!   same layer-abi, loads and runs: the interface's version is layer-abi's;
//! * such a plugin that *needs* the capability this host lacks is refused
//!   before it is opened, naming the capability;
//! * a plugin of another major version, or one built against a copy whose
//!   core types differ, is refused with a message saying what differs.
//!
//! Each pair of copies (layer-abi and layer-api) is built with its plugins in
//! a temporary workspace that reuses the repository's Cargo.lock. Every build
//! shares one target directory, `target/compat-builds`, so that abi_stable
//! and the other dependencies compile once; later runs recompile only the
//! small crates.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use layer_api::abi::{ABI_MAJOR, ABI_MINOR, CAPABILITIES};
use ndarray::{ArrayD, IxDyn};
use support::{path_str, plugin_dir, read_npy_f32, repo_root, write_npy_f32, Run};

// ---- the plugins ----

/// y = 2x, written against interface 1.0: no `flops`, no `prepare`.
const SCALE2: &str = r#"
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};

pub struct Scale2;

impl Layer for Scale2 {
    const DESCRIPTION: &'static str = "y = 2x";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Scale2)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input.to_vec())
    }
    fn batch_independent(&self) -> bool {
        true
    }
    fn forward(&self, x: ArrayViewD<f32>, _p: &Params, mut y: ArrayViewMutD<f32>) -> Result<(), String> {
        y.zip_mut_with(&x, |y, &x| *y = 2.0 * x);
        Ok(())
    }
}

export_layer!(Scale2);
"#;

/// y = 3x, written against a later 1.x: it uses 1.1's `flops` and
/// `prepare` (the factor is prepared data), which the host finds in a table
/// longer than its own.
const SCALE3: &str = r#"
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params, Prepared};

pub struct Scale3;

impl Layer for Scale3 {
    const DESCRIPTION: &'static str = "y = 3x";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(Scale3)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input.to_vec())
    }
    fn batch_independent(&self) -> bool {
        true
    }
    fn forward(&self, x: ArrayViewD<f32>, p: &Params, mut y: ArrayViewMutD<f32>) -> Result<(), String> {
        let factor = *p.prepared::<f32>()?;
        y.zip_mut_with(&x, |y, &x| *y = factor * x);
        Ok(())
    }
    fn flops(&self, input_shape: &[usize]) -> u64 {
        input_shape.iter().product::<usize>() as u64
    }
    fn prepare(&self, _input_shape: &[usize], _params: &Params) -> Result<Option<Prepared>, String> {
        Ok(Some(Box::new(3.0f32)))
    }
}

export_layer!(Scale3);
"#;

/// An identity layer called `TYPE`, exported with `EXPORT_ARGS`.
const IDENTITY: &str = r#"
use layer_api::{export_layer, ArrayViewD, ArrayViewMutD, Layer, NoConfig, Params};

pub struct TYPE;

impl Layer for TYPE {
    const DESCRIPTION: &'static str = "identity";
    type Config = NoConfig;

    fn new(_config: NoConfig) -> Result<Self, String> {
        Ok(TYPE)
    }
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>, String> {
        Ok(input.to_vec())
    }
    fn batch_independent(&self) -> bool {
        true
    }
    fn forward(&self, x: ArrayViewD<f32>, _p: &Params, mut y: ArrayViewMutD<f32>) -> Result<(), String> {
        y.assign(&x);
        Ok(())
    }
}

export_layer!(EXPORT_ARGS);
"#;

fn identity(type_name: &str, export_args: &str) -> String {
    IDENTITY
        .replace("EXPORT_ARGS", export_args)
        .replace("TYPE", type_name)
}

// ---- building plugins against copies of layer-abi and layer-api ----

/// The target directory every build here shares.
fn target_dir() -> PathBuf {
    plugin_dir()
        .parent()
        .expect("the profile folder sits in the target folder")
        .join("compat-builds")
}

/// The root manifest's `[workspace.package]` and `[workspace.dependencies]`,
/// which the current crates' manifests inherit from, with layer-abi and
/// layer-api themselves named by path only (the copies carry other
/// versions).
fn inherited_tables() -> String {
    let manifest = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let mut keep = false;
    let mut tables = String::new();
    for line in manifest.lines() {
        if line.starts_with('[') {
            keep = matches!(
                line.trim(),
                "[workspace.package]" | "[workspace.dependencies]"
            );
        }
        if !keep {
            continue;
        }
        if let Some(name) = ["layer-abi", "layer-api"]
            .into_iter()
            .find(|name| line.starts_with(&format!("{name} = ")))
        {
            tables.push_str(&format!("{name} = {{ path = \"{name}\" }}\n"));
        } else {
            tables.push_str(line);
            tables.push('\n');
        }
    }
    assert!(
        tables.contains("[workspace.dependencies]")
            && tables.contains("abi_stable")
            && tables.contains("layer-abi = { path = \"layer-abi\" }\n")
            && tables.contains("layer-api = { path = \"layer-api\" }\n"),
        "the root manifest has the tables layer-abi and layer-api inherit from:\n{tables}"
    );
    tables
}

/// Copies a crate's manifest and sources (`Cargo.toml`, `src/`) to `to`.
fn copy_crate(from: &Path, to: &Path) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("Cargo.toml"), to.join("Cargo.toml")).unwrap();
    copy_dir(&from.join("src"), &to.join("src"));
}

/// Builds each plugin (crate name, `lib.rs`) against the copies of
/// layer-abi and layer-api that `crates` writes into the workspace folder it
/// is given (as `layer-abi/` and `layer-api/`), all in one temporary
/// workspace. The libraries land in [`target_dir`]`/debug`; [`install`]
/// copies them out.
fn build(crates: impl FnOnce(&Path), plugins: &[(&str, String)]) {
    let work = tempfile::tempdir().unwrap();
    crates(work.path());
    // The frozen 1.0 copy is layer-api alone: the binary interface moved
    // into layer-abi after it.
    let copies: Vec<&str> = ["layer-abi", "layer-api"]
        .into_iter()
        .filter(|copy| work.path().join(copy).join("Cargo.toml").is_file())
        .collect();
    assert!(
        copies.contains(&"layer-api"),
        "a copy of layer-api was written"
    );
    let members: Vec<String> = copies
        .into_iter()
        .chain(plugins.iter().map(|(name, _)| *name))
        .map(|m| format!("{m:?}"))
        .collect();
    std::fs::write(
        work.path().join("Cargo.toml"),
        format!(
            "[workspace]\nresolver = \"2\"\nmembers = [{}]\n\n{}\n[profile.dev]\n\
             # No debug info: a third of the build time and disk.\ndebug = false\n",
            members.join(", "),
            inherited_tables()
        ),
    )
    .unwrap();
    // The workspace's lock file pins the versions the host was built with,
    // so nothing needs resolving and the build works offline.
    std::fs::copy(
        repo_root().join("Cargo.lock"),
        work.path().join("Cargo.lock"),
    )
    .unwrap();
    for (name, source) in plugins {
        let dir = work.path().join(name);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 publish = false\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n\
                 layer-api = {{ path = \"../layer-api\" }}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("src/lib.rs"), source).unwrap();
    }
    let out = Command::new(env!("CARGO"))
        .current_dir(work.path())
        .env("CARGO_TARGET_DIR", target_dir())
        .args(["build", "--offline"])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "building {} failed:\n{}",
        members.join(", "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new plugin directory holding the built libraries of `names`.
fn install(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in names {
        let file = format!("lib{name}.so");
        std::fs::copy(
            target_dir().join("debug").join(&file),
            dir.path().join(&file),
        )
        .unwrap_or_else(|e| panic!("{file} was built: {e}"));
    }
    dir
}

/// The JSON text of the manifest in the library file at `library`.
fn manifest_text(library: &Path) -> String {
    let bytes = std::fs::read(library).unwrap();
    let magic = &layer_api::abi::MANIFEST_MAGIC[..];
    let start = bytes
        .windows(magic.len())
        .position(|w| w == magic)
        .unwrap_or_else(|| panic!("{} holds a manifest", library.display()))
        + magic.len();
    let end = start + bytes[start..].iter().position(|&b| b == 0).unwrap();
    String::from_utf8(bytes[start..end].to_vec()).unwrap()
}

/// Replaces the one occurrence of `from` in `file` with `to`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert_eq!(
        text.matches(from).count(),
        1,
        "{} holds `{from}` once",
        file.display()
    );
    std::fs::write(file, text.replacen(from, to, 1)).unwrap();
}

/// Inserts `text` in `file` just before the first `end` that follows
/// `start` (the end of a struct or of a list, say).
fn insert_before_end(file: &Path, start: &str, end: &str, text: &str) {
    let mut content = std::fs::read_to_string(file).unwrap();
    let from = content
        .find(start)
        .unwrap_or_else(|| panic!("{} holds `{start}`", file.display()));
    let at = from
        + content[from..]
            .find(end)
            .unwrap_or_else(|| panic!("{}: `{end}` follows `{start}`", file.display()));
    content.insert_str(at, text);
    std::fs::write(file, content).unwrap();
}

/// Sets the package version in the crate manifest `manifest`.
fn set_version(manifest: &Path, version: &str) {
    let text = std::fs::read_to_string(manifest).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("version = "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{} has one version line",
        manifest.display()
    );
    let line = lines[0];
    edit(manifest, line, &format!("version = \"{version}\""));
}

/// Copies the current layer-abi and layer-api into the workspace folder
/// `work`, each with its crate version set to the one given (`None`: as it
/// is).
fn copy_current_crates(work: &Path, abi_version: Option<&str>, api_version: Option<&str>) {
    for (name, version) in [("layer-abi", abi_version), ("layer-api", api_version)] {
        copy_crate(&repo_root().join(name), &work.join(name));
        if let Some(version) = version {
            set_version(&work.join(name).join("Cargo.toml"), version);
        }
    }
}

/// Copies the frozen interface 1.0 crate into the workspace folder `work`.
fn frozen_1_0(work: &Path) {
    let frozen = repo_root().join("tests/compat");
    copy_crate(&frozen.join("layer-api-1.0"), &work.join("layer-api"));
}

/// The minor version of the "future" copy: one past this host's.
const FUTURE_MINOR: u32 = ABI_MINOR + 1;

/// Copies of the current crates as a later 1.x would be: in layer-abi, the
/// minor version bumped, a table entry `teleport` and its capability
/// appended, and a field `later` in the manifest; in layer-api, the entry
/// filled in and offered, and an export macro that can say what the plugin
/// needs (`export_layer!(T, needs = ["teleport"])`).
fn future_crates(work: &Path) {
    let minor = FUTURE_MINOR;
    let version = format!("{ABI_MAJOR}.{minor}.0");
    copy_current_crates(work, Some(&version), Some(&version));
    let abi = work.join("layer-abi/src/abi.rs");
    edit(
        &abi,
        &format!("pub const ABI_MINOR: u32 = {ABI_MINOR};"),
        &format!("pub const ABI_MINOR: u32 = {minor};"),
    );
    insert_before_end(
        &abi,
        "pub struct PluginTable {",
        "\n}\n",
        &format!("\n\n    // ---- {ABI_MAJOR}.{minor} ----\n    pub teleport: Option<extern \"C\" fn() -> u64>,"),
    );
    insert_before_end(
        &abi,
        "pub const CAPABILITIES",
        "];",
        &format!("    (\"teleport\", {minor}),\n"),
    );
    edit(
        &work.join("layer-abi/src/manifest.rs"),
        "    w.raw(b\"}\");\n    w.buf",
        "    w.raw(b\",\\\"later\\\":{\\\"x\\\":1}\");\n    w.raw(b\"}\");\n    w.buf",
    );

    let adapter = work.join("layer-api/src/adapter.rs");
    edit(
        &adapter,
        "/// The table of the plugin whose layer is `L`.",
        "extern \"C\" fn teleport() -> u64 {\n    42\n}\n\n\
         /// The table of the plugin whose layer is `L`.",
    );
    insert_before_end(
        &adapter,
        "pub const fn plugin_table<",
        "\n    }\n}\n",
        "\n        teleport: Some(teleport),",
    );
    edit(
        &adapter,
        "&[\"flops\", \"prepare\", \"backward\", \"lend-pool\"]",
        "&[\"flops\", \"prepare\", \"backward\", \"lend-pool\", \"teleport\"]",
    );
    edit(
        &adapter,
        "&[\"flops\", \"prepare\", \"lend-pool\"]\n",
        "&[\"flops\", \"prepare\", \"lend-pool\", \"teleport\"]\n",
    );
    edit(
        &adapter,
        "($layer:ty) => {",
        "($layer:ty $(, needs = [$($need:literal),* $(,)?])?) => {",
    );
    edit(&adapter, "needs: &[],", "needs: &[$($($need),*)?],");
}

/// Builds, once per test run, `scale3` and `needs_teleport` against the
/// future copy, in one workspace.
fn build_future_plugins() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        build(
            future_crates,
            &[
                ("scale3", SCALE3.to_string()),
                (
                    "needs_teleport",
                    identity("NeedsTeleport", "NeedsTeleport, needs = [\"teleport\"]"),
                ),
            ],
        )
    });
}

// ---- running the host ----

/// Runs the real `host` with `args`. Unlike `support::host`, it does not
/// build the workspace's plugins first: these tests load only the plugins
/// they build themselves, each from a directory of its own.
fn host(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_host"))
        .current_dir(repo_root())
        .env_remove("LAYER_PLUGIN_PATH")
        .args(args)
        .output()
        .expect("host runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The interface this host speaks, `major.minor`.
fn host_interface() -> String {
    format!("{ABI_MAJOR}.{ABI_MINOR}")
}

/// `host plugins` with `plugins` searched first. (It also reads every
/// library beside the host executable, which takes seconds in a debug
/// build: call it once per test.)
fn plugins_listing(plugins: &Path) -> Run {
    let run = host(&["plugins", "--plugin-dir", path_str(plugins)]);
    run.ok();
    run
}

/// The fields of `plugin`'s row in a `host plugins` listing, or `None` when
/// it is not listed.
fn row(listing: &Run, plugin: &str) -> Option<Vec<String>> {
    listing
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(plugin))
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect()
        })
}

/// The warnings of a `host plugins` listing about libraries in `plugins`.
fn warnings<'a>(listing: &'a Run, plugins: &Path) -> Vec<&'a str> {
    listing
        .stderr
        .lines()
        .filter(|l| l.contains(path_str(plugins)))
        .collect()
}

/// A model of one layer of type `layer`, and an input, in a new directory.
fn model_and_input(layer: &str) -> (tempfile::TempDir, PathBuf, PathBuf, ArrayD<f32>) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.json");
    std::fs::write(
        &model,
        format!(r#"{{"format": 1, "layers": [{{"type": "{layer}"}}]}}"#),
    )
    .unwrap();
    let x =
        ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, -2.0, 3.5, 0.25, 0.0, -6.0]).unwrap();
    let input = dir.path().join("x.npy");
    write_npy_f32(&input, &x);
    (dir, model, input, x)
}

/// `host run` of a one-layer model of `layer` on a 2×3 input: the input and
/// what came out.
fn run_one_layer(plugins: &Path, layer: &str) -> (ArrayD<f32>, ArrayD<f32>) {
    let (dir, model, input, x) = model_and_input(layer);
    let output = dir.path().join("y.npy");
    host(&[
        "run",
        path_str(&model),
        "--input",
        path_str(&input),
        "--output",
        path_str(&output),
        "--plugin-dir",
        path_str(plugins),
    ])
    .ok();
    (x, read_npy_f32(&output))
}

/// `host run` of a one-layer model of `layer`, expected to fail: stderr.
fn run_one_layer_fails(plugins: &Path, layer: &str, verbose: bool) -> String {
    let (_dir, model, input, _) = model_and_input(layer);
    let mut args = vec![
        "run",
        path_str(&model),
        "--input",
        path_str(&input),
        "--plugin-dir",
        path_str(plugins),
    ];
    if verbose {
        args.push("--verbose");
    }
    host(&args).failed().to_string()
}

/// The operations `host bench` says the one layer of a model of `layer`
/// performs on a 4×3 input, from the plugin's `flops` (0: unknown).
fn bench_flops(plugins: &Path, layer: &str) -> u64 {
    let (_dir, model, _, _) = model_and_input(layer);
    let run = host(&[
        "bench",
        path_str(&model),
        "--batch",
        "4",
        "--features",
        "3",
        "--min-time",
        "0",
        "--json",
        "--plugin-dir",
        path_str(plugins),
    ]);
    let report: serde_json::Value = serde_json::from_str(run.ok()).expect("bench prints JSON");
    report["layers"][0]["flops"]
        .as_u64()
        .unwrap_or_else(|| panic!("no flops in {report}"))
}

/// Asserts `host check-plugin` passes every check on `library`, and that
/// its identity line says `identity`.
fn check_plugin_passes(library: &Path, identity: &str) {
    let run = host(&["check-plugin", path_str(library)]);
    let stdout = run.ok();
    assert!(
        stdout.contains(&format!("PASS identity               {identity}\n")),
        "{stdout}"
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains(" passed, 0 failed"), "{stdout}");
}

/// Asserts `host check-plugin` fails `library`'s identity check with
/// `reason`, and nothing else runs.
fn check_plugin_fails_identity(library: &Path, reason: &str) {
    let run = host(&["check-plugin", path_str(library)]);
    run.failed();
    assert!(
        run.stdout
            .contains(&format!("FAIL identity               {reason}\n")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("0 passed, 1 failed, 0 skipped\n"),
        "{}",
        run.stdout
    );
}

/// Asserts a `host plugins` listing of the directory `plugins` leaves
/// `plugin` out and warns about it, once, with `reason`.
fn not_listed_but_warned(listing: &Run, plugins: &Path, plugin: &str, reason: &str) {
    assert_eq!(row(listing, plugin), None, "{}", listing.stdout);
    assert_eq!(
        warnings(listing, plugins),
        [format!("warning: skipped {reason}")],
        "{}",
        listing.stderr
    );
}

// ---- the tests ----

#[test]
fn a_plugin_built_against_interface_1_0_loads_and_runs() {
    build(frozen_1_0, &[("scale2", SCALE2.to_string())]);
    let plugins = install(&["scale2"]);
    let library = plugins.path().join("libscale2.so");
    // A 1.0 manifest names no abi_stable series (the host takes it for 0.11).
    let manifest = manifest_text(&library);
    assert!(
        manifest.contains(r#""abi":[1,0],"layer_api":"1.0.0","#)
            && !manifest.contains("abi_stable"),
        "{manifest}"
    );

    let listing = plugins_listing(plugins.path());
    assert_eq!(
        row(&listing, "scale2").expect("scale2 is listed"),
        ["scale2", "0.1.0", "1.0", "y = 2x", path_str(&library)]
    );
    assert!(
        warnings(&listing, plugins.path()).is_empty(),
        "{}",
        listing.stderr
    );

    let (x, y) = run_one_layer(plugins.path(), "scale2");
    assert_eq!(y.shape(), [2, 3]);
    assert_eq!(y, x.mapv(|v| 2.0 * v));
    assert_eq!(y.as_slice().unwrap(), [2.0, -4.0, 7.0, 0.5, 0.0, -12.0]);

    // The table ends with the 1.0 core: the host reads no `flops` past it.
    assert_eq!(bench_flops(plugins.path(), "scale2"), 0);

    check_plugin_passes(
        &library,
        &format!(
            "scale2 0.1.0, interface 1.0 (this host speaks {}): y = 2x",
            host_interface()
        ),
    );
}

#[test]
fn a_plugin_built_against_a_later_minor_version_loads_and_runs() {
    build_future_plugins();
    let plugins = install(&["scale3"]);
    let library = plugins.path().join("libscale3.so");
    let future = format!("{ABI_MAJOR}.{FUTURE_MINOR}");
    // What this host does not know: a capability and a manifest field.
    let manifest = manifest_text(&library);
    assert!(
        manifest.contains(&format!(r#""abi":[{ABI_MAJOR},{FUTURE_MINOR}]"#))
            && manifest.contains(r#","teleport"],"needs":[],"#)
            && manifest.contains(r#""later":{"x":1}"#),
        "{manifest}"
    );

    let listing = plugins_listing(plugins.path());
    assert_eq!(
        row(&listing, "scale3").expect("scale3 is listed"),
        [
            "scale3",
            "0.1.0",
            future.as_str(),
            "y = 3x",
            path_str(&library)
        ]
    );
    assert!(
        warnings(&listing, plugins.path()).is_empty(),
        "{}",
        listing.stderr
    );

    // The factor comes from `prepare`: the host found 1.1's entries in a
    // table longer than its own.
    let (x, y) = run_one_layer(plugins.path(), "scale3");
    assert_eq!(y, x.mapv(|v| 3.0 * v));
    assert_eq!(y.as_slice().unwrap(), [3.0, -6.0, 10.5, 0.75, 0.0, -18.0]);
    assert_eq!(bench_flops(plugins.path(), "scale3"), 4 * 3);

    check_plugin_passes(
        &library,
        &format!(
            "scale3 0.1.0, interface {future} (this host speaks {}): y = 3x",
            host_interface()
        ),
    );
}

/// What the split into layer-abi and layer-api is for: layer-api may go to
/// another major version (an ndarray upgrade through its re-export, say)
/// without refusing plugins, since the core types are layer-abi's, whose
/// crate name and major version the layout check compares.
#[test]
fn a_plugin_built_against_another_major_version_of_layer_api_loads_and_runs() {
    let api_major = layer_api::LAYER_API_VERSION
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .expect("layer-api has a major version")
        + 1;
    let api_version = format!("{api_major}.0.0");
    build(
        |work| copy_current_crates(work, None, Some(&api_version)),
        &[("api_next_major", SCALE3.replace("Scale3", "ApiNextMajor"))],
    );
    let plugins = install(&["api_next_major"]);
    let library = plugins.path().join("libapi_next_major.so");
    let manifest = manifest_text(&library);
    assert!(
        manifest.contains(&format!(r#""abi":[{ABI_MAJOR},{ABI_MINOR}]"#))
            && manifest.contains(&format!(r#""layer_api":"{api_version}""#)),
        "{manifest}"
    );

    let listing = plugins_listing(plugins.path());
    assert_eq!(
        row(&listing, "api_next_major").expect("api_next_major is listed"),
        [
            "api_next_major",
            "0.1.0",
            host_interface().as_str(),
            "y = 3x",
            path_str(&library)
        ]
    );
    assert!(
        warnings(&listing, plugins.path()).is_empty(),
        "{}",
        listing.stderr
    );

    let (x, y) = run_one_layer(plugins.path(), "api_next_major");
    assert_eq!(y, x.mapv(|v| 3.0 * v));
    assert_eq!(y.as_slice().unwrap(), [3.0, -6.0, 10.5, 0.75, 0.0, -18.0]);
    assert_eq!(bench_flops(plugins.path(), "api_next_major"), 4 * 3);

    check_plugin_passes(
        &library,
        &format!(
            "api_next_major 0.1.0, interface {0} (this host speaks {0}): y = 3x",
            host_interface()
        ),
    );
}

#[test]
fn a_later_plugin_that_needs_what_this_host_lacks_is_refused() {
    build_future_plugins();
    let plugins = install(&["needs_teleport", "scale3"]);
    let library = plugins.path().join("libneeds_teleport.so");
    let offers: Vec<&str> = CAPABILITIES.iter().map(|(c, _)| *c).collect();
    let reason = format!(
        "{}: the plugin needs 'teleport', which this host (interface {}) does not have; it \
         offers: {}. Use a newer host",
        library.display(),
        host_interface(),
        offers.join(", ")
    );
    assert!(
        manifest_text(&library).contains(r#""needs":["teleport"]"#),
        "{}",
        manifest_text(&library)
    );

    let err = run_one_layer_fails(plugins.path(), "needs_teleport", false);
    assert_eq!(err, format!("error: layer '0': {reason}\n"));

    let listing = plugins_listing(plugins.path());
    not_listed_but_warned(&listing, plugins.path(), "needs_teleport", &reason);
    // The plugin beside it, of the same later version, is listed.
    assert!(row(&listing, "scale3").is_some(), "{}", listing.stdout);

    check_plugin_fails_identity(&library, &reason);
}

/// Replaces the incompatible-layer-api tests that were in tests/trust.rs.
#[test]
fn a_plugin_of_another_major_version_is_refused_naming_both_versions() {
    let major = ABI_MAJOR + 1;
    build(
        |work| {
            let version = format!("{major}.0.0");
            copy_current_crates(work, Some(&version), Some(&version));
            let abi = work.join("layer-abi/src/abi.rs");
            edit(
                &abi,
                &format!("pub const ABI_MAJOR: u32 = {ABI_MAJOR};"),
                &format!("pub const ABI_MAJOR: u32 = {major};"),
            );
            edit(
                &abi,
                &format!("pub const ABI_MINOR: u32 = {ABI_MINOR};"),
                "pub const ABI_MINOR: u32 = 0;",
            );
        },
        &[("next_major", identity("NextMajor", "NextMajor"))],
    );
    let plugins = install(&["next_major"]);
    let library = plugins.path().join("libnext_major.so");
    let reason = format!(
        "{}: built for layer interface {major}.0, but this host speaks {}; rebuild the plugin \
         against a layer-api of interface {ABI_MAJOR}.x",
        library.display(),
        host_interface()
    );

    let err = run_one_layer_fails(plugins.path(), "next_major", false);
    assert_eq!(err, format!("error: layer '0': {reason}\n"));
    let verbose = run_one_layer_fails(plugins.path(), "next_major", true);
    assert!(verbose.starts_with(&err), "{verbose}");

    let listing = plugins_listing(plugins.path());
    not_listed_but_warned(&listing, plugins.path(), "next_major", &reason);
    check_plugin_fails_identity(&library, &reason);
}

/// Replaces the incompatible-layer-api tests that were in tests/trust.rs.
#[test]
fn a_plugin_whose_core_types_differ_is_refused_by_the_layout_check() {
    // The same interface version, but a core type with another field: a
    // modified copy of layer-abi.
    build(
        |work| {
            copy_current_crates(work, None, None);
            insert_before_end(
                &work.join("layer-abi/src/abi.rs"),
                "pub struct TensorRef<'a> {",
                "\n}\n",
                "\n    pub strides: RSlice<'a, isize>,",
            );
            // Where the copies themselves make a `TensorRef`.
            for copy in ["layer-abi", "layer-api"] {
                for entry in std::fs::read_dir(work.join(copy).join("src")).unwrap() {
                    let file = entry.unwrap().path();
                    let text = std::fs::read_to_string(&file).unwrap();
                    let text = text.replace(
                        "TensorRef {\n",
                        "TensorRef {\n strides: RSlice::from_slice(&[]),\n",
                    );
                    std::fs::write(&file, text).unwrap();
                }
            }
        },
        &[("wide_tensor", identity("WideTensor", "WideTensor"))],
    );
    let plugins = install(&["wide_tensor"]);
    let library = plugins.path().join("libwide_tensor.so");

    let err = run_one_layer_fails(plugins.path(), "wide_tensor", false);
    let prefix = format!(
        "error: layer '0': {}: its interface table does not match layer interface {ABI_MAJOR}.x \
         as this host knows it (",
        library.display()
    );
    let suffix = format!(
        "): built against a modified copy of layer-abi? Rebuild it against a layer-api of \
         interface {ABI_MAJOR}.x (--verbose shows the full report)\n"
    );
    let summary = err
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(&suffix))
        .unwrap_or_else(|| panic!("expected {prefix}…{suffix}, got:\n{err}"));
    assert!(
        !summary.is_empty() && !summary.contains('\n'),
        "a one-line summary: {err}"
    );
    // The first difference the check meets: a `ParamRef` (a name and a
    // `TensorRef`) one slice, a pointer and a length, longer.
    let size = std::mem::size_of::<layer_api::abi::ParamRef<'static>>();
    assert_eq!(
        summary,
        format!(
            "incompatible type size, expected {size}, found {}",
            size + 2 * std::mem::size_of::<usize>()
        ),
        "{err}"
    );

    let verbose = run_one_layer_fails(plugins.path(), "wide_tensor", true);
    assert!(verbose.starts_with(&err), "{verbose}");
    assert!(
        verbose.len() > err.len() + 20 && verbose.contains("strides"),
        "--verbose adds the report, which names the new field: {verbose}"
    );

    let reason = err
        .strip_prefix("error: layer '0': ")
        .unwrap()
        .trim_end()
        .to_string();
    check_plugin_fails_identity(&library, &reason);
}
