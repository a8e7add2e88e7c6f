//! Parameters belong to the host. Layers declare them (name, shape, default
//! initializer); the host creates them from a seed or loads them from a file,
//! and lends them to the layers. That is what makes initialization, saving
//! and loading generic over every plugin.

use std::collections::BTreeMap;
use std::path::Path;

use layer_api::{FanMode, Init};
use ndarray::{ArrayD, IxDyn};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::atomic_file::write_atomically;
use crate::error::Error;
use crate::param_file::{ParamFile, SUPPORTED_DTYPES};

/// A parameter as the model needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    /// `<layer name>.<param name>`, e.g. `1.weight`.
    pub name: String,
    pub layer: String,
    /// The name within its layer, e.g. `weight`.
    pub local_name: String,
    pub shape: Vec<usize>,
    pub fan_in: usize,
    pub fan_out: usize,
    pub init: Init,
    /// The name of the tensor that holds its values: `name` itself, or, for a
    /// parameter the model file shares with another layer's, the owner's name.
    pub stored_as: String,
}

impl ParamInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when this parameter has its own tensor (it is nobody's share).
    pub fn is_stored(&self) -> bool {
        self.stored_as == self.name
    }
}

/// The parameter tensors of a model, by full name. A shared parameter is
/// held once, under its owner's name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamStore {
    tensors: BTreeMap<String, ArrayD<f32>>,
}

impl ParamStore {
    /// Draws every stored parameter from its initializer. Each parameter gets
    /// its own random stream, derived from the seed and its full name, so
    /// that the same seed gives the same numbers on every run and every
    /// machine, and adding a layer does not change the others' values.
    pub fn initialize(params: &[ParamInfo], seed: u64) -> ParamStore {
        let tensors = params
            .iter()
            .filter(|p| p.is_stored())
            .map(|p| {
                let data = sample(&p.init, p.elements(), p.fan_in, p.fan_out, seed, &p.name);
                let array = ArrayD::from_shape_vec(IxDyn(&p.shape), data)
                    .expect("sample returns one value per element");
                (p.name.clone(), array)
            })
            .collect();
        ParamStore { tensors }
    }

    /// Loads the parameters a model needs from a safetensors or `.npz` file,
    /// checking that every stored one is there with the declared shape and a
    /// float dtype, and that the file holds nothing else (unless
    /// `allow_unused`).
    pub fn load(
        path: &Path,
        params: &[ParamInfo],
        allow_unused: bool,
    ) -> Result<ParamStore, Error> {
        let mut file = ParamFile::read(path)?;
        let view = file_view(&file);
        // The values move from the file to the store: they are never held
        // twice.
        let mut take = |name: &str| {
            file.tensors
                .get_mut(name)
                .map(|t| std::mem::replace(&mut t.values, Ok(Vec::new())))
        };
        ParamStore::assemble(&mut take, &view, params, allow_unused)
    }

    /// [`ParamStore::load`] from a file already read.
    pub fn from_file(
        file: &ParamFile,
        params: &[ParamInfo],
        allow_unused: bool,
    ) -> Result<ParamStore, Error> {
        let mut copy = |name: &str| file.tensors.get(name).map(|t| t.values.clone());
        ParamStore::assemble(&mut copy, &file_view(file), params, allow_unused)
    }

