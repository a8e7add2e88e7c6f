//! Shared by the integration tests: builds the plugins they load (cargo test
//! alone does not produce cdylib files), runs the real `host` binary, and
//! reads and writes `.npy` files with `ndarray-npy`, independently of the
//! host's own reader and writer.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use ndarray::{ArrayD, IxDyn};

/// Every plugin crate the tests load, including the test-only ones.
const PLUGINS: &[&str] = &[
    "centered",
    "mydense",
    "linear",
    "tensor_reduction",
    "fourier",
    "faulty",
    "cast",
    "embedding",
    "layernorm",
    "multihead_attention",
    "add",
    "relu",
    "gelu",
    "softmax",
    "mean",
];

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ sits in the repository root")
        .to_path_buf()
}

pub fn host_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_host"))
}

/// The directory cargo put the host in, where the plugins are built too.
pub fn plugin_dir() -> PathBuf {
    host_exe()
        .parent()
        .expect("exe has a directory")
        .to_path_buf()
}

/// Builds the plugin libraries, once per test binary, with the same profile
/// and target directory as the host under test.
pub fn build_plugins() {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let dir = plugin_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_string(),
            Some(other) => other.to_string(),
        };
        let target_dir = dir.parent().expect("profile dir is inside the target dir");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(repo_root())
            .args(["build", "--profile", &profile, "--target-dir"])
            .arg(target_dir);
        for p in PLUGINS {
            cmd.args(["-p", p]);
        }
        let out = cmd.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// What one run of the host printed and how it exited.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts a clean success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "host failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts an orderly failure (exit status 1: no crash, no signal, no
    /// panic) and returns stderr.
    pub fn failed(&self) -> &str {
        assert_eq!(
            self.code,
            Some(1),
            "expected exit status 1:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert!(
            !self.stderr.contains("thread '"),
            "a panic reached the user:\n{}",
            self.stderr
        );
        assert!(self.stderr.starts_with("error: "), "{}", self.stderr);
        &self.stderr
    }
}

