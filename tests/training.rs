//! `host train` against torch: the same model, initial weights, data order,
//! loss and optimizer give the same loss at every step and the same weights
//! after steps 1, 10 and 100, within 1e-4 (SGD) or 1e-3 (Adam) of each
//! tensor's largest magnitude. The fixtures are torch's own trajectories,
//! written by tests/fixtures/make_training_fixtures.py (see its docstring
//! for what is kept of large tensors). Also: resuming from a checkpoint
//! continues bit for bit, an interrupted run leaves `--out` as it was, and
//! the shipped regression example learns.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use support::*;

fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/training").join(name)
}

/// A trajectory case: the model, its data and how torch trained it.
struct Case {
    name: &'static str,
    model: PathBuf,
    args: Vec<String>,
    tolerance: f64,
}

fn case(name: &'static str) -> Case {
    let (model, args, tolerance): (PathBuf, &[&str], f64) = match name {
        "seed-mlp" => (
            fixture("seed-mlp.json"),
            &[
                "--loss",
                "mse",
                "--optimizer",
                "sgd",
                "--lr",
                "0.01",
                "--momentum",
                "0.9",
                "--batch-size",
                "8",
                "--seed",
                "3",
                "--params",
            ],
            1e-4,
        ),
        "mlp784" => (
            fixture("mlp784.json"),
            &[
                "--loss",
                "cross_entropy",
                "--optimizer",
                "adam",
                "--lr",
                "1e-4",
                "--batch-size",
                "32",
                "--seed",
                "5",
            ],
            1e-3,
        ),
        "encoder" => (
            repo_root().join("models/encoder.json"),
            &[
                "--loss",
                "cross_entropy",
                "--optimizer",
                "adam",
                "--lr",
                "1e-3",
                "--batch-size",
                "8",
                "--seed",
                "7",
            ],
            1e-3,
        ),
        _ => unreachable!(),
    };
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if name == "seed-mlp" {
        args.push(path_str(&fixture("seed-mlp-init.safetensors")).to_string());
    }
    Case {
        name,
        model,
        args,
        tolerance,
    }
}

/// Runs `host train` for `steps` steps; returns the trained parameters and
/// the per-step losses.
fn train(case: &Case, steps: u64, dir: &Path) -> (BTreeMap<String, ArrayD<f32>>, Vec<f64>) {
    train_on(
        case,
        fixture(&format!("{}-data.npz", case.name)),
        steps,
        dir,
    )
}

/// [`train`] on the data file `data`.
fn train_on(
    case: &Case,
    data: PathBuf,
    steps: u64,
    dir: &Path,
) -> (BTreeMap<String, ArrayD<f32>>, Vec<f64>) {
    let out = dir.join(format!("{}-{steps}.safetensors", case.name));
    let log = dir.join(format!("{}-{steps}.csv", case.name));
    let mut args = vec![
        "train".to_string(),
        path_str(&case.model).to_string(),
        "--data".to_string(),
        path_str(&data).to_string(),
        "--epochs".to_string(),
        "1000".to_string(),
        "--max-steps".to_string(),
        steps.to_string(),
        "--out".to_string(),
        path_str(&out).to_string(),
        "--log".to_string(),
        path_str(&log).to_string(),
        "--quiet".to_string(),
        "--plugin-dir".to_string(),
        path_str(&plugin_dir()).to_string(),
    ];
    args.extend(case.args.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    host(&args).ok();
    let losses = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse::<f64>().unwrap())
        .collect();
    (read_safetensors(&out), losses)
}

fn read_safetensors(path: &Path) -> BTreeMap<String, ArrayD<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let array = ArrayD::from_shape_vec(view.shape().to_vec(), values).unwrap();
            (name, array)
        })
        .collect()
}

