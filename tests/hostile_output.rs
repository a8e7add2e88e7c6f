//! Output files in hostile places, through the real binary: a device, a
//! FIFO, `/proc/self/fd/N`, a symbolic link, a read-only file, the model or
//! an input given as the output, a run interrupted by SIGINT or SIGTERM,
//! and temporary files left by a killed run. Each case checks the message,
//! the exit status, that no panic reached the user, and that what stood
//! around the output is as it was: a device still a device, a link still a
//! link, modes unchanged, no temporary file left.

mod support;

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ndarray::ArrayD;
use support::*;

/// A model of one `faulty` layer (identity; batch-independent, so a run of
/// one `.npy` is streamed) and its input `x.npy` of 6 rows.
fn identity_dir(fail: &str) -> (tempfile::TempDir, ArrayD<f32>) {
    let dir = model_with_layers(&format!(
        r#"[{{"type": "faulty", "config": {{"fail": "{fail}"}}}}]"#
    ));
    let x = uniform(&[6, 3], 7);
    write_npy_f32(&dir.path().join("x.npy"), &x);
    (dir, x)
}

/// `host run m.json --input x.npy --output OUTPUT` in `dir`.
fn run_identity(dir: &Path, output: &str) -> Run {
    host(&[
        "run",
        path_str(&dir.join("m.json")),
        "--input",
        path_str(&dir.join("x.npy")),
        "--output",
        output,
    ])
}

/// The names in `dir` that look like the writer's temporary files.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.ends_with(".tmp"))
        .collect()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    let probe = tempfile::NamedTempFile::new().unwrap();
    probe.as_file().metadata().unwrap().uid() == 0
}

fn assert_no_panic(run: &Run) {
    for text in [&run.stdout, &run.stderr] {
        assert!(
            !text.contains("panicked") && !text.contains("thread '"),
            "{text}"
        );
    }
}

fn parse_npy(bytes: &[u8]) -> ArrayD<f32> {
    <ArrayD<f32> as ndarray_npy::ReadNpyExt>::read_npy(bytes).expect("an .npy of f32")
}

#[test]
fn a_character_device_is_written_into_and_stays_a_device() {
    let (dir, _) = identity_dir("none");
    // First a device node of our own (the same device as /dev/null), so that
    // a writer that replaced nodes would replace only that one; then
    // /dev/null itself, as the report that found the bug used.
    let own = dir.path().join("null");
    let made = Command::new("mknod")
        .arg(&own)
        .args(["c", "1", "3"])
        .status()
        .is_ok_and(|s| s.success());
    let mut devices = vec![PathBuf::from("/dev/null")];
    if made {
        devices.insert(0, own);
    }
    for device in devices {
        let before = std::fs::symlink_metadata(&device).unwrap();
        assert!(before.file_type().is_char_device());
        let run = run_identity(dir.path(), path_str(&device));
        run.ok();
        assert_no_panic(&run);
        let after = std::fs::symlink_metadata(&device).unwrap();
        assert!(
            after.file_type().is_char_device(),
            "{} is no longer a device",
            device.display()
        );
        assert_eq!(after.rdev(), before.rdev());
        assert_eq!(
            after.ino(),
            before.ino(),
            "{} was replaced",
            device.display()
        );
        assert_eq!(after.permissions().mode(), before.permissions().mode());
    }
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
    assert!(temporaries(Path::new("/dev")).is_empty());
}

