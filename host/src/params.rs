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
use safetensors::{Dtype, SafeTensors};

use crate::error::Error;

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
}

impl ParamInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The parameter tensors of a model, by full name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamStore {
    tensors: BTreeMap<String, ArrayD<f32>>,
}

impl ParamStore {
    /// Draws every parameter from its initializer. Each parameter gets its
    /// own random stream, derived from the seed and its full name, so that
    /// the same seed gives the same numbers on every run and every machine,
    /// and adding a layer does not change the others' values.
    pub fn initialize(params: &[ParamInfo], seed: u64) -> ParamStore {
        let tensors = params
            .iter()
            .map(|p| {
                let data = sample(&p.init, p.elements(), p.fan_in, p.fan_out, seed, &p.name);
                let array = ArrayD::from_shape_vec(IxDyn(&p.shape), data)
                    .expect("sample returns one value per element");
                (p.name.clone(), array)
            })
            .collect();
        ParamStore { tensors }
    }

    /// Loads the parameters a model needs from a safetensors file, checking
    /// that every one is there with the declared shape and that the file
    /// holds nothing else (unless `allow_unused`).
    pub fn load_safetensors(
        path: &Path,
        params: &[ParamInfo],
        allow_unused: bool,
    ) -> Result<ParamStore, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file_error = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        let file = SafeTensors::deserialize(&bytes).map_err(|e| {
            file_error(format!(
                "not a valid safetensors file (truncated or corrupt?): {e}"
            ))
        })?;
        let mut tensors = BTreeMap::new();
        for p in params {
            let view = file.tensor(&p.name).map_err(|_| {
                file_error(format!(
                    "parameter '{}' is missing (the model needs it with shape {:?}); \
                     the file holds: {}",
                    p.name,
                    p.shape,
                    names_in(&file)
                ))
            })?;
            if view.shape() != p.shape.as_slice() {
                return Err(file_error(format!(
                    "parameter '{}' has shape {:?} in the file, but layer '{}' needs {:?}",
                    p.name,
                    view.shape(),
                    p.layer,
                    p.shape
                )));
            }
            let data = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                file_error(format!(
                    "parameter '{}' has dtype {:?}; supported are F32, F64, F16 and BF16",
                    p.name,
                    view.dtype()
                ))
            })?;
            let array = ArrayD::from_shape_vec(IxDyn(&p.shape), data)
                .map_err(|e| file_error(format!("parameter '{}': {e}", p.name)))?;
            tensors.insert(p.name.clone(), array);
        }
        if !allow_unused {
            let mut unused: Vec<String> = file
                .names()
                .into_iter()
                .filter(|n| !tensors.contains_key(*n))
                .map(str::to_string)
                .collect();
            unused.sort();
            if !unused.is_empty() {
                return Err(file_error(format!(
                    "the file holds tensors no layer uses: {} (check the layer names, or \
                     pass --allow-unused-params)",
                    unused.join(", ")
                )));
            }
        }
        Ok(ParamStore { tensors })
    }

    /// The tensor of parameter `name` (`<layer>.<param>`).
    pub fn get(&self, name: &str) -> Option<&ArrayD<f32>> {
        self.tensors.get(name)
    }

    /// Every tensor, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ArrayD<f32>)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }
}

fn names_in(file: &SafeTensors<'_>) -> String {
    let mut names = file.names();
    names.sort();
    if names.is_empty() {
        "(nothing)".to_string()
    } else {
        names.join(", ")
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let out = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(out)
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
}
