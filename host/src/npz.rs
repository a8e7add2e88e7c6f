//! `.npz` archives (what numpy's `savez` writes): a zip of `<name>.npy`
//! members. Read with every member in its own element type; written
//! uncompressed, one member per tensor, as `np.savez` does.
//!
//! A member is never inflated whole into memory: its declared uncompressed
//! size is checked against the memory budget first, and its `.npy` data is
//! read through a reader that stops at that size, so that a small archive
//! that inflates to gigabytes (a "zip bomb") is refused naming the member,
//! not read until memory runs out.

use std::collections::HashSet;
use std::io::{Cursor, Read, Write};

use crate::budget;
use crate::npy::{self, NpyError};
use crate::tensor::Tensor;

/// The arrays of an `.npz` file's bytes, by name, in the archive's order.
pub fn read(bytes: Vec<u8>) -> Result<Vec<(String, Tensor)>, String> {
    read_members(bytes, "array", |reader, len| {
        npy::read_tensor_from(reader, len)
    })
}

/// Reads each member of an `.npz` archive's `bytes` with `read`, which is
/// given the member's `.npy` bytes as a reader and their declared length,
/// and returns its value with its name (the member's without `.npy`), in
/// the archive's order. `what` names an array in messages (`array`,
/// `parameter`). Refused: anything but a zip archive of `<name>.npy`
/// members, two members of one name, a member whose declared size exceeds
/// the memory budget (with the members before it), a member whose data
/// inflates to more or less than it declares, and a corrupt member (its
/// CRC is checked).
pub fn read_members<T>(
    bytes: Vec<u8>,
    what: &str,
    mut read: impl FnMut(&mut dyn Read, u64) -> Result<T, NpyError>,
) -> Result<Vec<(String, T)>, String> {
    let file_bytes = bytes.len() as u128;
    // The zip reader keeps one entry per name, the last: two members of
    // one name are seen in the central directory itself.
    if let Some(names) = central_directory_names(&bytes) {
        let mut seen = HashSet::with_capacity(names.len());
        for member in names {
            if !seen.insert(member) {
                let member = String::from_utf8_lossy(member);
                let name = member.strip_suffix(".npy").unwrap_or(&member);
                return Err(format!(
                    "the archive holds two {what}s named '{name}' (member '{member}' twice)"
                ));
            }
        }
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| format!("not a valid .npz file (truncated or corrupt zip archive?): {e}"))?;
    let mut names = HashSet::with_capacity(archive.len());
    let mut declared_total = 0u128;
    let mut arrays: Vec<(String, T)> = Vec::with_capacity(archive.len());
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
        if !names.insert(name.to_string()) {
            return Err(format!(
                "the archive holds two {what}s named '{name}' (member '{member_name}' twice)"
            ));
        }
        let at = || format!("{what} '{name}' (member '{member_name}')");
        // The size the archive declares, before a byte is inflated: with the
        // archive itself and the members before, it must fit the budget.
        let declared = member.size();
        declared_total += u128::from(declared);
        budget::check(Some(file_bytes + declared_total)).map_err(|over| {
            format!(
                "{}: its uncompressed size of {declared} bytes is too large: with the archive \
                 and the members before it, reading it {over}",
                at()
            )
        })?;
        let value = {
            let mut limited = (&mut member).take(declared);
            read(&mut limited, declared).map_err(|e| match e {
                NpyError::Io(io) => format!("{}: the archive is corrupt: {io}", at()),
                other => format!("{}: {other}", at()),
            })?
        };
        // Exactly the declared bytes were read: the member must end here.
        // Reading its end is also what makes the zip reader check its CRC.
        let mut more = [0u8; 1];
        match member.read(&mut more) {
            Ok(0) => {}
            Ok(_) => {
                return Err(format!(
                    "{}: the archive is corrupt: the member inflates to more than the \
                     {declared} bytes it declares",
                    at()
                ))
            }
            Err(e) => return Err(format!("{}: the archive is corrupt: {e}", at())),
        }
        arrays.push((name.to_string(), value));
    }
    Ok(arrays)
}

/// The member names an archive's central directory lists, in its order,
/// duplicates included, or `None` when the directory is not where its end
/// record says (the zip reader then says what is wrong). Each entry takes
/// at least 46 bytes of the file: the list is never longer than the file.
fn central_directory_names(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let field = |at: usize, len: usize| -> Option<u64> {
        let b = bytes.get(at..at.checked_add(len)?)?;
        Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | u64::from(x)))
    };
    let tag =
        |at: usize, sig: &[u8]| at.checked_add(4).and_then(|end| bytes.get(at..end)) == Some(sig);
    // The end record is in the last 22 bytes and a comment of up to 64 KiB.
    let last = bytes.len().checked_sub(22)?;
    let end = (last.saturating_sub(65535)..=last)
        .rev()
        .find(|&at| tag(at, b"PK\x05\x06"))?;
    let mut entries = field(end + 10, 2)?;
    let mut offset = field(end + 16, 4)?;
    if entries == 0xFFFF || offset == 0xFFFF_FFFF {
        // Zip64: a locator just before the end record points at the
        // zip64 end record, which holds the real count and offset.
        let locator = end.checked_sub(20)?;
        if !tag(locator, b"PK\x06\x07") {
            return None;
        }
        let record = usize::try_from(field(locator + 8, 8)?).ok()?;
        if !tag(record, b"PK\x06\x06") {
            return None;
        }
        entries = field(record + 32, 8)?;
        offset = field(record + 48, 8)?;
    }
    let mut at = usize::try_from(offset).ok()?;
    let mut names = Vec::new();
    for _ in 0..entries {
        if !tag(at, b"PK\x01\x02") {
            return None;
        }
        let name_len = field(at + 28, 2)? as usize;
        let extra = field(at + 30, 2)? as usize;
        let comment = field(at + 32, 2)? as usize;
        names.push(bytes.get(at + 46..at + 46 + name_len)?);
        at += 46 + name_len + extra + comment;
    }
    Some(names)
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
