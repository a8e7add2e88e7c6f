//! `host train`: minibatch training of a model's parameters through the
//! layers' `backward`, with the host's loss and optimizer; the trained
//! parameters are written to a safetensors file that `host run --params`
//! and torch's `load_state_dict` read unchanged.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use crate::atomic_file::{check_writable, refuse_overwriting, write_atomically};
use crate::error::Error;
use crate::model::ModelSpec;
use crate::params::ParamStore;
use crate::registry::PluginRegistry;
use crate::runtime::{LayerPlan, Model, TensorSpec};
use crate::train::data::{epoch_order, Dataset, SplitMix64};
use crate::train::optim::{Optimizer, State};
use crate::train::{Loss, Trainer};

/// What `host train` was asked to do.
pub struct TrainOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub loss: Loss,
    pub optimizer: Optimizer,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Stop after this many steps (within the epochs).
    pub max_steps: Option<u64>,
    /// Start from these parameters instead of the model's initializers.
    pub params: Option<PathBuf>,
    pub out: PathBuf,
    pub order_out: Option<PathBuf>,
    /// One line per step: `step,epoch,loss`.
    pub log: Option<PathBuf>,
    /// A PNG of the training and validation loss curves.
    pub plot: Option<PathBuf>,
    pub checkpoint_every: Option<u64>,
    pub checkpoint: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// Threads lent to the layers' calls (interface 1.3's `lend_pool`).
    pub threads: usize,
    pub quiet: bool,
    pub plugin_dirs: Vec<PathBuf>,
}

/// Where a checkpoint goes unless `--checkpoint` says: beside `--out`.
pub fn default_checkpoint(out: &Path) -> PathBuf {
    let name = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "trained".into());
    out.with_file_name(format!("{name}.checkpoint.safetensors"))
}

/// What training did, for the caller and the tests.
pub struct Trained {
    pub steps: u64,
    /// The mean training loss of each epoch (of the steps run in it).
    pub epoch_losses: Vec<f64>,
    pub val_losses: Vec<f64>,
}