/// Compares the host's weights after `step` with what the fixture kept of
/// torch's (whole tensors, or every k-th element and the row and column
/// sums; see the fixture script).
fn compare_weights(case: &Case, step: u64, weights: &BTreeMap<String, ArrayD<f32>>) {
    let expected = fixture(&format!("{}-expected.npz", case.name));
    let names: Vec<String> = npz_members(&expected).into_iter().map(|(n, _)| n).collect();
    let prefix = format!("step{step}:");
    let mut checked = 0;
    for (name, w) in weights {
        let key = |what: &str| format!("{prefix}{name}:{what}");
        assert!(
            names.contains(&key("absmax")),
            "torch's state_dict has no '{name}' (the host saved it)"
        );
        let absmax = read_npz::<f64>(&expected, &key("absmax"))
            .iter()
            .next()
            .copied()
            .unwrap();
        let bound = case.tolerance * absmax.max(f64::MIN_POSITIVE);
        let check = |what: &str, host: &[f64], torch: &ArrayD<f64>, scale: f64| {
            assert_eq!(host.len(), torch.len(), "{name} {what}: sizes differ");
            let (worst, at) = host
                .iter()
                .zip(torch.iter())
                .enumerate()
                .map(|(i, (h, t))| ((h - t).abs(), i))
                .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
            assert!(
                worst <= bound * scale,
                "{}: step {step}, '{name}' {what} element {at}: host {} vs torch {}, \
                 difference {worst:e} > {:e}",
                case.name,
                host[at],
                torch.iter().nth(at).unwrap(),
                bound * scale
            );
        };
        let flat: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        if name.ends_with("self_attn.in_proj_bias") {
            // The key bias (the middle third) has a gradient of exactly
            // zero (softmax ignores a shift shared by a query's scores):
            // the host keeps it where it started, while torch sums rounding
            // noise that Adam scales up to steps of size lr. Compare the
            // query and value thirds with torch, the key third with the
            // initial value.
            let whole = read_npz::<f64>(&expected, &key("whole"));
            let third = flat.len() / 3;
            let mut outer = flat.clone();
            let mut torch_outer: Vec<f64> = whole.iter().copied().collect();
            let initial = read_safetensors(&repo_root().join("models/encoder.safetensors"))
                [name.as_str()]
            .clone();
            for i in third..2 * third {
                assert_eq!(
                    flat[i],
                    initial[[i]] as f64,
                    "{name} element {i}: the key bias moved"
                );
                outer[i] = 0.0;
                torch_outer[i] = 0.0;
            }
            check(
                "",
                &outer,
                &ArrayD::from_shape_vec(vec![flat.len()], torch_outer).unwrap(),
                1.0,
            );
        } else if names.contains(&key("whole")) {
            check("", &flat, &read_npz::<f64>(&expected, &key("whole")), 1.0);
        } else {
            let every = read_npz::<f64>(&expected, &key("every"));
            let k = flat.len().div_ceil(4096);
            let sampled: Vec<f64> = flat.iter().step_by(k).copied().collect();
            check("every-k", &sampled, &every, 1.0);
            let rows = w.shape()[0];
            let cols = *w.shape().last().unwrap();
            let per_row = flat.len() / rows;
            let rowsum: Vec<f64> = flat.chunks(per_row).map(|r| r.iter().sum()).collect();
            // Each element within the bound implies a sum within n times it.
            check(
                "row sums",
                &rowsum,
                &read_npz::<f64>(&expected, &key("rowsum")),
                per_row as f64,
            );
            let mut colsum = vec![0.0; cols];
            for (i, v) in flat.iter().enumerate() {
                colsum[i % cols] += v;
            }
            check(
                "column sums",
                &colsum,
                &read_npz::<f64>(&expected, &key("colsum")),
                (flat.len() / cols) as f64,
            );
        }
        checked += 1;
    }
    let in_fixture = names
        .iter()
        .filter(|n| n.starts_with(&prefix) && n.ends_with(":absmax"))
        .count();
    assert_eq!(
        checked, in_fixture,
        "the host saved other tensors than torch"
    );
}

fn trajectory(name: &'static str) {
    let case = case(name);
    let dir = tempfile::tempdir().unwrap();
    let (w100, losses) = train(&case, 100, dir.path());
    let expected = read_npz::<f64>(&fixture(&format!("{name}-expected.npz")), "loss");
    assert_eq!(losses.len(), 100);
    for (step, (h, t)) in losses.iter().zip(expected.iter()).enumerate() {
        assert!(
            (h - t).abs() <= case.tolerance * t.abs(),
            "{name}: the loss of step {} is {h} in the host, {t} in torch",
            step + 1
        );
    }
    compare_weights(&case, 100, &w100);
    for steps in [1, 10] {
        let (w, _) = train(&case, steps, dir.path());
        compare_weights(&case, steps, &w);
    }
}

#[test]
fn the_seed_mlp_trains_as_torch_does_with_sgd_and_mse() {
    trajectory("seed-mlp");
}

#[test]
fn the_784_mlp_trains_as_torch_does_with_adam_and_cross_entropy() {
    trajectory("mlp784");
}

#[test]
fn the_encoder_trains_as_torch_does_with_adam() {
    trajectory("encoder");
}

