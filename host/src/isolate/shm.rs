//! Shared-memory regions: in-memory files (memfd) that the host and a
//! worker both map, so tensors cross between them without going through
//! the socket.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{Mmap, MmapMut, MmapOptions};
use rustix::fs::MemfdFlags;

/// Where tensors in a region start: a multiple of this many bytes.
pub const ALIGN: usize = 64;

/// `offset` rounded up to [`ALIGN`].
pub fn aligned(offset: usize) -> usize {
    offset.div_ceil(ALIGN) * ALIGN
}

/// A region the host writes and maps read-write.
pub struct Region {
    file: File,
    map: MmapMut,
}

impl Region {
    /// A new zeroed region of at least `len` bytes (never empty).
    pub fn new(name: &str, len: usize) -> std::io::Result<Region> {
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        let file = File::from(fd);
        file.set_len(len.max(1) as u64)?;
        // SAFETY: the file is an in-memory file this process just made; the
        // only other process that maps it is a worker, which the host
        // treats as untrusted: the host reads what the worker wrote only as
        // plain bytes (any value is a valid tensor element), so a worker
        // writing while the host reads cannot make the host misbehave.
        let map = unsafe { MmapOptions::new().map_mut(&file)? };
        Ok(Region { file, map })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A descriptor of the same file opened read-only, to hand a worker
    /// that must read the region but never write it: a map for writing
    /// through it is refused by the kernel.
    pub fn read_only_fd(&self) -> std::io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        Ok(rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?)
    }
}

/// A region as a worker maps it: read-only (inputs, parameters) or
/// writable (outputs).
pub enum Mapped {
    ReadOnly(Mmap),
    Writable(MmapMut),
}

impl Mapped {
    pub fn read_only(fd: OwnedFd) -> std::io::Result<Mapped> {
        let file = File::from(fd);
        // SAFETY: a region the host made. The host does not write an input
        // region while a call is in flight, and parameter regions are sealed.
        Ok(Mapped::ReadOnly(unsafe { MmapOptions::new().map(&file)? }))
    }

    pub fn writable(fd: OwnedFd) -> std::io::Result<Mapped> {
        let file = File::from(fd);
        // SAFETY: a region the host made; the host reads it only after the
        // call that writes it has returned.
        Ok(Mapped::Writable(unsafe {
            MmapOptions::new().map_mut(&file)?
        }))
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Mapped::ReadOnly(m) => m,
            Mapped::Writable(m) => m,
        }
    }

    /// The bytes to write; empty for a read-only region.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Mapped::ReadOnly(_) => &mut [],
            Mapped::Writable(m) => m,
        }
    }
}
