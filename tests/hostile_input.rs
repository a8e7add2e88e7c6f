//! Hostile and careless inputs, through the real `host` binary: sizes that
//! files, configs and plugins ask for (checked against the memory budget,
//! `--max-memory`, before anything is allocated), zero-length axes, `.npz`
//! archives that inflate past what they are or name an array twice, files
//! that never end or block (devices, FIFOs), arrays of very high rank to
//! print, an input truncated while it is read, and a layer whose output
//! shape changes between calls. Each ends in one `error:` line (or a clear
//! result), exit status 1, no panic.
//!
//! The cases that could allocate run the host under `RLIMIT_AS` (set in the
//! child before it starts), so that an unchecked allocation fails the test
//! instead of exhausting the machine.

mod support;

use std::io::Write;

use ndarray::{ArrayD, IxDyn};
use support::*;

/// The address space the host may use in the allocation cases: room for
/// the binary, its libraries, the plugins and its threads, far below the
/// sizes the hostile inputs ask for.
const ADDRESS_SPACE: u64 = 2 << 30;

/// [`host_with`] under the [`ADDRESS_SPACE`] limit, with no environment.
fn limited(args: &[&str]) -> Run {
    host_with(args, &[], Some(ADDRESS_SPACE))
}

/// Asserts an orderly failure (see [`Run::failed`]) whose only `error:`
/// line holds every one of `expected`, and no text of an abort, a capacity
/// overflow or a division by zero.
fn assert_refused(run: &Run, expected: &[&str]) {
    let stderr = run.failed();
    for bad in [
        "panicked",
        "capacity overflow",
        "divide by zero",
        "memory allocation",
        "invalid default initializer: null",
    ] {
        assert!(!stderr.contains(bad), "{bad:?} in:\n{stderr}");
    }
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for fragment in expected {
        assert!(
            errors[0].contains(fragment),
            "want {fragment:?} in:\n{}",
            errors[0]
        );
    }
}

/// An `.npy` file's bytes with a header of `descr` and `shape` (as Python
/// writes a tuple) and `data` after it, as numpy lays it out.
fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// Writes a model of `layers` (a JSON array) into `dir`, under a name of its
/// own, and returns its path.
fn model_file(dir: &tempfile::TempDir, layers: &str) -> String {
    static MODELS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MODELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.path().join(format!("m{n}.json"));
    std::fs::write(&path, format!(r#"{{"format": 1, "layers": {layers}}}"#)).unwrap();
    path_str(&path).to_string()
}

fn input_file(dir: &tempfile::TempDir, shape: &[usize]) -> String {
    let path = dir.path().join("x.npy");
    write_npy_f32(&path, &uniform(shape, 1));
    path_str(&path).to_string()
}

const PLUGIN_DIR_FLAG: &str = "--plugin-dir";

fn plugin_dir_str() -> String {
    path_str(&plugin_dir()).to_string()
}

// ---- Allocations a file or config asks for ----

#[test]
fn a_parameter_config_past_the_budget_is_refused_naming_layer_size_and_budget() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 1000000000000}}]"#,
    );
    let x = input_file(&dir, &[2, 64]);
    let plugins = plugin_dir_str();
    // 10 TiB lets the output (8e12 bytes) pass, not the weight.
    let run = limited(&[
        "run",
        &model,
        "--input",
        &x,
        "--max-memory",
        "10T",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &[
            "layer '0' (plugin 'mydense'): parameter 'weight' of shape (64, 1000000000000) \
           needs 256000000000000 bytes, more than the memory budget of 10995116277760 bytes \
           (--max-memory)",
        ],
    );
    // Without --max-memory the default budget, derived from the limit the
    // host runs under, refuses it too.
    let run = limited(&["run", &model, "--input", &x, PLUGIN_DIR_FLAG, &plugins]);
    assert_refused(
        &run,
        &[
            "layer '0' (plugin 'mydense'): parameter 'weight' of shape (64, 1000000000000) \
             needs 256000000000000 bytes, more than the memory budget of",
            "RLIMIT_AS",
            "--max-memory",
        ],
    );
}