/// `host train` on the shipped regression example, as the README runs it.
fn train_regression(dir: &Path, extra: &[&str]) -> Run {
    let out = dir.join("regression.safetensors");
    let log = dir.join("regression.csv");
    let mut args = vec![
        "train",
        "models/regression.json",
        "--data",
        "models/regression-train.npz",
        "--val",
        "models/regression-val.npz",
        "--loss",
        "mse",
        "--optimizer",
        "adam",
        "--lr",
        "3e-3",
        "--epochs",
        "20",
        "--batch-size",
        "64",
        "--seed",
        "0",
        "--out",
        path_str(&out),
        "--log",
        path_str(&log),
    ];
    args.extend_from_slice(extra);
    host(&args)
}

/// The number after `label` on the last line of `text` that has it.
fn last_number_after(text: &str, label: &str) -> f64 {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no '{label}' in:\n{text}"));
    let rest = &line[line.find(label).unwrap() + label.len()..];
    rest.trim()
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after '{label}' in: {line}"))
}

#[test]
fn the_shipped_regression_example_learns_and_ends_where_torch_does() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("loss.png");
    let run = train_regression(dir.path(), &["--plot", path_str(&plot)]);
    run.ok();
    // A PNG of 800 x 500: its signature, then the IHDR chunk's width and
    // height (big-endian, at bytes 16..24).
    let png = std::fs::read(&plot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    assert_eq!(
        (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap())
        ),
        (800, 500)
    );
    let baseline = last_number_after(&run.stderr, "scores");
    let val = last_number_after(&run.stderr, "validation loss");
    // The stated margin: at least 20 times below predicting the mean.
    assert!(
        val * 20.0 < baseline,
        "validation loss {val} vs the constant predictor's {baseline}"
    );
    let expected = fixture("regression-expected.npz");
    let torch_val = read_npz::<f64>(&expected, "val_loss")
        .iter()
        .next()
        .copied()
        .unwrap();
    assert!(
        (val - torch_val).abs() <= 1e-3 * torch_val,
        "validation loss {val} in the host, {torch_val} in torch"
    );
    let losses: Vec<f64> = std::fs::read_to_string(dir.path().join("regression.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    let torch = read_npz::<f64>(&expected, "loss");
    assert_eq!(losses.len(), torch.len());
    for (step, (h, t)) in losses.iter().zip(torch.iter()).enumerate() {
        assert!(
            (h - t).abs() <= 1e-3 * t.abs(),
            "step {}: loss {h} in the host, {t} in torch",
            step + 1
        );
    }
    // The trained parameters run as they are.
    let x = dir.path().join("x.npy");
    write_npy_f32(&x, &uniform(&[3, 8], 1));
    host(&[
        "run",
        "models/regression.json",
        "--params",
        path_str(&dir.path().join("regression.safetensors")),
        "--input",
        path_str(&x),
    ])
    .ok();
}

#[test]
fn threads_lent_to_the_layers_change_no_bit_of_training() {
    // The 784 MLP at batch 32: its products are split over the lent threads
    // by output columns, in forward and in backward.
    let dir = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for threads in ["1", "2", "3"] {
        let mut case = case("mlp784");
        case.name = match threads {
            "1" => "one",
            "2" => "two",
            _ => "three",
        };
        case.args
            .extend(["--threads".to_string(), threads.to_string()]);
        let (weights, losses) = train_on(&case, fixture("mlp784-data.npz"), 3, dir.path());
        runs.push((threads, weights, losses));
    }
    let (_, one, one_losses) = &runs[0];
    for (threads, weights, losses) in &runs[1..] {
        assert_eq!(losses, one_losses, "losses on {threads} threads against 1");
        for (name, w) in weights {
            assert_same_bits_f32(w, &one[name], &format!("{name} on {threads} threads"));
        }
    }
}

#[test]
fn resuming_from_a_checkpoint_continues_bit_for_bit() {
    // Checkpoints in the middle of an epoch (step 6 of 4-step epochs) and
    // at an epoch's end (step 8), with SGD's momentum and Adam's moments.
    for (optimizer, every) in [("sgd", 3), ("sgd", 4), ("adam", 3)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |steps: u64, out: &str, extra: &[&str]| {
            let steps = steps.to_string();
            let out = d.join(out);
            let init = fixture("seed-mlp-init.safetensors");
            let mut args = vec![
                "train",
                "tests/fixtures/training/seed-mlp.json",
                "--data",
                "tests/fixtures/training/seed-mlp-data.npz",
                "--loss",
                "mse",
                "--optimizer",
                optimizer,
                "--lr",
                "0.01",
                "--batch-size",
                "8",
                "--epochs",
                "5",
                "--seed",
                "3",
                "--params",
                path_str(&init),
                "--max-steps",
                &steps,
                "--out",
                path_str(&out),
                "--quiet",
            ];
            if optimizer == "sgd" {
                args.extend_from_slice(&["--momentum", "0.9"]);
            }
            args.extend_from_slice(extra);
            host(&args).ok();
            std::fs::read(out).unwrap()
        };
        let straight = run(10, "straight.safetensors", &[]);
        let every_text = every.to_string();
        let ckpt = d.join("ck.safetensors");
        run(
            2 * every,
            "first.safetensors",
            &[
                "--checkpoint-every",
                &every_text,
                "--checkpoint",
                path_str(&ckpt),
            ],
        );
        let resumed = run(10, "resumed.safetensors", &["--resume", path_str(&ckpt)]);
        assert!(
            straight == resumed,
            "{optimizer}, checkpoint every {every}: the resumed run's parameters differ"
        );
        assert_ne!(straight, run(2 * every, "part.safetensors", &[]));
    }
}

#[test]
fn an_interrupted_run_leaves_the_previous_out_intact() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trained.safetensors");
    std::fs::write(&out, b"the previous parameters").unwrap();
    let mut child = std::process::Command::new(host_exe())
        .current_dir(repo_root())
        .args([
            "train",
            "tests/fixtures/training/mlp784.json",
            "--data",
            "tests/fixtures/training/mlp784-data.npz",
            "--loss",
            "cross_entropy",
            "--optimizer",
            "adam",
            "--lr",
            "1e-4",
            "--epochs",
            "1000",
            "--quiet",
            "--plugin-dir",
            path_str(&plugin_dir()),
            "--out",
            path_str(&out),
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    // Ended by the signal itself, or by the host's handler for it (which
    // exits 130 when it removed a temporary file): not by an error.
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.signal() == Some(2) || status.code() == Some(130),
        "the run did not end by SIGINT: {status:?}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous parameters");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "files left beside --out: {left:?}");
}

