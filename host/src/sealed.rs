//! In-memory files sealed against change: the copy of a plugin library the
//! host loads, and the parameters an isolated worker maps, so that nothing
//! (another process, the worker) can alter bytes once they were checked.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

/// An in-memory file named `name` (for `/proc/<pid>/maps`) holding `bytes`
/// (at least one byte long: an empty one holds a single zero, since an
/// empty file cannot be mapped), sealed so that nothing can write, grow or
/// shrink it any more.
pub fn sealed_file(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    if bytes.is_empty() {
        file.set_len(1)?;
    }
    let fd = OwnedFd::from(file);
    // The kernel refuses the write seal (EBUSY) while a page of the file
    // still has a reference it cannot account for, such as the per-CPU
    // batch of pages the write just added, which another CPU drains later:
    // seen once in a full test run on a busy 2-CPU machine. Try again a
    // few times, about half a second in all, before reporting it.
    let seals = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL;
    let mut pause = std::time::Duration::from_millis(2);
    for _ in 0..8 {
        match fcntl_add_seals(&fd, seals) {
            Err(rustix::io::Errno::BUSY) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            result => {
                result?;
                return Ok(fd);
            }
        }
    }
    fcntl_add_seals(&fd, seals)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_file_holds_the_bytes_and_refuses_writes() {
        let fd = sealed_file("layer-test", b"weights").unwrap();
        let mut file = File::from(fd);
        let mut read = Vec::new();
        std::io::Seek::rewind(&mut file).unwrap();
        file.read_to_end(&mut read).unwrap();
        assert_eq!(read, b"weights");
        assert!(
            file.write_all(b"changed").is_err(),
            "a sealed file took a write"
        );
        assert!(file.set_len(100).is_err(), "a sealed file grew");
        let empty = File::from(sealed_file("layer-test", b"").unwrap());
        assert_eq!(empty.metadata().unwrap().len(), 1);
    }
}
