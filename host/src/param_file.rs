//! Reading parameter files: safetensors (what PyTorch, Keras and the
//! `safetensors` package write) and numpy `.npz` (`np.savez` and
//! `np.savez_compressed`), told apart by their first bytes rather than their
//! extension, so a misnamed file still loads. Every tensor is converted to f32
//! up front; a tensor whose dtype cannot be is kept with the dtype's name, so
//! that the error names the parameter only if a layer asks for it.
//!
//! The file is read whole, so it must be a regular file within the memory
//! budget ([`crate::budget`]); the tensors converted to f32 must fit in what
//! is left of it, checked before they are converted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::budget;
use crate::error::Error;
use crate::npy;

/// The formats a parameter file may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamFormat {
    Safetensors,
    Npz,
}

/// One tensor as the file holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileTensor {
    pub shape: Vec<usize>,
    /// The values as f32, or the name of a dtype that is not supported.
    pub values: Result<Vec<f32>, String>,
}

/// A parameter file's tensors, by name.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamFile {
    pub path: PathBuf,
    pub format: ParamFormat,
    pub tensors: BTreeMap<String, FileTensor>,
}

/// The dtypes accepted, for messages.
pub const SUPPORTED_DTYPES: &str = "float32, float64, float16 and bfloat16 (npz: float16/32/64)";

impl ParamFile {
    /// Reads a safetensors or `.npz` file.
    pub fn read(path: &Path) -> Result<ParamFile, Error> {
        let bytes = budget::read_regular(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ParamFile::from_bytes(path, bytes)
    }

    /// Reads a safetensors or `.npz` file's `bytes`, as read from `path`.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<ParamFile, Error> {
        let error = |message: String| Error::Params {
            path: path.to_path_buf(),
            message,
        };
        // A zip archive starts with a local file header, or, when it holds
        // nothing, with the end-of-directory record.
        let format = if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            ParamFormat::Npz
        } else {
            ParamFormat::Safetensors
        };
        let tensors = match format {
            ParamFormat::Safetensors => read_safetensors(&bytes).map_err(error)?,
            ParamFormat::Npz => read_npz(bytes).map_err(error)?,
        };
        Ok(ParamFile {
            path: path.to_path_buf(),
            format,
            tensors,
        })
    }

    /// The tensor names, sorted, for messages.
    pub fn names(&self) -> String {
        if self.tensors.is_empty() {
            "(nothing)".to_string()
        } else {
            self.tensors.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }
}

fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, FileTensor>, String> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file (truncated or corrupt?): {e}"))?;
    // Each tensor's bytes are in the file (the reader checked its offsets):
    // the f32 copies are at most twice the file's size (from 16-bit types).
    let converted = budget::sum(
        file.tensors()
            .iter()
            .map(|(_, view)| budget::shape_bytes(view.shape(), 4)),
    );
    let total = converted.and_then(|c| c.checked_add(bytes.len() as u128));
    budget::check(total).map_err(|over| {
        format!(
            "holding its {} tensors as float32 ({} bytes) beside the file {over}",
            file.len(),
            converted.map_or("overflow".to_string(), |c| c.to_string())
        )
    })?;
    Ok(file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let tensor = FileTensor {
                shape: view.shape().to_vec(),
                values: to_f32(view.dtype(), view.data())
                    .ok_or_else(|| format!("{:?}", view.dtype())),
            };
            (name, tensor)
        })
        .collect())
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

/// An `.npz` is a zip archive with one `<key>.npy` member per array, read
/// by the one `.npz` reader ([`crate::npz::read_members`]): member names,
/// duplicates, sizes against the budget and CRCs are checked there.
fn read_npz(bytes: Vec<u8>) -> Result<BTreeMap<String, FileTensor>, String> {
    let members = crate::npz::read_members(bytes, "parameter", |reader, len| {
        npy::read_f32_from(reader, len)
    })?;
    Ok(members
        .into_iter()
        .map(|(name, (array, dtype))| {
            let shape = array.shape().to_vec();
            let values = if dtype.is_float() {
                Ok(array.into_raw_vec_and_offset().0)
            } else {
                Err(format!("'{}'", dtype.descr()))
            };
            (name, FileTensor { shape, values })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_from_each_float_dtype_by_hand() {
        assert_eq!(
            to_f32(Dtype::F32, &1.5f32.to_le_bytes()).unwrap(),
            vec![1.5]
        );
        assert_eq!(
            to_f32(Dtype::F64, &(-2.25f64).to_le_bytes()).unwrap(),
            vec![-2.25]
        );
        // 0x3c00 is 1.0 in IEEE half precision; 0x3f80 is 1.0 in bfloat16.
        assert_eq!(to_f32(Dtype::F16, &[0x00, 0x3c]).unwrap(), vec![1.0]);
        assert_eq!(to_f32(Dtype::BF16, &[0x80, 0x3f]).unwrap(), vec![1.0]);
        assert_eq!(to_f32(Dtype::I32, &[0, 0, 0, 0]), None);
    }
}