#[test]
fn a_diverging_run_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w.safetensors");
    std::fs::write(&out, b"keep").unwrap();
    let init = fixture("seed-mlp-init.safetensors");
    let err = host(&[
        "train",
        "tests/fixtures/training/seed-mlp.json",
        "--data",
        "tests/fixtures/training/seed-mlp-data.npz",
        "--loss",
        "mse",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--params",
        path_str(&init),
        "--epochs",
        "3",
        "--quiet",
        "--out",
        path_str(&out),
    ])
    .failed()
    .to_string();
    assert!(
        err.contains("lower --lr") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

#[test]
fn parameters_behind_a_forward_only_layer_are_frozen_and_named() {
    // linear -> fourier (forward-only) -> linear: only the last trains.
    let dir = temp_dir_with(&[(
        "m.json",
        r#"{"format": 1, "layers": [
            {"type": "linear", "config": {"in_features": 8, "out_features": 8}},
            {"type": "fourier"},
            {"type": "linear", "config": {"in_features": 2, "out_features": 1}}]}"#,
    )]);
    let data = dir.path().join("d.npz");
    let x = uniform(&[16, 8], 2);
    // fourier keeps 4 of 8 coefficients, each as (real, imaginary).
    let y = uniform(&[16, 4, 1], 3);
    let mut npz = NpzOut::create(&data);
    npz.add("input", &x).add("target", &y);
    npz.finish();
    let out = dir.path().join("w.safetensors");
    let run = host(&[
        "train",
        path_str(&dir.path().join("m.json")),
        "--data",
        path_str(&data),
        "--loss",
        "mse",
        "--optimizer",
        "sgd",
        "--lr",
        "0.01",
        "--out",
        path_str(&out),
    ]);
    run.ok();
    assert!(
        run.stderr.contains(
            "parameter '0.weight' is frozen: its gradient would pass through layer '1' \
             (plugin 'fourier'), which is forward-only"
        ),
        "{}",
        run.stderr
    );
    let before = {
        let init = dir.path().join("init.safetensors");
        host(&[
            "init",
            path_str(&dir.path().join("m.json")),
            "--input-shape",
            "1,8",
            "--out",
            path_str(&init),
        ])
        .ok();
        read_safetensors(&init)
    };
    let after = read_safetensors(&out);
    assert_eq!(
        before["0.weight"], after["0.weight"],
        "a frozen parameter moved"
    );
    assert_ne!(
        before["2.weight"], after["2.weight"],
        "the last layer did not train"
    );
}

