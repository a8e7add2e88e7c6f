//! The host's memory budget: how many bytes it lets itself allocate for
//! tensors, parameters and buffers. Every size a file, a config or a plugin
//! asks for (an `.npy` header's shape, a parameter's declared shape, a
//! layer's declared output, an `.npz` member's uncompressed size) is
//! computed with checked arithmetic and compared with the budget *before*
//! anything is allocated, so that a hostile or careless request ends in a
//! message naming what asked, not in an abort of the process.
//!
//! The budget is `--max-memory` when given; otherwise the smallest of a share
//! ([`SHARE_PERCENT`]) of the physical memory, of the address space
//! `RLIMIT_AS` leaves, and of the cgroup's `memory.max`: what passes it
//! should not then fail under a tighter limit. It is one value for the whole
//! process, set once by `main` ([`set_limit`]) before a command runs, and
//! read wherever a size is checked; each check compares one request (one
//! tensor, or the sum a stage allocates together) with it.
//!
//! This module also opens the files the host reads whole or maps
//! ([`open_regular`], [`read_regular`]): only regular files, so that a FIFO,
//! `/dev/zero` or a terminal given as a model, input or parameter file is
//! refused up front instead of hanging or growing without end.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

/// The share of physical memory (and of the other limits) the default
/// budget takes, leaving room for the process itself and the rest of the
/// system.
pub const SHARE_PERCENT: u64 = 80;

/// The budget in force, and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    /// What set it, for messages: `--max-memory`, or the limit the default
    /// was derived from.
    pub source: String,
}

static BUDGET: OnceLock<Budget> = OnceLock::new();

/// The largest budget that means anything: no allocation may exceed
/// `isize::MAX` bytes, so a budget above it is that.
const CEILING: u64 = isize::MAX as u64;

/// Sets the budget to `bytes` (from `--max-memory`). Only the first call
/// counts, and only before the budget was first read; returns whether it
/// took effect.
pub fn set_limit(bytes: u64) -> bool {
    BUDGET
        .set(Budget {
            bytes: bytes.min(CEILING),
            source: "--max-memory".to_string(),
        })
        .is_ok()
}

/// The budget in force: the one set, or the default, worked out on first use.
pub fn current() -> &'static Budget {
    BUDGET.get_or_init(default_budget)
}

/// The budget in force, in bytes.
pub fn limit() -> u64 {
    current().bytes
}

/// A request the budget refuses: `needed` bytes (`None`: more than 128 bits
/// can count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBudget {
    pub needed: Option<u128>,
    pub budget: u64,
    pub source: String,
    /// The shape has a zero-length axis, but its other axes multiply to
    /// `needed` bytes, past what can be addressed: no array of it exists.
    pub unaddressable: bool,
}

impl fmt::Display for OverBudget {
    /// `needs N bytes, more than the memory budget of B bytes (--max-memory)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unaddressable {
            return match self.needed {
                Some(n) => write!(
                    f,
                    "has a zero-length axis, but its other axes multiply to {n} bytes, more \
                     than can be addressed: no array of that shape can be made"
                ),
                None => write!(
                    f,
                    "has a zero-length axis, but its other axes multiply past 128 bits: no \
                     array of that shape can be made"
                ),
            };
        }
        match self.needed {
            Some(n) => write!(f, "needs {n} bytes")?,
            None => write!(f, "needs more bytes than 128 bits can count (overflow)")?,
        }
        if self.source == ADDRESS_SPACE {
            return write!(f, ", more than any array can hold ({} bytes)", self.budget);
        }
        write!(f, ", more than the memory budget of {} bytes", self.budget)?;
        if self.source == "--max-memory" {
            write!(f, " (--max-memory)")
        } else {
            write!(f, " ({}; set another with --max-memory)", self.source)
        }
    }
}

impl std::error::Error for OverBudget {}

/// Checks that `bytes` (`None`: an overflow) fit in the budget, returning
/// them as a `usize` that can be allocated.
pub fn check(bytes: Option<u128>) -> Result<usize, OverBudget> {
    let budget = current();
    match bytes {
        Some(n) if n <= u128::from(budget.bytes) => {
            Ok(usize::try_from(n).expect("the budget is at most isize::MAX"))
        }
        needed => Err(OverBudget {
            needed,
            budget: budget.bytes,
            source: budget.source.clone(),
            unaddressable: false,
        }),
    }
}