    /// The store of `params` from a file whose tensors' names and shapes
    /// `file` lists, their values given by `values`.
    fn assemble(
        values: &mut FileValues<'_>,
        file: &FileView,
        params: &[ParamInfo],
        allow_unused: bool,
    ) -> Result<ParamStore, Error> {
        let path = &file.path;
        let file_error = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        let mut tensors = BTreeMap::new();
        for p in params.iter().filter(|p| p.is_stored()) {
            let shape = file.shapes.get(&p.name).ok_or_else(|| {
                file_error(format!(
                    "parameter '{}' is missing (layer '{}' needs it with shape {:?}); \
                     the file holds: {}",
                    p.name, p.layer, p.shape, file.names
                ))
            })?;
            if *shape != p.shape {
                return Err(file_error(format!(
                    "parameter '{}' has shape {:?} in the file, but layer '{}' needs {:?}",
                    p.name, shape, p.layer, p.shape
                )));
            }
            let values = values(&p.name).unwrap_or(Ok(Vec::new())).map_err(|dtype| {
                file_error(format!(
                    "parameter '{}' has dtype {dtype}; supported are {SUPPORTED_DTYPES}",
                    p.name
                ))
            })?;
            let array = ArrayD::from_shape_vec(IxDyn(&p.shape), values)
                .map_err(|e| file_error(format!("parameter '{}': {e}", p.name)))?;
            tensors.insert(p.name.clone(), array);
        }
        if !allow_unused {
            let unused: Vec<&String> = file
                .shapes
                .keys()
                .filter(|n| !tensors.contains_key(*n))
                .collect();
            if !unused.is_empty() {
                let shared: Vec<String> = params
                    .iter()
                    .filter(|p| !p.is_stored() && unused.contains(&&p.name))
                    .map(|p| {
                        format!(
                            "'{}' shares '{}' and is stored under that name",
                            p.name, p.stored_as
                        )
                    })
                    .collect();
                let hint = if shared.is_empty() {
                    String::new()
                } else {
                    format!("; {}", shared.join(", "))
                };
                return Err(file_error(format!(
                    "the file holds tensors no layer uses: {}{hint} (check the layer names, \
                     or pass --allow-unused-params)",
                    unused
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(ParamStore { tensors })
    }

    /// Writes every tensor to a safetensors file (f32), atomically.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), Error> {
        let bytes: Vec<(&str, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, array)| {
                let data = array.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.as_str(), data)
            })
            .collect();
        let views = bytes
            .iter()
            .map(|(name, data)| {
                let shape = self.tensors[*name].shape().to_vec();
                TensorView::new(Dtype::F32, shape, data).map(|view| (*name, view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Params {
                path: path.to_path_buf(),
                message: format!("cannot encode the tensors: {e}"),
            })?;
        let encoded = safetensors::serialize(views, None).map_err(|e| Error::Params {
            path: path.to_path_buf(),
            message: format!("cannot encode the tensors: {e}"),
        })?;
        write_atomically(path, |w| w.write_all(&encoded))
    }

    /// The tensor stored as `name` (`<layer>.<param>`, an owner's name).
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.get(name)
    }

    /// The tensor stored as `name`, to update it in place (training).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ArrayD<f32>> {
        self.tensors.get_mut(name)
    }

    /// A store holding exactly `tensors`.
    pub fn from_tensors(tensors: BTreeMap<String, ArrayD<f32>>) -> ParamStore {
        ParamStore { tensors }
    }

    /// Every tensor, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// The values of a file's tensor by name (`Err`: its unsupported dtype),
/// copied or moved out of the file.
type FileValues<'a> = dyn FnMut(&str) -> Option<Result<Vec<f32>, String>> + 'a;

/// What [`ParamStore::assemble`] needs of a file besides the values.
struct FileView {
    path: std::path::PathBuf,
    shapes: BTreeMap<String, Vec<usize>>,
    names: String,
}

fn file_view(file: &ParamFile) -> FileView {
    FileView {
        path: file.path.clone(),
        shapes: file
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shape.clone()))
            .collect(),
        names: file.names(),
    }
}

/// FNV-1a: a fixed, documented hash, so that stream numbers never change
/// between builds (std's hasher makes no such promise).
fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Draws `n` values from `init` for the parameter `name`.
pub fn sample(
    init: &Init,
    n: usize,
    fan_in: usize,
    fan_out: usize,
    seed: u64,
    name: &str,
) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream_of(name));
    let fan = |mode: FanMode| match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    } as f64;
    let mut uniform = |low: f64, high: f64| -> Vec<f32> {
        (0..n)
            .map(|_| (low + (high - low) * unit_uniform(&mut rng)) as f32)
            .collect()
    };
    match *init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant { value } => vec![value; n],
        Init::Uniform { low, high } => uniform(f64::from(low), f64::from(high)),
        Init::XavierUniform { gain } => {
            let bound = f64::from(gain) * (6.0 / (fan_in + fan_out).max(1) as f64).sqrt();
            uniform(-bound, bound)
        }
        Init::KaimingUniform { mode, gain } => {
            let bound = f64::from(gain) * (3.0 / fan(mode).max(1.0)).sqrt();
            uniform(-bound, bound)
        }
        Init::Normal { mean, std } => normal(&mut rng, n, f64::from(mean), f64::from(std)),
        Init::XavierNormal { gain } => {
            let std = f64::from(gain) * (2.0 / (fan_in + fan_out).max(1) as f64).sqrt();
            normal(&mut rng, n, 0.0, std)
        }
        Init::KaimingNormal { mode, gain } => {
            let std = f64::from(gain) / fan(mode).max(1.0).sqrt();
            normal(&mut rng, n, 0.0, std)
        }
    }
}

