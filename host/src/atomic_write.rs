//! Writing a file so that a failure never leaves a partial file or clobbers
//! the one that was there.

use std::io::Write;
use std::path::Path;

use crate::error::Error;

/// Writes through `fill` to a temporary file beside `path` and renames it
/// into place only when `fill` and the flush succeed.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Error> {
    let write_error = |source: std::io::Error| Error::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(write_error)?;
    {
        let mut writer = std::io::BufWriter::new(file.as_file_mut());
        fill(&mut writer).map_err(write_error)?;
        writer.flush().map_err(write_error)?;
    }
    file.persist(path).map_err(|e| write_error(e.error))?;
    Ok(())
}