/// The number of elements of `shape`, in checked arithmetic (`None`: more
/// than 128 bits can count). A zero-length axis makes it 0 whatever the
/// others are.
pub fn elements(shape: &[usize]) -> Option<u128> {
    if shape.contains(&0) {
        return Some(0);
    }
    shape
        .iter()
        .try_fold(1u128, |n, &d| n.checked_mul(d as u128))
}

/// The bytes of a tensor of `shape` with elements of `element_size` bytes.
pub fn shape_bytes(shape: &[usize], element_size: usize) -> Option<u128> {
    elements(shape).and_then(|n| n.checked_mul(element_size as u128))
}

/// The `source` of an [`OverBudget`] that no budget could allow.
const ADDRESS_SPACE: &str = "the address space";

/// Checks that a tensor of `shape` with elements of `element_size` bytes
/// could exist at all (at most `isize::MAX` bytes, whatever the budget),
/// returning its bytes: for a size that is planned but not necessarily
/// allocated whole (a streamed output).
pub fn check_addressable(shape: &[usize], element_size: usize) -> Result<usize, OverBudget> {
    if let Some(empty) = unaddressable_empty(shape, element_size) {
        return Err(empty);
    }
    match shape_bytes(shape, element_size) {
        Some(n) if n <= u128::from(CEILING) => Ok(n as usize),
        needed => Err(OverBudget {
            needed,
            budget: CEILING,
            source: ADDRESS_SPACE.to_string(),
            unaddressable: false,
        }),
    }
}

/// The refusal of a shape with a zero-length axis whose other axes
/// multiply past `isize::MAX`: like numpy and ndarray, no array of it can
/// be made even though it is empty.
fn unaddressable_empty(shape: &[usize], element_size: usize) -> Option<OverBudget> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u128, |n, &d| n.checked_mul(d as u128));
    if !(shape.contains(&0) && nonzero.is_none_or(|n| n > CEILING as u128)) {
        return None;
    }
    let budget = current();
    Some(OverBudget {
        needed: nonzero.and_then(|n| n.checked_mul(element_size.max(1) as u128)),
        budget: budget.bytes,
        source: budget.source.clone(),
        unaddressable: true,
    })
}

/// Checks a tensor of `shape` with elements of `element_size` bytes
/// against the budget, returning its bytes. Like numpy and ndarray, a shape
/// whose non-zero axes multiply past `isize::MAX` is refused even when a
/// zero-length axis leaves it empty: no array of it can be made.
pub fn check_shape(shape: &[usize], element_size: usize) -> Result<usize, OverBudget> {
    if let Some(empty) = unaddressable_empty(shape, element_size) {
        return Err(empty);
    }
    check(shape_bytes(shape, element_size))
}