#[test]
fn a_fifo_is_written_into_as_np_save_would() {
    let (dir, x) = identity_dir("none");
    let fifo = dir.path().join("y.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            bytes
        })
    };
    let run = run_identity(dir.path(), path_str(&fifo));
    // Should the host have failed before opening the FIFO, the reader is
    // released (a non-blocking open for writing fails harmlessly once it
    // has gone).
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&fifo);
    let bytes = reader.join().unwrap();
    run.ok();
    assert_no_panic(&run);
    assert_same_bits_f32(&parse_npy(&bytes), &x, "read from the FIFO");
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(meta.file_type().is_fifo(), "the FIFO was replaced");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn proc_self_fd_is_written_into() {
    let (dir, x) = identity_dir("none");
    build_plugins();
    // The host's stdout is a pipe: /proc/self/fd/1 names it.
    let out = Command::new(host_exe())
        .current_dir(repo_root())
        .env_remove("LAYER_PLUGIN_PATH")
        .args(["run", path_str(&dir.path().join("m.json")), "--input"])
        .arg(dir.path().join("x.npy"))
        .args(["--output", "/proc/self/fd/1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_same_bits_f32(&parse_npy(&out.stdout), &x, "written to stdout");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_symlink_is_written_through_and_stays_a_link() {
    let (dir, x) = identity_dir("none");
    let real = dir.path().join("real.npy");
    std::fs::write(&real, b"old").unwrap();
    set_mode(&real, 0o640);
    let link = dir.path().join("link.npy");
    std::os::unix::fs::symlink("real.npy", &link).unwrap();
    let run = run_identity(dir.path(), path_str(&link));
    run.ok();
    assert_no_panic(&run);
    let meta = std::fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the link was replaced");
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("real.npy"));
    assert_same_bits_f32(&read_npy_f32(&real), &x, "the link's target");
    assert_eq!(mode(&real), 0o640);

    // A dangling link: its target is created, the link kept.
    let dangling = dir.path().join("dangling.npy");
    std::os::unix::fs::symlink("made.npy", &dangling).unwrap();
    run_identity(dir.path(), path_str(&dangling)).ok();
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_same_bits_f32(&read_npy_f32(&dir.path().join("made.npy")), &x, "made");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn an_existing_output_keeps_its_mode_owner_and_group() {
    let (dir, x) = identity_dir("none");
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"old").unwrap();
    set_mode(&out, 0o604);
    let root = is_root();
    if root {
        std::os::unix::fs::chown(&out, Some(1234), Some(5678)).unwrap();
    }
    let before = std::fs::metadata(&out).unwrap();
    run_identity(dir.path(), path_str(&out)).ok();
    let after = std::fs::metadata(&out).unwrap();
    assert_ne!(after.ino(), before.ino(), "replaced by a rename");
    assert_same_bits_f32(&read_npy_f32(&out), &x, "the output");
    assert_eq!(mode(&out), 0o604);
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    if root {
        assert_eq!((after.uid(), after.gid()), (1234, 5678));
    }
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_new_output_gets_the_mode_the_umask_leaves() {
    let (dir, _) = identity_dir("none");
    build_plugins();
    for (umask, expected) in [("027", 0o640), ("0", 0o666), ("077", 0o600)] {
        let out = dir.path().join(format!("y{umask}.npy"));
        let status = Command::new("sh")
            .current_dir(repo_root())
            .env_remove("LAYER_PLUGIN_PATH")
            .args(["-c", &format!("umask {umask} && exec \"$0\" \"$@\"")])
            .arg(host_exe())
            .args(["run", path_str(&dir.path().join("m.json")), "--input"])
            .arg(dir.path().join("x.npy"))
            .arg("--output")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(mode(&out), expected, "umask {umask}: {:o}", mode(&out));
    }
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_read_only_output_is_refused_naming_its_mode() {
    let (dir, _) = identity_dir("none");
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"old").unwrap();
    set_mode(&out, 0o444);
    // Root could write it: refused all the same.
    let run = run_identity(dir.path(), path_str(&out));
    let err = run.failed();
    assert_no_panic(&run);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: cannot write {}: it is read-only (mode 0444)",
            out.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(mode(&out), 0o444);

    // `host init --out` and `host lock` refuse the same way.
    let w = dir.path().join("w.safetensors");
    std::fs::write(&w, b"old").unwrap();
    set_mode(&w, 0o400);
    let run = host(&[
        "init",
        path_str(&dir.path().join("m.json")),
        "--out",
        path_str(&w),
        "--input-shape",
        "2,3",
    ]);
    let err = run.failed();
    assert!(err.contains("it is read-only (mode 0400)"), "{err}");
    assert_eq!(std::fs::read(&w).unwrap(), b"old");

    let model = dir.path().join("m.json");
    let text = std::fs::read(&model).unwrap();
    set_mode(&model, 0o444);
    let err = host(&["lock", path_str(&model)]).failed().to_string();
    assert!(
        err.contains(&format!(
            "cannot write {}: it is read-only (mode 0444)",
            model.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(&model).unwrap(), text);
    assert_eq!(mode(&model), 0o444);
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

/// Runs `args` expecting a refusal containing `expected`, with `files`
/// unchanged.
fn assert_refused(args: &[&str], expected: &str, files: &[&Path]) {
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    let run = host(args);
    let err = run.failed();
    assert_no_panic(&run);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    for (file, before) in files.iter().zip(before) {
        assert_eq!(std::fs::read(file).unwrap(), before, "{}", file.display());
    }
}

#[test]
fn init_out_naming_the_model_file_is_refused() {
    let (dir, _) = identity_dir("none");
    let model = dir.path().join("m.json");
    let m = path_str(&model);
    assert_refused(
        &["init", m, "--out", m, "--input-shape", "2,3"],
        &format!("--out {m} is the model file; writing there would replace it"),
        &[&model],
    );
    // Through a link, both names are given.
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink("m.json", &link).unwrap();
    assert_refused(
        &["init", m, "--out", path_str(&link), "--input-shape", "2,3"],
        &format!("--out {} is the model file ({m})", link.display()),
        &[&model],
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn run_output_naming_the_model_or_the_params_file_is_refused() {
    let dir = temp_dir_with(&[(
        "m.json",
        r#"{"format": 1, "layers": [{"type": "mydense", "config": {"units": 2}}],
            "params": "w.safetensors"}"#,
    )]);
    let model = dir.path().join("m.json");
    let w = dir.path().join("w.safetensors");
    let m = path_str(&model);
    host(&["init", m, "--out", path_str(&w), "--input-shape", "4,3"]).ok();
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &uniform(&[4, 3], 1));
    let xs = path_str(&x);
    assert_refused(
        &["run", m, "--input", xs, "--output", m],
        &format!("--output {m} is the model file; writing there would replace it"),
        &[&model, &w],
    );
    // The model's own params file, and one given with --params.
    assert_refused(
        &["run", m, "--input", xs, "--output", path_str(&w)],
        &format!("--output {} is the params file;", w.display()),
        &[&model, &w],
    );
    let other = dir.path().join("other.safetensors");
    std::fs::copy(&w, &other).unwrap();
    let o = path_str(&other);
    assert_refused(
        &["run", m, "--input", xs, "--params", o, "--output", o],
        &format!("--output {o} is the params file;"),
        &[&model, &other],
    );
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn run_output_naming_an_input_is_refused_streamed_or_not() {
    // Streamed: one .npy through a batch-independent layer.
    let (dir, _) = identity_dir("none");
    let model = dir.path().join("m.json");
    let x = dir.path().join("x.npy");
    let (m, xs) = (path_str(&model), path_str(&x));
    assert_refused(
        &["run", m, "--input", xs, "--output", xs, "--batch-size", "2"],
        &format!("--output {xs} is an input; writing there would replace it"),
        &[&x],
    );
    let link = dir.path().join("y.npy");
    std::os::unix::fs::symlink("x.npy", &link).unwrap();
    assert_refused(
        &["run", m, "--input", xs, "--output", path_str(&link)],
        &format!("--output {} is an input ({xs})", link.display()),
        &[&x],
    );

    // Not streamed: an .npz holding the input.
    let npz = dir.path().join("x.npz");
    let mut archive = NpzOut::create(&npz);
    archive.add("input", &uniform(&[2, 3], 3));
    archive.finish();
    let z = path_str(&npz);
    assert_refused(
        &["run", m, "--input", z, "--output", z],
        &format!("--output {z} is the input;"),
        &[&npz],
    );
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn two_outputs_naming_one_file_are_refused_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("g.json");
    std::fs::write(
        &model,
        r#"{"format": 2, "inputs": [{"name": "x", "dtype": "float32", "shape": ["b", 3]}],
            "nodes": [{"name": "a", "type": "relu", "inputs": ["x"]},
                      {"name": "b", "type": "relu", "inputs": ["a"]}],
            "outputs": ["a", "b"]}"#,
    )
    .unwrap();
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &uniform(&[2, 3], 4));
    let (m, xs) = (path_str(&model), path_str(&x));
    let y = dir.path().join("y.npy");
    let ys = path_str(&y);
    // Not there yet, and named two ways.
    let other_name = format!("{}/../{}/y.npy", dir.path().display(), {
        dir.path().file_name().unwrap().to_str().unwrap()
    });
    let (a, b) = (format!("a={ys}"), format!("b={other_name}"));
    assert_refused(
        &[
            "run",
            m,
            "--input",
            &format!("x={xs}"),
            "--output",
            &a,
            "--output",
            &b,
        ],
        &format!("--output {ys} and --output {other_name} name the same file"),
        &[&x],
    );
    assert!(!y.exists());
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn host_lock_on_a_symlinked_model_pins_the_real_file_and_keeps_its_mode() {
    let dir = temp_dir_with(&[(
        "real.json",
        r#"{"format": 1, "layers": [{"type": "faulty"}]}"#,
    )]);
    let real = dir.path().join("real.json");
    set_mode(&real, 0o640);
    let link = dir.path().join("m.json");
    std::os::unix::fs::symlink("real.json", &link).unwrap();
    let run = host(&["lock", path_str(&link)]);
    assert!(run.ok().contains("layer '0': pinned"), "{}", run.stdout);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let text = std::fs::read_to_string(&real).unwrap();
    assert!(text.contains("\"sha256\""), "{text}");
    assert_eq!(mode(&real), 0o640);
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_failed_run_leaves_no_temporary_file() {
    let (dir, _) = identity_dir("error_on_negative_input");
    let mut x = uniform(&[6, 3], 9);
    x[[5, 0]] = -1.0;
    write_npy_f32(&dir.path().join("x.npy"), &x);
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"old").unwrap();
    let run = host(&[
        "run",
        path_str(&dir.path().join("m.json")),
        "--input",
        path_str(&dir.path().join("x.npy")),
        "--output",
        path_str(&out),
        "--batch-size",
        "2",
    ]);
    assert!(run.failed().contains("negative input"), "{}", run.stderr);
    assert_no_panic(&run);
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

/// Waits (polling, bounded) until `path` exists.
fn wait_for(path: &Path, child: &mut std::process::Child) {
    let started = Instant::now();
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("the host ended ({status}) before blocking:\n{stderr}");
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never ready");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends `signal` to a streamed run blocked in its second chunk, with a
/// temporary file holding the first, and checks that the temporary file
/// is removed, the old output untouched, and the status and message.
fn check_interrupted(signal: &str, code: i32) {
    let (dir, _) = identity_dir("block_until_signalled");
    let out = dir.path().join("y.npy");
    std::fs::write(&out, b"old").unwrap();
    set_mode(&out, 0o640);
    let ready = dir.path().join("ready");
    build_plugins();
    let mut child = Command::new(host_exe())
        .current_dir(repo_root())
        .env_remove("LAYER_PLUGIN_PATH")
        .env("LAYER_TEST_READY", &ready)
        // Never created: only the signal ends the run.
        .env("LAYER_TEST_RELEASE", dir.path().join("release"))
        .args(["run", path_str(&dir.path().join("m.json")), "--input"])
        .arg(dir.path().join("x.npy"))
        .arg("--output")
        .arg(&out)
        .args(["--batch-size", "2", "--threads", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ready, &mut child);
    // Inside the second chunk's forward: the temporary file, named with
    // the host's process id, exists beside the output.
    let temps = temporaries(dir.path());
    let prefix = format!(".y.npy.{}.", child.id());
    assert!(
        temps.len() == 1 && temps[0].starts_with(&prefix),
        "{temps:?}"
    );
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: interrupted by SIG{signal}; nothing was written to {}",
            out.display()
        )),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"old");
    assert_eq!(mode(&out), 0o640);
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}

#[test]
fn sigint_removes_the_temporary_file_and_exits_130() {
    check_interrupted("INT", 130);
}

#[test]
fn sigterm_removes_the_temporary_file_and_exits_143() {
    check_interrupted("TERM", 143);
}

#[test]
fn temporaries_of_dead_processes_are_removed_those_of_live_ones_kept() {
    let (dir, x) = identity_dir("none");
    // No process has an id above pid_max.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let dead = format!(".y.npy.{}.aB3dE9.tmp", pid_max + 1);
    // This test's own process: running, as a concurrent run would be.
    let live = format!(".y.npy.{}.Zz0Yy1.tmp", std::process::id());
    // Not the writer's pattern: never touched.
    let unrelated = ".notes.tmp".to_string();
    for name in [&dead, &live, &unrelated] {
        std::fs::write(dir.path().join(name), b"partial").unwrap();
    }
    let out = dir.path().join("y.npy");
    run_identity(dir.path(), path_str(&out)).ok();
    assert_same_bits_f32(&read_npy_f32(&out), &x, "the output");
    let mut left = temporaries(dir.path());
    left.sort();
    let mut expected = vec![live, unrelated];
    expected.sort();
    assert_eq!(left, expected);
}

#[test]
fn npz_and_multiple_outputs_share_the_writer() {
    // An .npz output through a link, into an existing file of mode 0600.
    let (dir, x) = identity_dir("none");
    let real = dir.path().join("real.npz");
    std::fs::write(&real, b"old").unwrap();
    set_mode(&real, 0o600);
    let link = dir.path().join("y.npz");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    run_identity(dir.path(), path_str(&link)).ok();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let y: ArrayD<f32> = read_npz(&real, "0");
    assert_same_bits_f32(&y, &x, "npz");
    assert_eq!(mode(&real), 0o600);
    assert_eq!(temporaries(dir.path()), Vec::<String>::new());
}