pub fn train(opts: TrainOptions) -> Result<Trained, Error> {
    let usage = |m: String| Error::Usage(m);
    if opts.batch_size == 0 {
        return Err(usage("--batch-size must be at least 1".into()));
    }
    if opts.epochs == 0 || opts.max_steps == Some(0) {
        return Err(usage(
            "--epochs and --max-steps must be at least 1: a run of no steps trains nothing".into(),
        ));
    }
    if opts.checkpoint.is_some() && opts.checkpoint_every.is_none() {
        return Err(usage(
            "--checkpoint names where checkpoints go; add --checkpoint-every N to write them"
                .into(),
        ));
    }
    if opts.checkpoint_every == Some(0) {
        return Err(usage(
            "--checkpoint-every must be at least 1 (steps between checkpoints)".into(),
        ));
    }
    let checkpoint_path = opts
        .checkpoint
        .clone()
        .unwrap_or_else(|| default_checkpoint(&opts.out));
    // Before anything runs: no output may replace an input, nor another
    // output, and each must be writable.
    let mut inputs: Vec<(&Path, &str)> = vec![
        (&opts.model, "the model file"),
        (&opts.data, "the training data"),
    ];
    if let Some(v) = &opts.val {
        inputs.push((v, "the validation data"));
    }
    if let Some(p) = &opts.params {
        inputs.push((p, "the initial parameters (--params)"));
    }
    if let Some(r) = &opts.resume {
        inputs.push((r, "the checkpoint to resume (--resume)"));
    }
    let mut outputs: Vec<(&str, &Path)> = vec![("--out", &opts.out)];
    if let Some(o) = &opts.order_out {
        outputs.push(("--order-out", o));
    }
    if let Some(l) = &opts.log {
        outputs.push(("--log", l));
    }
    if let Some(p) = &opts.plot {
        outputs.push(("--plot", p));
    }
    if opts.checkpoint_every.is_some() {
        outputs.push(("--checkpoint", &checkpoint_path));
    }
    for (i, (flag, path)) in outputs.iter().enumerate() {
        let mut others = inputs.clone();
        let names: Vec<String> = outputs[..i]
            .iter()
            .map(|(f, _)| format!("the {f} file"))
            .collect();
        for ((_, p), name) in outputs[..i].iter().zip(&names) {
            others.push((p, name.as_str()));
        }
        // The checkpoint being resumed is rewritten by later checkpoints.
        if *flag == "--checkpoint" {
            others.retain(|(_, n)| !n.contains("--resume"));
        }
        refuse_overwriting(flag, path, &others)?;
        check_writable(path)?;
        if let Some((earlier, _)) = outputs[..i]
            .iter()
            .find(|(_, p)| crate::atomic_file::names_same_file(p, path))
        {
            return Err(usage(format!(
                "{earlier} and {flag} both name {}; give each output a file of its own",
                path.display()
            )));
        }
    }

    let registry = PluginRegistry::new(&opts.plugin_dirs);
    let spec = ModelSpec::load(&opts.model)?;
    let model_sha256 =
        crate::train::data::hex_sha256(&std::fs::read(&opts.model).map_err(|source| {
            Error::Read {
                path: opts.model.clone(),
                source,
            }
        })?);
    let model = Model::load(spec, &registry)?;
    let data = Dataset::read(&opts.data, &model)?;
    let val = opts
        .val
        .as_ref()
        .map(|p| Dataset::read(p, &model))
        .transpose()?;
    // Plans depend on the batch size; one per size seen (the last batch
    // of an epoch may be smaller).
    // Keyed by the inputs' types and shapes: a validation file may differ
    // from the training file in more than its number of rows.
    let mut plans_by_rows: PlanCache = HashMap::new();
    let plans_for = |rows: usize,
                     set: &Dataset,
                     cache: &mut PlanCache|
     -> Result<(Vec<TensorSpec>, Vec<LayerPlan>), Error> {
        let specs = batch_specs(set, rows);
        let key: Vec<(u32, Vec<usize>)> =
            specs.iter().map(|s| (s.dtype.0, s.shape.clone())).collect();
        if let Some(p) = cache.get(&key) {
            return Ok((specs, p.clone()));
        }
        let plans = model.plan_inputs(&specs)?;
        cache.insert(key, plans.clone());
        Ok((specs, plans))
    };
    let first_rows = opts.batch_size.min(data.examples);
    let (_, plans) = plans_for(first_rows, &data, &mut plans_by_rows)?;
    let trainer = Trainer::new(&model, &plans, opts.threads)?;
    // Every target checked against the loss and the output before any step:
    // a bad row found at the last step would throw the run away.
    let output = model.graph.outputs[0].1;
    let mut example_shape = |set: &Dataset| -> Result<Vec<usize>, Error> {
        let (specs, plans) = plans_for(opts.batch_size.min(set.examples), set, &mut plans_by_rows)?;
        Ok(model.source_spec(&plans, &specs, output).shape[1..].to_vec())
    };
    let shape = example_shape(&data)?;
    data.check_target(opts.loss, &shape)?;
    if let Some(v) = &val {
        v.check_target(opts.loss, &example_shape(v)?)?;
    }
    let infos = Model::param_infos(&plans);
    let mut params = match &opts.params {
        Some(path) => ParamStore::load(path, &infos, false)?,
        None => match &model.spec.params {
            Some(path) => ParamStore::load(path, &infos, false)?,
            None => ParamStore::initialize(&infos, opts.seed),
        },
    };
    if trainer.trainable.is_empty() {
        return Err(Error::Model {
            path: model.spec.path.clone(),
            message: format!(
                "nothing to train: no parameter gets a gradient ({})",
                if trainer.frozen.is_empty() {
                    "the model has no parameters".to_string()
                } else {
                    frozen_text(&trainer)
                }
            ),
        });
    }
    if !opts.quiet {
        for f in &trainer.frozen {
            let what = if f.partial {
                "gets part of its gradient"
            } else {
                "is frozen"
            };
            eprintln!("note: parameter '{}' {what}: {}", f.name, f.why);
        }
    }

    let mut state = State::default();
    let mut rng = SplitMix64(opts.seed);
    let mut start_epoch = 0usize;
    let mut start_position = 0usize;
    if let Some(path) = &opts.resume {
        let ck = Checkpoint::read(path, &opts.optimizer)?;
        ck.check_settings(path, &settings_text(&opts, &data, &model_sha256))?;
        ck.check_against(path, &params, &opts, data.examples)?;
        for (name, value) in ck.params {
            *params.get_mut(&name).expect("checked") = value;
        }
        state = ck.state;
        rng = ck.epoch_rng;
        start_epoch = ck.epoch;
        start_position = ck.position;
    }

    let mut log = opts.log.as_ref().map(|_| String::from("step,epoch,loss\n"));
    let mut orders: Vec<Vec<usize>> = Vec::new();
    // The curves of --plot: x in epochs (a step's at the fraction of its
    // epoch done), y the loss.
    let mut step_points: Vec<(f64, f64)> = Vec::new();
    let mut val_points: Vec<(f64, f64)> = Vec::new();
    // On a terminal, a bar over every step the run will take, with the
    // epoch and the epoch's running loss; elsewhere, one line per epoch.
    let steps_per_epoch = data.examples.div_ceil(opts.batch_size) as u64;
    let total_steps = (opts.epochs as u64)
        .saturating_mul(steps_per_epoch)
        .min(opts.max_steps.unwrap_or(u64::MAX));
    let bar = if !opts.quiet && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total_steps);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} step {pos}/{len}, {msg}, {eta} left")
                .expect("the template is valid"),
        );
        bar.set_position(state.step);
        Some(bar)
    } else {
        None
    };
    let mut trained = Trained {
        steps: state.step,
        epoch_losses: Vec::new(),
        val_losses: Vec::new(),
    };
    if let (false, Some(v)) = (opts.quiet, &val) {
        if let Some(baseline) = constant_baseline(opts.loss, &data, v, &shape) {
            eprintln!(
            "validation {}: a constant predictor (the training targets' {}) scores {baseline:.6}",
            opts.loss.name(),
            match opts.loss {
                Loss::Mse => "mean",
                Loss::CrossEntropy => "class frequencies",
            }
        );
        }
    }
    'epochs: for epoch in start_epoch..opts.epochs {
        let epoch_rng = rng;
        let order = epoch_order(data.examples, &mut rng, opts.shuffle);
        let position = if epoch == start_epoch {
            start_position
        } else {
            0
        };
        let mut sum = 0.0;
        let mut count = 0usize;
        let mut stop = false;
        for (chunk, rows) in order.chunks(opts.batch_size).enumerate() {
            let at = chunk * opts.batch_size;
            if at < position {
                continue;
            }
            if opts.max_steps.is_some_and(|m| state.step >= m) {
                stop = true;
                break;
            }
            let (_, plans) = plans_for(rows.len(), &data, &mut plans_by_rows)?;
            let (inputs, target) = data.batch(rows);
            let pass = trainer.pass(&plans, &params, &inputs, &target, opts.loss)?;
            if !pass.loss.is_finite() {
                return Err(Error::Usage(format!(
                    "the loss became {} at step {} (epoch {}); nothing was written: lower --lr",
                    pass.loss,
                    state.step + 1,
                    epoch + 1
                )));
            }
            opts.optimizer
                .step(&mut state, &mut params, &pass.grads, trainer.pool());
            trainer.recycle(pass.grads);
            sum += pass.loss;
            count += 1;
            step_points.push((
                epoch as f64 + (at + rows.len()) as f64 / data.examples as f64,
                pass.loss,
            ));
            if let Some(log) = &mut log {
                log.push_str(&format!("{},{},{:e}\n", state.step, epoch + 1, pass.loss));
            }
            if let Some(bar) = &bar {
                bar.set_position(state.step);
                bar.set_message(format!(
                    "epoch {}/{}, loss {:.6}",
                    epoch + 1,
                    opts.epochs,
                    sum / count as f64
                ));
            }
            if let Some(every) = opts.checkpoint_every {
                if state.step % every == 0 {
                    // At an epoch's end, the next starts from the
                    // generator as this epoch's order left it.
                    let done = at + rows.len();
                    let (epoch_rng, epoch, position) = if done >= data.examples {
                        (rng, epoch + 1, 0)
                    } else {
                        (epoch_rng, epoch, done)
                    };
                    let ck = Checkpoint {
                        params: params
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.clone()))
                            .collect(),
                        state: state.clone(),
                        epoch_rng,
                        epoch,
                        position,
                        settings: settings_text(&opts, &data, &model_sha256),
                    };
                    ck.write(&checkpoint_path, &opts.optimizer)?;
                }
            }
        }
        if count == 0 {
            // --max-steps was reached as this epoch began.
            break 'epochs;
        }
        orders.push(order);
        let mean = sum / count as f64;
        trained.epoch_losses.push(mean);
        let val_loss = match &val {
            Some(v) => {
                let rows: Vec<usize> = (0..v.examples).collect();
                let (_, plans) = plans_for(v.examples, v, &mut plans_by_rows)?;
                let (inputs, target) = v.batch(&rows);
                let l = trainer.evaluate(&plans, &params, &inputs, &target, opts.loss)?;
                trained.val_losses.push(l);
                val_points.push(((epoch + 1) as f64, l));
                format!(", validation loss {l:.6}")
            }
            None => String::new(),
        };
        if !opts.quiet {
            let line = format!(
                "epoch {}/{}: {} steps, training loss {mean:.6}{val_loss}{}",
                epoch + 1,
                opts.epochs,
                state.step,
                if stop {
                    " (stopped by --max-steps)"
                } else {
                    ""
                }
            );
            match &bar {
                Some(bar) => bar.println(line),
                None => eprintln!("{line}"),
            }
        }
        if stop {
            break;
        }
    }
    trained.steps = state.step;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Every layer's Drop before anything is written (as `run`).
    model.close()?;
    if let (Some(path), Some(log)) = (&opts.log, &log) {
        write_atomically(path, |w| w.write_all(log.as_bytes()))?;
    }
    if let Some(path) = &opts.plot {
        let name = if model.spec.name.is_empty() {
            "model"
        } else {
            model.spec.name.as_str()
        };
        let mut curves = vec![crate::train::plot::Curve {
            label: "training (each step)",
            points: &step_points,
        }];
        if val.is_some() {
            curves.push(crate::train::plot::Curve {
                label: "validation (each epoch)",
                points: &val_points,
            });
        }
        let png =
            crate::train::plot::render_png(&format!("{name}: {} loss", opts.loss.name()), &curves)
                .map_err(|m| Error::Usage(format!("--plot {}: {m}", path.display())))?;
        write_atomically(path, |w| w.write_all(&png))?;
    }
    if let Some(path) = &opts.order_out {
        let n = data.examples;
        let flat: Vec<i64> = orders.iter().flatten().map(|&i| i as i64).collect();
        let array = ArrayD::from_shape_vec(IxDyn(&[orders.len(), n]), flat)
            .expect("every epoch's order has n entries");
        write_atomically(path, |w| {
            crate::npy::write_tensor(w, &crate::tensor::Tensor::I64(array))
        })?;
    }
    params.save_safetensors(&opts.out)?;
    if !opts.quiet {
        eprintln!(
            "wrote the trained parameters ({} tensors) to {}",
            params.iter().count(),
            opts.out.display()
        );
    }
    Ok(trained)
}