/// A shape as Python writes a tuple: `(2, 64)`, `(8,)`, `()`; one of more
/// than 64 axes (numpy's most) shortened to its first and last 8.
pub fn shape_text(shape: &[usize]) -> String {
    let join = |dims: &[usize]| {
        dims.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match shape {
        [one] => format!("({one},)"),
        _ if shape.len() > 64 => format!(
            "({}, ..., {}) (rank {})",
            join(&shape[..8]),
            join(&shape[shape.len() - 8..]),
            shape.len()
        ),
        _ => format!("({})", join(shape)),
    }
}

/// Sums byte counts in checked arithmetic.
pub fn sum(sizes: impl IntoIterator<Item = Option<u128>>) -> Option<u128> {
    sizes
        .into_iter()
        .try_fold(0u128, |total, n| total.checked_add(n?))
}

/// Parses a `--max-memory` value: a number of bytes, optionally with a
/// fraction and a suffix K, M, G, T, P or E (powers of 1024, as `docker
/// --memory` and `sort -S` read them; `KiB`, `KB` and `k` alike), e.g.
/// `512M`, `4G`, `1.5G`, `1073741824`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let refuse = || {
        format!(
            "'{text}' is not a size: give a number of bytes, optionally with a suffix K, M, G, \
             T, P or E (powers of 1024), e.g. 512M or 4G"
        )
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let suffix = suffix.trim().to_ascii_lowercase();
    let suffix = suffix
        .strip_suffix("ib")
        .or_else(|| suffix.strip_suffix('b'))
        .unwrap_or(&suffix);
    let power = match suffix {
        "" => 0,
        "k" => 1,
        "m" => 2,
        "g" => 3,
        "t" => 4,
        "p" => 5,
        "e" => 6,
        _ => return Err(refuse()),
    };
    let unit = 1u128 << (10 * power);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(refuse());
    }
    if fraction.contains('.') {
        return Err(refuse());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| refuse())?
    };
    // The fraction exactly, as digits over a power of ten, then rounded down
    // to whole bytes.
    let digits = fraction.len().min(30);
    let numerator: u128 = if digits == 0 {
        0
    } else {
        fraction[..digits].parse().map_err(|_| refuse())?
    };
    let bytes = whole
        .checked_mul(unit)
        .and_then(|b| b.checked_add(numerator.checked_mul(unit)? / 10u128.pow(digits as u32)))
        .filter(|&b| b <= u128::from(u64::MAX))
        .ok_or_else(|| format!("'{text}' is larger than 2^64 bytes"))?;
    Ok(bytes as u64)
}

/// The default budget: [`SHARE_PERCENT`] of the smallest of physical
/// memory, the address space `RLIMIT_AS` leaves this process, and the
/// cgroup's `memory.max` (the ones that can be read; none: no budget beyond
/// what can be addressed).
fn default_budget() -> Budget {
    let mut limits: Vec<(u64, String)> = Vec::new();
    if let Some(total) = mem_total() {
        limits.push((total, "physical memory".to_string()));
    }
    if let Some(left) = address_space_left() {
        limits.push((left, "the address space RLIMIT_AS leaves".to_string()));
    }
    if let Some(max) = cgroup_memory_max() {
        limits.push((max, "the cgroup's memory.max".to_string()));
    }
    match limits.into_iter().min_by_key(|(bytes, _)| *bytes) {
        Some((bytes, what)) => Budget {
            bytes: (u128::from(bytes) * u128::from(SHARE_PERCENT) / 100).min(CEILING as u128)
                as u64,
            source: format!("{SHARE_PERCENT}% of {what}"),
        },
        None => Budget {
            bytes: CEILING,
            source: "no memory limit found".to_string(),
        },
    }
}

/// A `Key: N kB` line of a `/proc` file, in bytes.
fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kb.checked_mul(1024)
    })
}

fn mem_total() -> Option<u64> {
    proc_kb("/proc/meminfo", "MemTotal")
}

/// `RLIMIT_AS` less the address space already in use (libraries, stacks,
/// the heap so far): what further allocations may take.
fn address_space_left() -> Option<u64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::As).current?;
    let used = proc_kb("/proc/self/status", "VmSize").unwrap_or(0);
    Some(limit.saturating_sub(used))
}

/// The smallest `memory.max` of this process's cgroup (v2) and its
/// ancestors, or v1's `memory.limit_in_bytes`.
fn cgroup_memory_max() -> Option<u64> {
    let read = |path: &Path| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        let text = text.trim();
        if text == "max" {
            return None;
        }
        // cgroup v1 writes "no limit" as a huge number near 2^63.
        text.parse().ok().filter(|&n| n < (1u64 << 62))
    };
    let mut smallest: Option<u64> = None;
    let mut consider = |n: Option<u64>| {
        if let Some(n) = n {
            smallest = Some(smallest.map_or(n, |s| s.min(n)));
        }
    };
    let root = Path::new("/sys/fs/cgroup");
    if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let relative = path.trim_start_matches('/');
            if controllers.is_empty() {
                // v2: the group and each ancestor up to the root.
                let mut dir = root.join(relative);
                loop {
                    consider(read(&dir.join("memory.max")));
                    if dir == root || !dir.pop() || !dir.starts_with(root) {
                        break;
                    }
                }
            } else if controllers.split(',').any(|c| c == "memory") {
                consider(read(
                    &root
                        .join("memory")
                        .join(relative)
                        .join("memory.limit_in_bytes"),
                ));
            }
        }
    }
    consider(read(&root.join("memory.max")));
    smallest
}

