//! Reading parameter files: safetensors (what PyTorch, Keras and the
//! `safetensors` package write) and numpy `.npz` (`np.savez` and
//! `np.savez_compressed`), told apart by their first bytes rather than their
//! extension, so a misnamed file still loads. Every tensor is converted to f32
//! up front; a tensor whose dtype cannot be is kept with the dtype's name, so
//! that the error names the parameter only if a layer asks for it.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

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
        let bytes = std::fs::read(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
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

/// An `.npz` is a zip archive with one `<key>.npy` member per array.
fn read_npz(bytes: Vec<u8>) -> Result<BTreeMap<String, FileTensor>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid .npz file (truncated or corrupt zip archive?): {e}"))?;
    let mut tensors = BTreeMap::new();
    for index in 0..archive.len() {
        let mut member = archive
            .by_index(index)
            .map_err(|e| format!("member {index} of the archive is unreadable: {e}"))?;
        let member_name = member.name().to_string();
        let Some(name) = member_name.strip_suffix(".npy") else {
            return Err(format!(
                "member '{member_name}' is not an .npy array; an .npz written by np.savez \
                 holds only '<name>.npy' members"
            ));
        };
        let name = name.to_string();
        // Reading to the end is what makes the zip reader check the member's
        // CRC, so a corrupt member is refused rather than read as numbers.
        let mut data = Vec::new();
        member.read_to_end(&mut data).map_err(|e| {
            format!("parameter '{name}' (member '{member_name}'): the archive is corrupt: {e}")
        })?;
        let (array, dtype) = npy::read_f32_from(data.as_slice(), data.len() as u64)
            .map_err(|e| format!("parameter '{name}' (member '{member_name}'): {e}"))?;
        let values = if dtype.is_float() {
            Ok(array.iter().copied().collect())
        } else {
            Err(format!("'{}'", dtype.descr()))
        };
        tensors.insert(
            name,
            FileTensor {
                shape: array.shape().to_vec(),
                values,
            },
        );
    }
    Ok(tensors)
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