#[test]
fn a_data_file_without_target_names_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.npz");
    let mut npz = NpzOut::create(&data);
    npz.add("input", &uniform(&[4, 64], 1));
    npz.finish();
    let err = host(&[
        "train",
        "tests/fixtures/training/seed-mlp.json",
        "--data",
        path_str(&data),
        "--loss",
        "mse",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--out",
        path_str(&dir.path().join("w.safetensors")),
    ])
    .failed()
    .to_string();
    assert!(
        err.contains("has no array 'target' (it holds: input)"),
        "{err}"
    );
}

/// `host train` on the seed MLP and its data with `extra` arguments,
/// writing into `dir`.
fn train_seed_mlp(dir: &Path, extra: &[&str]) -> Run {
    train_seed_mlp_on(&fixture("seed-mlp-data.npz"), dir, extra)
}

/// [`train_seed_mlp`] on the data file `data`.
fn train_seed_mlp_on(data: &Path, dir: &Path, extra: &[&str]) -> Run {
    let init = fixture("seed-mlp-init.safetensors");
    let out = dir.join("w.safetensors");
    let mut args = vec![
        "train",
        "tests/fixtures/training/seed-mlp.json",
        "--data",
        path_str(data),
        "--loss",
        "mse",
        "--optimizer",
        "adam",
        "--lr",
        "0.01",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--params",
        path_str(&init),
        "--out",
        path_str(&out),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    host(&args)
}

#[test]
fn a_checkpoint_that_lacks_a_tensor_or_disagrees_with_the_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ck.safetensors");
    train_seed_mlp(
        dir.path(),
        &[
            "--checkpoint-every",
            "3",
            "--checkpoint",
            path_str(&ckpt),
            "--max-steps",
            "3",
        ],
    )
    .ok();
    let bytes = std::fs::read(&ckpt).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Rewritten without one tensor, or with its step moved: both refused,
    // naming what is wrong.
    let rewrite = |name: &str, drop: &str, step: Option<&str>| {
        let path = dir.path().join(name);
        let mut meta = metadata.clone().unwrap();
        if let Some(step) = step {
            meta.insert("step".into(), step.into());
        }
        let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != drop)
            .collect();
        safetensors::serialize_to_file(kept, Some(meta), &path).unwrap();
        path
    };
    for (path, expected) in [
        (
            rewrite("no-bias.safetensors", "1.bias", None),
            "lacks parameter '1.bias'",
        ),
        (
            rewrite(
                "no-moment.safetensors",
                "optimizer.exp_avg_sq.0.weight",
                None,
            ),
            "lacks optimizer buffer 'optimizer.exp_avg_sq.0.weight'",
        ),
        (
            rewrite("far.safetensors", "", Some("1000")),
            "says step 1000 at example 24 of epoch 1",
        ),
    ] {
        let err = train_seed_mlp(dir.path(), &["--resume", path_str(&path)])
            .failed()
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
    // Other data of the same size: not the same run.
    let data = dir.path().join("other.npz");
    let mut x = read_npz::<f32>(&fixture("seed-mlp-data.npz"), "input");
    x[[0, 0]] += 1.0;
    let mut npz = NpzOut::create(&data);
    npz.add("input", &x).add(
        "target",
        &read_npz::<f32>(&fixture("seed-mlp-data.npz"), "target"),
    );
    npz.finish();
    let err = train_seed_mlp_on(&data, dir.path(), &["--resume", path_str(&ckpt)])
        .failed()
        .to_string();
    assert!(err.contains("data_sha256 was "), "{err}");
}

#[test]
fn targets_are_checked_before_the_first_step_naming_the_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.npz");
    let mut target = ndarray::ArrayD::<i64>::zeros(ndarray::IxDyn(&[32]));
    target[[29]] = 10;
    let mut npz = NpzOut::create(&data);
    npz.add(
        "tokens",
        &read_npz::<i64>(&fixture("encoder-data.npz"), "tokens"),
    )
    .add("target", &target);
    npz.finish();
    let err = host(&[
        "train",
        "models/encoder.json",
        "--data",
        path_str(&data),
        "--loss",
        "cross_entropy",
        "--optimizer",
        "adam",
        "--lr",
        "1e-3",
        "--out",
        path_str(&dir.path().join("w.safetensors")),
    ])
    .failed()
    .to_string();
    assert!(
        err.contains("d.npz: 'target': row 29 holds class 10, outside [0, 10)"),
        "{err}"
    );
}

#[test]
fn two_outputs_naming_one_new_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let same = dir.path().join("same.safetensors");
    let err = train_seed_mlp(
        dir.path(),
        &["--log", path_str(&same), "--plot", path_str(&same)],
    )
    .failed()
    .to_string();
    assert!(err.contains("--log and --plot both name"), "{err}");
    assert!(!same.exists());
}