#[test]
fn every_command_that_plans_honours_max_memory() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 1000000000000}}]"#,
    );
    let out = dir.path().join("w.safetensors");
    let plugins = plugin_dir_str();
    let expected = "parameter 'weight' of shape (64, 1000000000000) needs 256000000000000 bytes, \
                    more than the memory budget of 10995116277760 bytes (--max-memory)";
    for args in [
        vec!["inspect", &model, "--input-shape", "2,64"],
        vec!["params", &model, "--input-shape", "2,64"],
        vec![
            "init",
            &model,
            "--input-shape",
            "2,64",
            "--out",
            path_str(&out),
        ],
        vec!["bench", &model, "--batch", "2", "--features", "64"],
    ] {
        let mut args = args.clone();
        args.extend(["--max-memory", "10T", PLUGIN_DIR_FLAG, &plugins]);
        assert_refused(&limited(&args), &[expected]);
    }
    assert!(!out.exists(), "nothing was written");
}

#[test]
fn sizes_past_64_bits_are_counted_exactly_not_wrapped() {
    let dir = tempfile::tempdir().unwrap();
    // 2^62 units: the output's bytes (2 * 2^62 * 4 = 2^65) overflow usize.
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 4611686018427387904}}]"#,
    );
    let plugins = plugin_dir_str();
    for command in ["run", "inspect"] {
        let x = input_file(&dir, &[2, 64]);
        let args = if command == "run" {
            vec![command, &model, "--input", &x, PLUGIN_DIR_FLAG, &plugins]
        } else {
            vec![
                command,
                &model,
                "--input-shape",
                "2,64",
                PLUGIN_DIR_FLAG,
                &plugins,
            ]
        };
        assert_refused(
            &limited(&args),
            &[
                "output 'output' of shape (2, 4611686018427387904) needs 36893488147419103232 \
                 bytes, more than any array can hold (9223372036854775807 bytes)",
            ],
        );
    }
    // Within the budget, inspect prints the true count of a large parameter.
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 1000000000000}}]"#,
    );
    let run = limited(&[
        "inspect",
        &model,
        "--input-shape",
        "2,64",
        "--max-memory",
        "1P",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    let text = run.ok();
    assert!(text.contains("64000000000000"), "{text}");
    assert!(text.contains("total: 65000000000000 parameters"), "{text}");
}

#[test]
fn a_declared_output_past_the_budget_is_refused_naming_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    // Parameters of 8 000 000 bytes fit; the output of 3 rows, 12 000 000,
    // does not.
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 1000000}}]"#,
    );
    let x = input_file(&dir, &[3, 1]);
    let out = dir.path().join("y.npy");
    let plugins = plugin_dir_str();
    let run = limited(&[
        "run",
        &model,
        "--input",
        &x,
        "--output",
        path_str(&out),
        "--max-memory",
        "10000000",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &[
            "layer '0' (plugin 'mydense'): output 'output' of shape (3, 1000000) needs 12000000 \
           bytes, more than the memory budget of 10000000 bytes (--max-memory)",
        ],
    );
    // Printed, the whole output would be held at once.
    let run = limited(&[
        "run",
        &model,
        "--input",
        &x,
        "--max-memory",
        "10000000",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &["the output of shape (3, 1000000) is printed whole, and needs 12000000 bytes"],
    );
}

#[test]
fn an_input_larger_than_the_budget_still_streams_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB in and out, through a budget of 2 MiB: chunks of rows.
    let x = dir.path().join("x.npy");
    let values = uniform(&[1024, 1024], 5);
    write_npy_f32(&x, &values);
    let model = model_file(&dir, r#"[{"type": "faulty"}]"#);
    let out = dir.path().join("y.npy");
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&x),
        "--output",
        path_str(&out),
        "--max-memory",
        "2M",
        PLUGIN_DIR_FLAG,
        &plugin_dir_str(),
    ]);
    run.ok();
    assert_same_bits_f32(&read_npy_f32(&out), &values, "streamed identity");
}

#[test]
fn an_input_past_the_budget_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // The mean of every element: a rank-1 input, not streamed but read
    // whole, and a tiny output.
    let model = model_file(&dir, r#"[{"type": "mean", "config": {"dims": [0]}}]"#);
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &ArrayD::zeros(IxDyn(&[1 << 20])));
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&x),
        "--max-memory",
        "1M",
        PLUGIN_DIR_FLAG,
        &plugin_dir_str(),
    ]);
    assert_refused(
        &run,
        &[
            "x.npy: the array of shape (1048576,) ('<f4') needs 4194304 bytes, more than the \
             memory budget of 1048576 bytes (--max-memory)",
        ],
    );
}

