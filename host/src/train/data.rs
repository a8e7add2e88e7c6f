//! Training data: an `.npz` file holding each model input by name and
//! `target`, all with the same number of examples along axis 0; and the
//! order examples are visited in.

use std::path::{Path, PathBuf};

use layer_api::DType;

use crate::error::Error;
use crate::runtime::Model;
use crate::tensor::Tensor;

/// A data set read whole: the model's inputs in declared order (converted
/// to the types the model takes) and the target.
pub struct Dataset {
    pub path: PathBuf,
    /// The SHA-256 of the file, in hex: what a checkpoint records of it.
    pub sha256: String,
    pub inputs: Vec<Tensor>,
    pub target: Tensor,
    pub examples: usize,
}

/// The name of the array holding the target.
pub const TARGET: &str = "target";

impl Dataset {
    pub fn read(path: &Path, model: &Model) -> Result<Dataset, Error> {
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        let sha256 = hex_sha256(&bytes);
        let mut arrays = crate::npz::read(bytes).map_err(&invalid)?;
        let names = model.input_names();
        let listed = arrays
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        if let Some((unknown, _)) = arrays
            .iter()
            .find(|(n, _)| n != TARGET && !names.contains(&n.as_str()))
        {
            return Err(invalid(format!(
                "array '{unknown}' is neither a model input ({}) nor '{TARGET}'",
                names.join(", ")
            )));
        }
        let mut take = |name: &str| -> Result<Tensor, Error> {
            let at = arrays.iter().position(|(n, _)| n == name).ok_or_else(|| {
                invalid(format!(
                    "has no array '{name}' (it holds: {}); a training file holds each model \
                     input by name and '{TARGET}'",
                    listed
                ))
            })?;
            Ok(arrays.remove(at).1)
        };
        let mut inputs = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let t = take(name)?;
            let dtype = model.input_dtype_of(i, t.dtype());
            inputs.push(
                t.convert(dtype)
                    .map_err(|m| invalid(format!("array '{name}': {m}")))?,
            );
        }
        let target = take(TARGET)?;
        let examples = *target.shape().first().ok_or_else(|| {
            invalid(format!(
                "'{TARGET}' is a scalar; it needs one row per example"
            ))
        })?;
        for (name, t) in names.iter().zip(&inputs) {
            if t.shape().first() != Some(&examples) {
                return Err(invalid(format!(
                    "array '{name}' has shape {:?} but '{TARGET}' has {examples} examples; \
                     every array needs that many rows (axis 0)",
                    t.shape()
                )));
            }
        }
        if examples == 0 {
            return Err(invalid("holds no examples".to_string()));
        }
        for (name, t) in names
            .iter()
            .copied()
            .zip(&inputs)
            .chain([(TARGET, &target)])
        {
            if let Some((i, v)) = t.to_f64().iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(invalid(format!(
                    "array '{name}' holds {v} at {:?}; training needs finite numbers",
                    crate::gradcheck::unravel(i, t.shape())
                )));
            }
        }
        Ok(Dataset {
            path: path.to_path_buf(),
            sha256,
            inputs,
            target,
            examples,
        })
    }

    /// Checks the target against the loss and the model's output, whose
    /// shape for one example is `example_shape` (its axis 0 left out), for
    /// every example before any step: a bad row found at the last step
    /// would throw the run away.
    pub fn check_target(&self, loss: super::Loss, example_shape: &[usize]) -> Result<(), Error> {
        let invalid = |message: String| Error::Params {
            path: self.path.clone(),
            message: format!("'{TARGET}': {message}"),
        };
        let mut expected = vec![self.examples];
        match loss {
            super::Loss::Mse => {
                expected.extend_from_slice(example_shape);
                if !matches!(self.target.dtype(), DType::F32 | DType::F64)
                    || self.target.shape() != expected
                {
                    return Err(invalid(format!(
                        "is {} {:?}; mse needs float32 or float64 of the model output's shape \
                         {expected:?}",
                        self.target.dtype(),
                        self.target.shape()
                    )));
                }
            }
            super::Loss::CrossEntropy => {
                let [classes] = example_shape else {
                    return Err(invalid(format!(
                        "cross_entropy needs a model output of shape (N, classes); the model's \
                         is (N, {example_shape:?})"
                    )));
                };
                if !matches!(self.target.dtype(), DType::I64 | DType::I32)
                    || self.target.shape() != expected
                {
                    return Err(invalid(format!(
                        "is {} {:?}; cross_entropy needs int64 class ids of shape {expected:?}",
                        self.target.dtype(),
                        self.target.shape()
                    )));
                }
                let ids = self.target.to_f64();
                if let Some((row, id)) = ids
                    .iter()
                    .enumerate()
                    .find(|(_, &id)| id < 0.0 || id >= *classes as f64)
                {
                    return Err(invalid(format!(
                        "row {row} holds class {id}, outside [0, {classes}) (the model's output \
                         has {classes} classes)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The examples `rows` as one minibatch: the inputs, then the target.
    pub fn batch(&self, rows: &[usize]) -> (Vec<Tensor>, Tensor) {
        (
            self.inputs.iter().map(|t| t.select_rows(rows)).collect(),
            self.target.select_rows(rows),
        )
    }
}

/// The SHA-256 of `bytes`, in hex.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SplitMix64: the generator behind the shuffle, chosen because it is a
/// few lines in any language, so another tool can replay an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The order of one epoch's examples: a Fisher–Yates shuffle of
/// `0..n` drawing from `rng` (for `i` from `n - 1` down to 1, swap `i`
/// with `next_u64() % (i + 1)`), continuing the stream from the epoch
/// before; or `0..n` when `shuffle` is false.
pub fn epoch_order(n: usize, rng: &mut SplitMix64, shuffle: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_its_published_first_values() {
        // The reference implementation seeded with 0 starts with these.
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn an_epoch_order_is_a_permutation_and_no_shuffle_keeps_the_file_order() {
        let mut r = SplitMix64(7);
        let mut order = epoch_order(100, &mut r, true);
        assert_ne!(order, (0..100).collect::<Vec<_>>());
        order.sort_unstable();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
        assert_eq!(epoch_order(5, &mut r, false), vec![0, 1, 2, 3, 4]);
    }
}