/// A uniform draw on [0, 1) with 53 random bits.
fn unit_uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Normal draws by the Box-Muller transform, written out here so that the
/// numbers depend on nothing but the seed.
fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f64, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1 = 1.0 - unit_uniform(rng); // in (0, 1]: ln is finite
        let u2 = unit_uniform(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((mean + std * r * theta.cos()) as f32);
        if out.len() < n {
            out.push((mean + std * r * theta.sin()) as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(v: &[f32]) -> (f64, f64, f32, f32) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        let min = v.iter().copied().fold(f32::INFINITY, f32::min);
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (mean, var.sqrt(), min, max)
    }

    #[test]
    fn the_same_seed_and_name_give_the_same_bits_and_others_differ() {
        let init = Init::normal(0.0, 1.0);
        let a = sample(&init, 1000, 1, 1, 3, "0.weight");
        let b = sample(&init, 1000, 1, 1, 3, "0.weight");
        assert_eq!(a, b);
        assert_ne!(a, sample(&init, 1000, 1, 1, 4, "0.weight"));
        assert_ne!(a, sample(&init, 1000, 1, 1, 3, "1.weight"));
    }

    #[test]
    fn normal_and_uniform_statistics_match_their_definitions() {
        let n = 200_000;
        let (mean, std, _, _) = stats(&sample(&Init::normal(2.0, 0.5), n, 1, 1, 0, "w"));
        assert!((mean - 2.0).abs() < 0.01, "mean {mean}");
        assert!((std - 0.5).abs() < 0.01, "std {std}");
        let (mean, std, min, max) = stats(&sample(&Init::uniform(-3.0, 1.0), n, 1, 1, 0, "w"));
        assert!((mean + 1.0).abs() < 0.02, "mean {mean}");
        // The standard deviation of U(a, b) is (b - a) / sqrt(12).
        assert!((std - 4.0 / 12f64.sqrt()).abs() < 0.01, "std {std}");
        assert!(min >= -3.0 && max < 1.0);
    }

    #[test]
    fn constant_initializers_are_exact() {
        assert!(sample(&Init::Zeros, 100, 1, 1, 0, "w")
            .iter()
            .all(|&v| v == 0.0));
        assert!(sample(&Init::Ones, 100, 1, 1, 0, "w")
            .iter()
            .all(|&v| v == 1.0));
        let c = sample(&Init::Constant { value: -0.25 }, 100, 1, 1, 0, "w");
        assert!(c.iter().all(|&v| v == -0.25));
    }

    /// Fan-in and fan-out differ, so that using the wrong one shows.
    const FAN_IN: usize = 300;
    const FAN_OUT: usize = 100;

    fn large(init: &Init) -> Vec<f32> {
        sample(init, 200_000, FAN_IN, FAN_OUT, 9, "layer.weight")
    }

    /// Uniform on [-bound, bound): mean 0, std bound / sqrt(3), and the
    /// extremes within the bound but close to it.
    fn assert_symmetric_uniform(v: &[f32], bound: f64) {
        let (mean, std, min, max) = stats(v);
        assert!(mean.abs() < 0.01 * bound, "mean {mean}, bound {bound}");
        assert!(
            (std - bound / 3f64.sqrt()).abs() < 0.01 * bound,
            "std {std}, bound {bound}"
        );
        assert!(
            f64::from(min) >= -bound && f64::from(max) <= bound,
            "{min} {max} {bound}"
        );
        assert!(f64::from(min) < -0.999 * bound && f64::from(max) > 0.999 * bound);
    }

    fn assert_centered_normal(v: &[f32], expected_std: f64) {
        let (mean, std, _, _) = stats(v);
        assert!(mean.abs() < 0.01 * expected_std, "mean {mean}");
        assert!(
            (std - expected_std).abs() < 0.01 * expected_std,
            "std {std}, expected {expected_std}"
        );
    }

    #[test]
    fn xavier_scales_by_the_sum_of_the_fans() {
        // Glorot & Bengio: bound sqrt(6 / (fan_in + fan_out)), std sqrt(2 / (...)).
        let sum = (FAN_IN + FAN_OUT) as f64;
        assert_symmetric_uniform(
            &large(&Init::XavierUniform { gain: 1.0 }),
            (6.0 / sum).sqrt(),
        );
        assert_symmetric_uniform(
            &large(&Init::XavierUniform { gain: 2.0 }),
            2.0 * (6.0 / sum).sqrt(),
        );
        assert_centered_normal(
            &large(&Init::XavierNormal { gain: 1.0 }),
            (2.0 / sum).sqrt(),
        );
    }

    #[test]
    fn kaiming_scales_by_the_chosen_fan() {
        // He et al.: std gain / sqrt(fan); the uniform bound is sqrt(3) std.
        let gain = std::f64::consts::SQRT_2;
        for (mode, fan) in [(FanMode::FanIn, FAN_IN), (FanMode::FanOut, FAN_OUT)] {
            let std = gain / (fan as f64).sqrt();
            let u = large(&Init::KaimingUniform {
                mode,
                gain: gain as f32,
            });
            assert_symmetric_uniform(&u, 3f64.sqrt() * std);
            let n = large(&Init::KaimingNormal {
                mode,
                gain: gain as f32,
            });
            assert_centered_normal(&n, std);
        }
    }

    #[test]
    fn every_initializer_gives_identical_bytes_for_the_same_seed() {
        let all = [
            Init::Zeros,
            Init::Ones,
            Init::Constant { value: 0.5 },
            Init::normal(1.0, 2.0),
            Init::uniform(-3.0, 3.0),
            Init::XavierUniform { gain: 1.0 },
            Init::XavierNormal { gain: 1.0 },
            Init::KaimingUniform {
                mode: FanMode::FanIn,
                gain: 1.0,
            },
            Init::KaimingNormal {
                mode: FanMode::FanOut,
                gain: 1.0,
            },
        ];
        assert_eq!(all.len(), Init::NAMES.len());
        for init in &all {
            let bits = |seed| -> Vec<u32> {
                sample(init, 1001, FAN_IN, FAN_OUT, seed, "0.weight")
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(bits(5), bits(5), "{init:?}");
            if !matches!(init, Init::Zeros | Init::Ones | Init::Constant { .. }) {
                assert_ne!(bits(5), bits(6), "{init:?}");
            }
        }
    }
}