/// What kind of file a path names, for messages.
fn kind_of(file_type: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_fifo() {
        "a FIFO (named pipe)"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (after following
/// links), with its length. A FIFO is opened without blocking (no writer is
/// waited for), and then refused like a device, a directory or a socket:
/// such files have no length to check a header against, and may never end.
pub fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "not a regular file ({}); give a file",
                kind_of(&metadata.file_type())
            ),
        ));
    }
    Ok((file, metadata.len()))
}

/// Reads a regular file whole, refusing one larger than the budget (checked
/// on its length before reading, and again as it is read, in case it grows).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let too_large = |needed: u128| {
        let over = check(Some(needed)).expect_err("called only past the budget");
        std::io::Error::other(format!("the file {over}"))
    };
    if check(Some(u128::from(len))).is_err() {
        return Err(too_large(u128::from(len)));
    }
    let limit = limit();
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u128));
    }
    Ok(bytes)
}

/// Reads a regular UTF-8 text file whole, within the budget.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular(path)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4GB"), Ok(4 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("0.5"), Ok(0));
        assert_eq!(
            parse_size("16E"),
            Err("'16E' is larger than 2^64 bytes".into())
        );
        for bad in ["", "G", "1.2.3", "-1", "4X", "1e9", "four"] {
            assert!(
                parse_size(bad).unwrap_err().contains("is not a size"),
                "{bad}"
            );
        }
    }

    #[test]
    fn shape_products_are_exact_and_zero_axes_empty() {
        assert_eq!(elements(&[]), Some(1));
        assert_eq!(elements(&[1 << 62, 0]), Some(0));
        assert_eq!(elements(&[0, 1 << 62]), Some(0));
        assert_eq!(
            shape_bytes(&[1 << 62, 4], 4),
            Some(1u128 << 66),
            "no wrap to 0"
        );
        assert_eq!(shape_bytes(&[usize::MAX; 3], 4), None);
        assert_eq!(sum([Some(1), Some(2)]), Some(3));
        assert_eq!(sum([Some(1), None]), None);
    }

    #[test]
    fn over_budget_messages_name_the_size_and_the_budget() {
        let over = OverBudget {
            needed: Some(256_000_000_000_000),
            budget: 19_327_352_832,
            source: "--max-memory".into(),
            unaddressable: false,
        };
        assert_eq!(
            over.to_string(),
            "needs 256000000000000 bytes, more than the memory budget of 19327352832 bytes \
             (--max-memory)"
        );
        let default = OverBudget {
            needed: None,
            budget: 100,
            source: "80% of physical memory".into(),
            unaddressable: false,
        };
        assert!(default
            .to_string()
            .ends_with("(80% of physical memory; set another with --max-memory)"));
        // The default budget is something, and never past what can be addressed.
        assert!(limit() > 0 && limit() <= CEILING);
        // A shape of more than isize::MAX elements is refused even if empty.
        let empty = check_shape(&[usize::MAX, 0], 4).unwrap_err().to_string();
        assert!(empty.contains("no array of that shape"), "{empty}");
        assert_eq!(check_shape(&[1 << 40, 0], 4), Ok(0));
        // Past any budget but addressable: planned (a streamed output), not
        // allocated whole.
        assert_eq!(check_addressable(&[1 << 40, 4], 4), Ok(1 << 44));
        assert_eq!(
            check_addressable(&[2, 1 << 62], 4).unwrap_err().to_string(),
            "needs 36893488147419103232 bytes, more than any array can hold \
             (9223372036854775807 bytes)"
        );
    }

    #[test]
    fn fifos_and_devices_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        let err = open_regular(&fifo).unwrap_err().to_string();
        assert!(err.contains("not a regular file (a FIFO"), "{err}");
        let err = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("a character device"), "{err}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(read_regular(&file).unwrap(), b"abc");
    }
}