/// Runs `host` with `args` from the repository root, with the plugins built
/// and no plugin path from the environment.
pub fn host(args: &[&str]) -> Run {
    build_plugins();
    let out = Command::new(host_exe())
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

pub fn read_npy_f32(path: &Path) -> ArrayD<f32> {
    ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn read_npy_f64(path: &Path) -> ArrayD<f64> {
    ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn write_npy_f32(path: &Path, array: &ArrayD<f32>) {
    ndarray_npy::write_npy(path, array).expect("write npy");
}

/// Deterministic values in [0, 1) (xorshift), so tests need no RNG crate.
pub fn uniform(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n: usize = shape.iter().product();
    let values = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("shape matches")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A temporary directory holding `m.json`, a model of `layers` (JSON array).
pub fn model_with_layers(layers: &str) -> tempfile::TempDir {
    temp_dir_with(&[("m.json", &format!(r#"{{"format": 1, "layers": {layers}}}"#))])
}

/// Runs the model `m.json` in `dir` on `input`.
pub fn run_model(dir: &tempfile::TempDir, input: &str) -> Run {
    host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        input,
    ])
}

/// A temporary directory holding `files` (name, contents).
pub fn temp_dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write file");
    }
    dir
}

/// Asserts `actual` is within `rtol` (relative to the largest magnitude of
/// `expected`, floored at 1) of `expected`, element by element.
pub fn assert_close(actual: &ArrayD<f32>, expected: &ArrayD<f64>, rtol: f64) {
    assert_eq!(actual.shape(), expected.shape(), "shapes differ");
    let scale = expected.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
        assert!(
            (f64::from(*a) - e).abs() <= rtol * scale,
            "element {i}: got {a}, expected {e}"
        );
    }
}

/// An `.npz` archive written the way `np.savez` writes one: a zip of
/// `<name>.npy` members, stored uncompressed, each array written by
/// ndarray-npy. (ndarray-npy's own `NpzWriter` needs its `npz` feature, which
/// would bring a second version of the zip crate into the build; this is
/// the same few lines over the zip crate the host already depends on.)
pub struct NpzOut {
    zip: zip::ZipWriter<std::fs::File>,
}

impl NpzOut {
    pub fn create(path: &Path) -> NpzOut {
        let file =
            std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        NpzOut {
            zip: zip::ZipWriter::new(file),
        }
    }

    fn start(&mut self, name: &str) {
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        self.zip
            .start_file(format!("{name}.npy"), options)
            .expect("start an npz member");
    }

    /// Adds `array` as `<name>.npy`, in its own element type.
    pub fn add<A: ndarray_npy::WriteNpyExt>(&mut self, name: &str, array: &A) -> &mut NpzOut {
        self.start(name);
        array.write_npy(&mut self.zip).expect("write an npz member");
        self
    }

    /// Adds the bytes of an `.npy` file as `<name>.npy`.
    pub fn add_npy_bytes(&mut self, name: &str, bytes: &[u8]) -> &mut NpzOut {
        self.start(name);
        std::io::Write::write_all(&mut self.zip, bytes).expect("write an npz member");
        self
    }

    pub fn finish(self) {
        self.zip.finish().expect("finish the npz");
    }
}

/// The arrays of an `.npz` file, by name (the member name without `.npy`),
/// in the archive's order, each as the bytes of its `.npy` file; read with
/// the zip crate, independently of the host's reader.
pub fn npz_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut archive = zip::ZipArchive::new(file).expect("a zip archive");
    (0..archive.len())
        .map(|i| {
            let mut member = archive.by_index(i).expect("a readable member");
            let name = member
                .name()
                .strip_suffix(".npy")
                .unwrap_or_else(|| panic!("member {} is not an .npy", member.name()))
                .to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut member, &mut bytes).expect("member bytes");
            (name, bytes)
        })
        .collect()
}

/// Array `name` of an `.npz` file, read by ndarray-npy, which refuses any
/// element type but `T`'s.
pub fn read_npz<T: ndarray_npy::ReadableElement>(path: &Path, name: &str) -> ArrayD<T> {
    let members = npz_members(path);
    let (_, bytes) = members
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{} holds no array '{name}'", path.display()));
    <ArrayD<T> as ndarray_npy::ReadNpyExt>::read_npy(bytes.as_slice())
        .unwrap_or_else(|e| panic!("{}: array '{name}': {e}", path.display()))
}

/// Reads an `.npy` file of element type `T` with ndarray-npy.
pub fn read_npy_as<T: ndarray_npy::ReadableElement>(path: &Path) -> ArrayD<T> {
    ndarray_npy::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts two float32 arrays are equal bit for bit.
pub fn assert_same_bits_f32(a: &ArrayD<f32>, b: &ArrayD<f32>, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes differ");
    if let Some((i, (x, y))) = a
        .iter()
        .zip(b.iter())
        .enumerate()
        .find(|(_, (x, y))| x.to_bits() != y.to_bits())
    {
        panic!("{what}: element {i} differs: {x} vs {y}");
    }
}

/// How long a case may take before it counts as a hang.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Runs `host` with `args` from the repository root (plugins built, no
/// plugin path from the environment), with `env` set, under `RLIMIT_AS` of
/// `address_space` bytes, and kills it if it outlives [`DEADLINE`].
pub fn host_with(args: &[&str], env: &[(&str, &Path)], address_space: Option<u64>) -> Run {
    build_plugins();
    let mut cmd = Command::new(host_exe());
    cmd.current_dir(repo_root())
        .env_remove("LAYER_PLUGIN_PATH")
        .env("RUST_BACKTRACE", "0")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    if let Some(limit) = address_space {
        let rlimit = rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        };
        // SAFETY: between fork and exec only setrlimit runs, a single
        // system call that allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                rustix::process::setrlimit(rustix::process::Resource::As, rlimit)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().expect("host starts");
    // Read the pipes on threads, so that a large output never blocks the
    // child while the deadline is watched.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut s).ok();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut s).ok();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for host") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().ok();
            child.wait().ok();
            panic!("host {args:?} hung: killed after {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out.join().expect("stdout reader")).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned(),
    }
}