#[test]
fn the_forward_pass_buffers_and_parameters_together_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // Parameters: 64 * 300000 + 300000 floats = 78 000 000 bytes; the
    // output buffer of 2 rows another 2 400 000.
    let model = model_file(
        &dir,
        r#"[{"type": "mydense", "config": {"units": 300000}}]"#,
    );
    let x = input_file(&dir, &[2, 64]);
    let run = limited(&[
        "run",
        &model,
        "--input",
        &x,
        "--max-memory",
        "79000000",
        PLUGIN_DIR_FLAG,
        &plugin_dir_str(),
    ]);
    assert_refused(
        &run,
        &[
            "the forward pass (buffers for 1 of the layers' outputs: 2400000 bytes; \
             parameters: 78000000 bytes) needs 80400000 bytes, more than the memory budget \
             of 79000000 bytes (--max-memory)",
        ],
    );
}

#[test]
fn max_memory_takes_suffixes_and_refuses_nonsense() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(&dir, r#"[{"type": "centered"}]"#);
    let x = input_file(&dir, &[2, 3]);
    let plugins = plugin_dir_str();
    for size in ["512M", "4G", "1.5G", "4GiB", "1048576"] {
        let run = limited(&[
            "run",
            &model,
            "--input",
            &x,
            "--max-memory",
            size,
            PLUGIN_DIR_FLAG,
            &plugins,
        ]);
        run.ok();
    }
    let run = limited(&["run", &model, "--input", &x, "--max-memory", "lots"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("'lots' is not a size"),
        "{}",
        run.stderr
    );
}

// ---- Zero-length axes ----

#[test]
fn zero_length_axes_give_a_clear_result_or_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = plugin_dir_str();
    let write = |name: &str, shape: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, npy_bytes("<f4", shape, &[])).unwrap();
        path_str(&path).to_string()
    };
    let wide_empty = write("a.npy", "(4611686018427387904, 0)");
    let empty_wide = write("b.npy", "(0, 4611686018427387904)");
    let two_empty = write("c.npy", "(2, 0)");
    let centered = model_file(&dir, r#"[{"type": "centered"}]"#);
    for x in [&wide_empty, &empty_wide, &two_empty] {
        let run = limited(&["run", &centered, "--input", x, PLUGIN_DIR_FLAG, &plugins]);
        assert_eq!(run.ok(), "[]\n", "{x}: numpy prints an empty array as []");
    }
    let dense = model_file(&dir, r#"[{"type": "mydense", "config": {"units": 3}}]"#);
    let run = limited(&[
        "run",
        &dense,
        "--input",
        &wide_empty,
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &["output 'output' of shape (4611686018427387904, 3) needs 55340232221128654848 bytes"],
    );
    let run = limited(&[
        "run",
        &dense,
        "--input",
        &empty_wide,
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &["parameter 'weight' of shape (4611686018427387904, 3) needs 55340232221128654848 bytes"],
    );
    // A shape no array can have, even empty: its other axes pass isize::MAX.
    let unaddressable = write("d.npy", "(18446744073709551615, 0)");
    let run = limited(&[
        "run",
        &centered,
        "--input",
        &unaddressable,
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(&run, &["d.npy", "too large"]);
    // linear's bias bound is 1/sqrt(in_features): infinite for 0 features,
    // which the plugin writes as null. Named as what it is.
    let linear = model_file(
        &dir,
        r#"[{"type": "linear", "config": {"out_features": 3}}]"#,
    );
    let run = limited(&[
        "run",
        &linear,
        "--input",
        &two_empty,
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &[
            "layer '0' (plugin 'linear'): parameter 'bias' of shape (3,) declares a default \
             initializer holding a number that is not finite",
        ],
    );
    // mydense on (2, 0): whatever the plugin answers, the host stays orderly.
    let run = limited(&[
        "run",
        &dense,
        "--input",
        &two_empty,
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    if run.code != Some(0) {
        assert_refused(&run, &["layer '0' (plugin 'mydense')"]);
    }
}

// ---- .npz archives ----

/// An `.npz` of one member `x.npy` holding `npy`, deflated, its declared
/// uncompressed size then overwritten with `declared` (in the local header
/// and the central directory alike).
fn npz_declaring(npy: &[u8], declared: u32) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zip.start_file("x.npy", options).unwrap();
    zip.write_all(npy).unwrap();
    let mut bytes = zip.finish().unwrap().into_inner();
    let local = 0;
    assert_eq!(&bytes[local..local + 4], b"PK\x03\x04");
    bytes[local + 22..local + 26].copy_from_slice(&declared.to_le_bytes());
    let central = bytes
        .windows(4)
        .position(|w| w == b"PK\x01\x02")
        .expect("a central directory entry");
    bytes[central + 24..central + 28].copy_from_slice(&declared.to_le_bytes());
    bytes
}

#[test]
fn an_npz_member_declaring_more_than_the_budget_is_refused_before_inflating() {
    let dir = tempfile::tempdir().unwrap();
    // 3 GiB declared: the size np.savez_compressed writes for 3 GiB of
    // zeros, which a 3 MB file holds.
    let npy = npy_bytes("<f4", "(805306368,)", &[0; 4096]);
    let path = dir.path().join("bomb.npz");
    std::fs::write(&path, npz_declaring(&npy, 3 << 30)).unwrap();
    let model = model_file(&dir, r#"[{"type": "centered"}]"#);
    let plugins = plugin_dir_str();
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&path),
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &[
            "bomb.npz: array 'x' (member 'x.npy'): its uncompressed size of 3221225472 bytes \
             is too large",
            "more than the memory budget of",
        ],
    );
    // As a parameter file, too.
    let run = limited(&[
        "run",
        &model,
        "--input",
        &input_file(&dir, &[2, 3]),
        "--params",
        path_str(&path),
        "--max-memory",
        "1G",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &[
            "parameter 'x' (member 'x.npy'): its uncompressed size of 3221225472 bytes is too \
             large",
            "more than the memory budget of 1073741824 bytes (--max-memory)",
        ],
    );
}

#[test]
fn an_npz_member_inflating_past_its_declared_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A valid (4,) array, then 1 MiB more that the declared size leaves out.
    let mut npy = npy_bytes("<f4", "(4,)", &[0; 16]);
    let declared = npy.len() as u32;
    npy.extend(std::iter::repeat_n(0u8, 1 << 20));
    let path = dir.path().join("liar.npz");
    std::fs::write(&path, npz_declaring(&npy, declared)).unwrap();
    let model = model_file(&dir, r#"[{"type": "centered"}]"#);
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&path),
        PLUGIN_DIR_FLAG,
        &plugin_dir_str(),
    ]);
    assert_refused(
        &run,
        &["liar.npz: array 'x' (member 'x.npy'): the archive is corrupt"],
    );
}

#[test]
fn an_npz_naming_an_array_twice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Two members, the second renamed in place to the first's name (the
    // zip writer refuses to write a duplicate itself).
    let path = dir.path().join("dup.npz");
    let mut npz = NpzOut::create(&path);
    npz.add("x", &ArrayD::<f32>::zeros(IxDyn(&[2, 64])))
        .add("y", &ArrayD::<f32>::ones(IxDyn(&[2, 64])));
    npz.finish();
    let mut bytes = std::fs::read(&path).unwrap();
    for at in 0..bytes.len() - 5 {
        if &bytes[at..at + 5] == b"y.npy" {
            bytes[at] = b'x';
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    let plugins = plugin_dir_str();
    let model = model_file(&dir, r#"[{"type": "centered"}]"#);
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&path),
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &["dup.npz: the archive holds two arrays named 'x' (member 'x.npy' twice)"],
    );
    let dense = model_file(&dir, r#"[{"type": "mydense", "config": {"units": 64}}]"#);
    let run = limited(&[
        "run",
        &dense,
        "--input",
        &input_file(&dir, &[2, 64]),
        "--params",
        path_str(&path),
        "--allow-unused-params",
        PLUGIN_DIR_FLAG,
        &plugins,
    ]);
    assert_refused(
        &run,
        &["dup.npz: the archive holds two parameters named 'x' (member 'x.npy' twice)"],
    );
}

// ---- Files that never end or block ----

#[test]
fn devices_and_fifos_are_refused_up_front_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let fifo = path_str(&fifo).to_string();
    let model = model_file(&dir, r#"[{"type": "centered"}]"#);
    let x = input_file(&dir, &[2, 3]);
    let plugins = plugin_dir_str();
    let cases: [(Vec<&str>, &str); 8] = [
        (
            vec!["run", &model, "--input", &x, "--params", "/dev/zero"],
            "cannot read /dev/zero: not a regular file (a character device)",
        ),
        (
            vec!["run", &model, "--input", &x, "--params", &fifo],
            "pipe: not a regular file (a FIFO",
        ),
        (
            vec!["run", "/dev/zero", "--input", &x],
            "cannot read /dev/zero: not a regular file (a character device)",
        ),
        (
            vec!["run", &fifo, "--input", &x],
            "pipe: not a regular file (a FIFO",
        ),
        (vec!["inspect", &fifo], "pipe: not a regular file (a FIFO"),
        (
            vec!["run", &model, "--input", &fifo],
            "pipe: cannot read the file: not a regular file (a FIFO",
        ),
        (
            vec!["run", &model, "--input", "/dev/zero"],
            "/dev/zero: cannot read the file: not a regular file (a character device)",
        ),
        (
            vec!["params", &model, "--params", "/dev/urandom"],
            "cannot read /dev/urandom: not a regular file (a character device)",
        ),
    ];
    for (mut args, expected) in cases {
        args.extend([PLUGIN_DIR_FLAG, &plugins]);
        assert_refused(&limited(&args), &[expected]);
    }
}

// ---- Printing ----

#[test]
fn an_array_of_rank_20000_prints_in_bounded_memory_without_deep_recursion() {
    let dir = tempfile::tempdir().unwrap();
    // 60 KB of header, one element.
    let shape = format!("({})", "1, ".repeat(20000));
    let path = dir.path().join("deep.npy");
    std::fs::write(&path, npy_bytes("<f4", &shape, &1.5f32.to_le_bytes())).unwrap();
    let model = model_file(&dir, r#"[{"type": "faulty"}]"#);
    let run = host_with(
        &[
            "run",
            &model,
            "--input",
            path_str(&path),
            PLUGIN_DIR_FLAG,
            &plugin_dir_str(),
        ],
        &[],
        Some(1 << 30),
    );
    let text = run.ok();
    assert_eq!(
        text,
        format!("{}1.5{}\n", "[".repeat(20000), "]".repeat(20000))
    );
}

#[test]
fn a_large_array_prints_summarized_as_numpy_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.npy");
    let values: Vec<f32> = (0..3000 * 3000).map(|v| (v % 7) as f32).collect();
    write_npy_f32(
        &path,
        &ArrayD::from_shape_vec(IxDyn(&[3000, 3000]), values).unwrap(),
    );
    let model = model_file(&dir, r#"[{"type": "faulty"}]"#);
    let run = limited(&[
        "run",
        &model,
        "--input",
        path_str(&path),
        PLUGIN_DIR_FLAG,
        &plugin_dir_str(),
    ]);
    // What numpy prints for the same array.
    assert_eq!(
        run.ok(),
        "[[0. 1. 2. ... 1. 2. 3.]\n [4. 5. 6. ... 5. 6. 0.]\n [1. 2. 3. ... 2. 3. 4.]\n ...\n \
         [4. 5. 6. ... 5. 6. 0.]\n [1. 2. 3. ... 2. 3. 4.]\n [5. 6. 0. ... 6. 0. 1.]]\n"
    );
}

// ---- Inputs changed during a run, layers changing their minds ----

#[test]
fn an_input_truncated_while_it_is_streamed_is_an_error_naming_it_not_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &uniform(&[1000, 1024], 3));
    let model = model_file(
        &dir,
        r#"[{"type": "faulty", "config": {"fail": "truncate_file"}}]"#,
    );
    let out = dir.path().join("y.npy");
    // One thread, chunks of 100 rows: the layer's second call (rows
    // 100..200) truncates the input to half, after its rows were read; the
    // rows from 500 on are then past the end of the file.
    let run = host_with(
        &[
            "run",
            &model,
            "--input",
            path_str(&x),
            "--output",
            path_str(&out),
            "--batch-size",
            "100",
            "--threads",
            "1",
            PLUGIN_DIR_FLAG,
            &plugin_dir_str(),
        ],
        &[("LAYER_TEST_TRUNCATE", &x)],
        Some(ADDRESS_SPACE),
    );
    assert_refused(
        &run,
        &[
            path_str(&x),
            "the file shrank while it was being read",
            "rows 400..500",
        ],
    );
}

#[test]
fn a_layer_whose_output_shape_changes_between_calls_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_file(
        &dir,
        r#"[{"type": "faulty", "config": {"fail": "changing_output_shape"}}]"#,
    );
    let x = input_file(&dir, &[8, 4]);
    let out = dir.path().join("y.npy");
    let plugins = plugin_dir_str();
    // Streamed: planned for the whole input, then for each chunk.
    for output in [vec!["--output", path_str(&out)], vec![]] {
        let mut args = vec!["run", &model, "--input", &x, "--batch-size", "4"];
        args.extend(output);
        args.extend([PLUGIN_DIR_FLAG, &plugins]);
        assert_refused(
            &limited(&args),
            &[
                "layer '0' (plugin 'faulty'): output 'output' was planned as float32 (8, 4) for \
                 the whole input",
                "but the layer now plans float32 (4, 5)",
            ],
        );
    }
}
