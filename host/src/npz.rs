//! `.npz` archives (what numpy's `savez` writes): a zip of `<name>.npy`
//! members. Read with every member in its own element type; written
//! uncompressed, one member per tensor, as `np.savez` does.

use std::io::{Cursor, Read, Write};

use crate::npy;
use crate::tensor::Tensor;

/// The arrays of an `.npz` file's bytes, by name, in the archive's order.
pub fn read(bytes: Vec<u8>) -> Result<Vec<(String, Tensor)>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid .npz file (truncated or corrupt zip archive?): {e}"))?;
    let mut arrays: Vec<(String, Tensor)> = Vec::with_capacity(archive.len());
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
        if arrays.iter().any(|(n, _)| n == name) {
            return Err(format!("the archive holds two arrays named '{name}'"));
        }
        // Reading to the end makes the zip reader check the member's CRC.
        let mut data = Vec::new();
        member.read_to_end(&mut data).map_err(|e| {
            format!("array '{name}' (member '{member_name}'): the archive is corrupt: {e}")
        })?;
        let tensor = npy::read_tensor_from(data.as_slice(), data.len() as u64)
            .map_err(|e| format!("array '{name}' (member '{member_name}'): {e}"))?;
        arrays.push((name.to_string(), tensor));
    }
    Ok(arrays)
}

/// Writes `arrays` as an uncompressed `.npz`, each as `<name>.npy` in its
/// own element type.
pub fn write(
    writer: &mut (impl Write + std::io::Seek),
    arrays: &[(&str, &Tensor)],
) -> std::io::Result<()> {
    let mut zip = zip::ZipWriter::new(writer);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for (name, tensor) in arrays {
        zip.start_file(format!("{name}.npy"), options)
            .map_err(std::io::Error::other)?;
        npy::write_tensor(&mut zip, tensor)?;
    }
    zip.finish().map_err(std::io::Error::other)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn arrays_of_every_kind_survive_a_round_trip() {
        let a = Tensor::I64(array![[1i64, -2], [3, 1 << 40]].into_dyn());
        let b = Tensor::Bool(array![1u8, 0, 1].into_dyn());
        let c = Tensor::F32(array![0.5f32, -1.25].into_dyn());
        let mut bytes = Cursor::new(Vec::new());
        write(&mut bytes, &[("a", &a), ("mask", &b), ("x.y", &c)]).unwrap();
        let back = read(bytes.into_inner()).unwrap();
        let names: Vec<&str> = back.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "mask", "x.y"]);
        assert_eq!(back[0].1, a);
        assert_eq!(back[1].1, b);
        assert_eq!(back[2].1, c);
        assert!(read(b"not a zip".to_vec())
            .unwrap_err()
            .contains("not a valid .npz"));
    }
}