fn frozen_text(trainer: &Trainer<'_>) -> String {
    trainer
        .frozen
        .iter()
        .map(|f| format!("'{}': {}", f.name, f.why))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The validation loss of predicting, for every example, the training
/// targets' mean (mse) or their class frequencies (cross_entropy); both
/// targets were checked against the loss and the output (`example_shape`).
fn constant_baseline(
    loss: Loss,
    train: &Dataset,
    val: &Dataset,
    example_shape: &[usize],
) -> Option<f64> {
    Some(match loss {
        Loss::Mse => {
            let t = train.target.to_f64();
            let v = val.target.to_f64();
            // A model whose output follows its input's shape may answer
            // the two files in different shapes: then no constant fits.
            if t.shape()[1..] != v.shape()[1..] {
                return None;
            }
            let mean = t.sum_axis(ndarray::Axis(0)) / train.examples as f64;
            let diff = &v - &mean;
            diff.iter().map(|d| d * d).sum::<f64>() / diff.len().max(1) as f64
        }
        Loss::CrossEntropy => {
            let classes = example_shape.first().copied().unwrap_or(0);
            let mut counts = vec![0f64; classes];
            for &c in train.target.to_f64().iter() {
                counts[c as usize] += 1.0;
            }
            let v = val.target.to_f64();
            let total: f64 = v
                .iter()
                .map(|&c| {
                    let count = counts.get(c as usize).copied().unwrap_or(0.0);
                    -(count / train.examples as f64).max(1e-12).ln()
                })
                .sum();
            total / v.len().max(1) as f64
        }
    })
}

/// The cache of plans, by the inputs' element types and shapes.
type PlanCache = HashMap<Vec<(u32, Vec<usize>)>, Vec<LayerPlan>>;

/// The specs of `set`'s inputs for a batch of `rows` examples.
fn batch_specs(set: &Dataset, rows: usize) -> Vec<TensorSpec> {
    set.inputs
        .iter()
        .map(|t| {
            let mut shape = t.shape().to_vec();
            shape[0] = rows;
            TensorSpec::new(t.dtype(), &shape)
        })
        .collect()
}

/// The settings a checkpoint must be resumed with, as text compared whole.
/// The model file's and the data's SHA-256 are part of them: resuming on
/// other data or another model would not continue the same run.
fn settings_text(opts: &TrainOptions, data: &Dataset, model_sha256: &str) -> String {
    format!(
        "loss={} optimizer={:?} epochs={} batch_size={} seed={} shuffle={} examples={} \
         model_sha256={model_sha256} data_sha256={}",
        opts.loss.name(),
        opts.optimizer,
        opts.epochs,
        opts.batch_size,
        opts.seed,
        opts.shuffle,
        data.examples,
        data.sha256
    )
}

/// A resumable point of a run: parameters, optimizer state, and where in
/// which epoch's order the next step starts.
struct Checkpoint {
    params: BTreeMap<String, ArrayD<f32>>,
    state: State,
    /// The shuffle generator as it was before this epoch's order was drawn.
    epoch_rng: SplitMix64,
    epoch: usize,
    /// Examples of this epoch's order already used.
    position: usize,
    settings: String,
}

const OPTIMIZER_PREFIX: &str = "optimizer.";

impl Checkpoint {
    fn write(&self, path: &Path, optimizer: &Optimizer) -> Result<(), Error> {
        let mut tensors: Vec<(String, &ArrayD<f32>)> =
            self.params.iter().map(|(n, v)| (n.clone(), v)).collect();
        for (name, bufs) in &self.state.buffers {
            for (kind, buf) in optimizer.buffer_names().iter().zip(bufs) {
                tensors.push((format!("{OPTIMIZER_PREFIX}{kind}.{name}"), buf));
            }
        }
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, a)| a.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let encode_error = |e: safetensors::SafeTensorError| Error::Params {
            path: path.to_path_buf(),
            message: format!("cannot encode the checkpoint: {e}"),
        };
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, a), data)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    a.shape().to_vec(),
                    data,
                )
                .map(|v| (name.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(encode_error)?;
        let metadata = HashMap::from([
            ("format".to_string(), "host-train-checkpoint-1".to_string()),
            ("step".to_string(), self.state.step.to_string()),
            ("epoch".to_string(), self.epoch.to_string()),
            ("position".to_string(), self.position.to_string()),
            ("epoch_rng".to_string(), self.epoch_rng.0.to_string()),
            ("settings".to_string(), self.settings.clone()),
        ]);
        let encoded = safetensors::serialize(views, Some(metadata)).map_err(encode_error)?;
        write_atomically(path, |w| w.write_all(&encoded))
    }

    fn read(path: &Path, optimizer: &Optimizer) -> Result<Checkpoint, Error> {
        let bad = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a checkpoint (safetensors): {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some("host-train-checkpoint-1") {
            return Err(bad(
                "is not a checkpoint written by `host train --checkpoint-every`".into(),
            ));
        }
        let number = |key: &str| -> Result<u64, Error> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("its metadata lacks a valid '{key}'")))
        };
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a checkpoint (safetensors): {e}")))?;
        let mut params = BTreeMap::new();
        let mut buffers: BTreeMap<String, Vec<(String, ArrayD<f32>)>> = BTreeMap::new();
        for (name, view) in file.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(bad(format!("tensor '{name}' is not float32")));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let array = ArrayD::from_shape_vec(IxDyn(view.shape()), values)
                .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
            match name.strip_prefix(OPTIMIZER_PREFIX) {
                Some(rest) => {
                    let (kind, param) = rest
                        .split_once('.')
                        .ok_or_else(|| bad(format!("tensor '{name}' names no parameter")))?;
                    buffers
                        .entry(param.to_string())
                        .or_default()
                        .push((kind.to_string(), array));
                }
                None => {
                    params.insert(name, array);
                }
            }
        }
        // Each parameter's buffers, in the optimizer's order, all of them.
        let kinds = optimizer.buffer_names();
        let buffers = buffers
            .into_iter()
            .map(|(param, list)| {
                let mut ordered = Vec::with_capacity(kinds.len());
                for kind in kinds {
                    let at = list.iter().position(|(k, _)| k == kind).ok_or_else(|| {
                        bad(format!(
                            "lacks optimizer buffer '{OPTIMIZER_PREFIX}{kind}.{param}' ({} keeps \
                             {})",
                            optimizer.name(),
                            kinds.join(", ")
                        ))
                    })?;
                    ordered.push(list[at].1.clone());
                }
                if let Some((k, _)) = list.iter().find(|(k, _)| !kinds.contains(&k.as_str())) {
                    return Err(bad(format!(
                        "holds optimizer buffer '{OPTIMIZER_PREFIX}{k}.{param}', which {} does not \
                         keep (it keeps: {})",
                        optimizer.name(),
                        if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") }
                    )));
                }
                Ok((param, ordered))
            })
            .collect::<Result<_, Error>>()?;
        Ok(Checkpoint {
            params,
            state: State {
                step: number("step")?,
                buffers,
            },
            epoch_rng: SplitMix64(number("epoch_rng")?),
            epoch: number("epoch")? as usize,
            position: number("position")? as usize,
            settings: meta.get("settings").cloned().unwrap_or_default(),
        })
    }

    /// Checks the checkpoint against the model's parameters and the run:
    /// every parameter there with its shape, each buffer of its
    /// parameter's shape, and a step count that agrees with the epoch and
    /// the place in it.
    fn check_against(
        &self,
        path: &Path,
        params: &ParamStore,
        opts: &TrainOptions,
        examples: usize,
    ) -> Result<(), Error> {
        let bad = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        for (name, value) in params.iter() {
            match self.params.get(name) {
                None => return Err(bad(format!("lacks parameter '{name}'"))),
                Some(v) if v.shape() != value.shape() => {
                    return Err(bad(format!(
                        "holds parameter '{name}' of shape {:?}; the model's is {:?}",
                        v.shape(),
                        value.shape()
                    )))
                }
                _ => {}
            }
        }
        if let Some(name) = self.params.keys().find(|n| params.get(n).is_none()) {
            return Err(bad(format!(
                "holds parameter '{name}', which the model does not have"
            )));
        }
        for (name, bufs) in &self.state.buffers {
            let Some(p) = params.get(name) else {
                return Err(bad(format!(
                    "holds optimizer buffers for '{name}', which the model does not have"
                )));
            };
            if let Some(b) = bufs.iter().find(|b| b.shape() != p.shape()) {
                return Err(bad(format!(
                    "holds an optimizer buffer of shape {:?} for parameter '{name}' of shape {:?}",
                    b.shape(),
                    p.shape()
                )));
            }
        }
        let tensors = self.params.iter().map(|(n, v)| (n.clone(), v)).chain(
            self.state.buffers.iter().flat_map(|(n, bufs)| {
                bufs.iter()
                    .map(move |b| (format!("an optimizer buffer of '{n}'"), b))
            }),
        );
        for (name, t) in tensors {
            if let Some(v) = t.iter().find(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "holds {v} in {name}; a checkpoint holds finite numbers"
                )));
            }
        }
        if let Optimizer::Adam { .. } = opts.optimizer {
            if let Some((name, _)) = self
                .state
                .buffers
                .iter()
                .find(|(_, b)| b.get(1).is_some_and(|sq| sq.iter().any(|&v| v < 0.0)))
            {
                return Err(bad(format!(
                    "holds a negative value in Adam's exp_avg_sq of '{name}', an average of \
                     squares"
                )));
            }
        }
        let per_epoch = examples.div_ceil(opts.batch_size) as u64;
        let consistent = self.epoch <= opts.epochs
            && self.position < examples
            && self.position % opts.batch_size == 0
            && (self.epoch as u64)
                .checked_mul(per_epoch)
                .and_then(|s| s.checked_add((self.position / opts.batch_size) as u64))
                == Some(self.state.step);
        if !consistent {
            return Err(bad(format!(
                "says step {} at example {} of epoch {}, which a run of {} epochs of {examples} \
                 examples in batches of {} cannot reach",
                self.state.step,
                self.position,
                self.epoch.saturating_add(1),
                opts.epochs,
                opts.batch_size
            )));
        }
        Ok(())
    }

    fn check_settings(&self, path: &Path, now: &str) -> Result<(), Error> {
        if self.settings == now {
            return Ok(());
        }
        // The settings that differ, each as the checkpoint has it and as
        // this run does (the optimizer's text holds spaces: compare
        // `key=value` runs split where a new key starts).
        let fields = |text: &str| -> Vec<(String, String)> {
            let mut out: Vec<(String, String)> = Vec::new();
            for word in text.split(' ') {
                match word.split_once('=') {
                    Some((k, v)) if !k.contains(['(', '{', ':', ',']) => {
                        out.push((k.to_string(), v.to_string()))
                    }
                    _ => {
                        if let Some(last) = out.last_mut() {
                            last.1.push(' ');
                            last.1.push_str(word);
                        }
                    }
                }
            }
            out
        };
        let then = fields(&self.settings);
        let differ: Vec<String> = fields(now)
            .into_iter()
            .filter(|(k, v)| !then.iter().any(|(k2, v2)| k2 == k && v2 == v))
            .map(|(k, v)| {
                let was = then
                    .iter()
                    .find(|(k2, _)| *k2 == k)
                    .map_or("(none)".to_string(), |(_, v)| v.clone());
                format!("{k} was {was}, is now {v}")
            })
            .collect();
        Err(Error::Params {
            path: path.to_path_buf(),
            message: format!(
                "was written by a run with other settings ({}); resume with the same model, data \
                 and settings",
                if differ.is_empty() {
                    "their text differs".to_string()
                } else {
                    differ.join("; ")
                }
            ),
        })
    }
}
