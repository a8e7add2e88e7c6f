//! Writing an output file so that a failed or interrupted command never
//! leaves a partial file or clobbers an existing one, without harming
//! whatever else stands at the path.
//!
//! What a path names decides how it is written:
//!
//! - A regular file, existing or not, is written whole or not at all: the
//!   content goes to a temporary file beside it, `.NAME.<pid>.<random>.tmp`,
//!   which replaces it by a rename once everything was written and synced.
//!   An existing file keeps its mode, owner and group (where the process may
//!   set them); a new one gets the mode the umask leaves of 0666, as any
//!   program's `open` would. An existing file whose owner has no write bit
//!   is refused, naming its mode, even for root.
//! - A symbolic link is followed: its target is written as above, and the
//!   link stays a link (a dangling link's target is created).
//! - A character or block device, a FIFO, a socket, or `/proc/self/fd/N`
//!   naming one, is opened and written in place, as numpy's `np.save` does;
//!   that cannot be atomic, and the node itself is never replaced.
//!
//! A temporary file is removed on error, and on SIGINT or SIGTERM: the first
//! temporary file installs a handler that removes every pending one, says
//! so in one `error:` line and exits with 130 or 143. One left behind by a
//! process that was killed outright (SIGKILL) is removed by the next write
//! into its directory, once no process of that id is running.

use std::fs::{File, Metadata};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, Once};

use crate::error::Error;

/// Writes `path` with `write` (see the module documentation).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), Error> {
    write_atomically_or_fail(path, |w| write(w).map_err(|e| write_error(path, e)))
}

/// Writes `path` with `write` (see the module documentation), when
/// producing the content can fail for other reasons than writing it (a
/// layer's error in the middle of a streamed run): on any error a regular
/// file is left as it was.
pub fn write_atomically_or_fail(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<(), Error>,
) -> Result<(), Error> {
    let io_error = |source: std::io::Error| write_error(path, source);
    match resolve(path).map_err(io_error)? {
        Target::InPlace => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .map_err(io_error)?;
            let mut writer = BufWriter::new(file);
            write(&mut writer)?;
            writer.flush().map_err(io_error)
        }
        Target::Replace { real, existing } => {
            let dir = parent_dir(&real);
            remove_stale_temporaries(dir);
            // Never more open than the file it replaces, even for a moment:
            // 0600 until that file's owner and mode are copied.
            let mode = if existing.is_some() { 0o600 } else { 0o666 };
            let temp = Temporary::create(&real, path, mode).map_err(io_error)?;
            if let Some(existing) = &existing {
                keep_owner_and_mode(temp.file(), existing).map_err(io_error)?;
            }
            {
                let mut writer = BufWriter::new(temp.file());
                write(&mut writer)?;
                writer.flush().map_err(io_error)?;
            }
            temp.file().sync_all().map_err(io_error)?;
            temp.persist(&real).map_err(io_error)
        }
    }
}

/// Checks, before anything is computed, that `path` may be written: not a
/// directory, and not a file its owner may not write. Writing checks the
/// same again.
pub fn check_writable(path: &Path) -> Result<(), Error> {
    let checked = match resolve(path) {
        // A new file: its directory must exist.
        Ok(Target::Replace {
            real,
            existing: None,
        }) => std::fs::metadata(parent_dir(&real)).map(|_| ()),
        other => other.map(|_| ()),
    };
    checked.map_err(|source| write_error(path, source))
}

/// Whether `a` and `b` name the same existing file (same device and inode,
/// links followed). Character devices (a terminal given as both
/// `/dev/stdin` and `/dev/stdout`) never count as the same.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => {
            a.dev() == b.dev() && a.ino() == b.ino() && !a.file_type().is_char_device()
        }
        _ => false,
    }
}

/// Whether two output paths name one file, existing or not: the same file
/// now, or the same name in the same directory (links resolved).
pub fn names_same_file(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some((dir.canonicalize().ok()?, p.file_name()?.to_os_string()))
    };
    same_file(a, b) || matches!((resolved(a), resolved(b)), (Some(x), Some(y)) if x == y)
}

/// Refuses writing `output` (given as `flag`) when it is the same file as
/// one of `others` (each with its role, e.g. "the model file"), naming both.
pub fn refuse_overwriting(
    flag: &str,
    output: &Path,
    others: &[(&Path, &str)],
) -> Result<(), Error> {
    match others.iter().find(|(other, _)| same_file(output, other)) {
        None => Ok(()),
        Some((other, role)) => {
            let also = if *other == output {
                String::new()
            } else {
                format!(" ({})", other.display())
            };
            Err(Error::Usage(format!(
                "{flag} {} is {role}{also}; writing there would replace it: choose another file",
                output.display()
            )))
        }
    }
}

/// An error writing `path`.
pub fn write_error(path: &Path, source: std::io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// How a path is written.
enum Target {
    /// Opened and written where it is: a device, a FIFO, a socket, or a
    /// file that no directory entry names any more (`/proc/self/fd/N` of a
    /// deleted file).
    InPlace,
    /// Replaced by a temporary file: the regular file `real` (links
    /// resolved), `existing` when it exists.
    Replace {
        real: PathBuf,
        existing: Option<Metadata>,
    },
}

fn resolve(path: &Path) -> std::io::Result<Target> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            if meta.is_dir() {
                return Err(std::io::Error::other("it is a directory"));
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o200 == 0 {
                return Err(std::io::Error::other(format!(
                    "it is read-only (mode {mode:04o}); make it writable (chmod u+w) or \
                     write elsewhere"
                )));
            }
            if !meta.is_file() {
                return Ok(Target::InPlace);
            }
            // The file's own name, links resolved; unless that is not the
            // same file (a deleted file reached through /proc/self/fd/N).
            match std::fs::canonicalize(path) {
                Ok(real)
                    if std::fs::metadata(&real)
                        .is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) =>
                {
                    Ok(Target::Replace {
                        real,
                        existing: Some(meta),
                    })
                }
                _ => Ok(Target::InPlace),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Target::Replace {
            real: dangling_target(path)?,
            existing: None,
        }),
        Err(e) => Err(e),
    }
}

/// Where a path that names nothing existing leads: itself, or the end of
/// the chain of (dangling) symbolic links it starts.
fn dangling_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut at = path.to_path_buf();
    // As the kernel's limit on links followed in one lookup.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = std::fs::read_link(&at)?;
                at = parent_dir(&at).join(link);
            }
            _ => return Ok(at),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Gives the temporary file the mode, owner and group of the file it
/// replaces. The owner and group are kept where the process may set them
/// (root, or a group the user is in); the mode always.
fn keep_owner_and_mode(file: &File, existing: &Metadata) -> std::io::Result<()> {
    // Before the mode: changing the owner clears the set-user-ID bit.
    let _ = std::os::unix::fs::fchown(file, Some(existing.uid()), Some(existing.gid()))
        .or_else(|_| std::os::unix::fs::fchown(file, None, Some(existing.gid())));
    file.set_permissions(std::fs::Permissions::from_mode(
        existing.permissions().mode() & 0o7777,
    ))
}

/// The random part of a temporary file's name: as many letters and digits.
const RANDOM_CHARS: usize = 6;
/// Keeps `.NAME.<pid>.<random>.tmp` within the usual 255-byte name limit.
const MAX_NAME_PART: usize = 200;

/// The temporary files this process is writing, removed by the signal
/// handler: (temporary file, the output as the user named it).
static PENDING: Mutex<Vec<(PathBuf, PathBuf)>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<(PathBuf, PathBuf)>> {
    PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A temporary file beside its target, known to the signal handler from
/// before it exists until it is renamed or removed.
struct Temporary {
    file: Option<tempfile::NamedTempFile>,
}

impl Temporary {
    /// Creates the temporary file for `real` with `mode` less the umask.
    fn create(real: &Path, shown: &Path, mode: u32) -> std::io::Result<Temporary> {
        install_signal_handler();
        let name = real.file_name().map(OsStrExt::as_bytes).unwrap_or(b"out");
        let name = &name[..name.len().min(MAX_NAME_PART)];
        let mut prefix = b".".to_vec();
        prefix.extend_from_slice(name);
        prefix.extend_from_slice(format!(".{}.", std::process::id()).as_bytes());
        // Held while the file is created: a signal handled meanwhile waits
        // and then finds it listed.
        let mut pending = pending();
        let file = tempfile::Builder::new()
            .prefix(&std::ffi::OsString::from_vec(prefix))
            .suffix(".tmp")
            .rand_bytes(RANDOM_CHARS)
            // A new file's is 0666 less the umask, as any program's (not
            // tempfile's own 0600).
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(parent_dir(real))?;
        pending.push((file.path().to_path_buf(), shown.to_path_buf()));
        Ok(Temporary { file: Some(file) })
    }

    fn file(&self) -> &File {
        self.file
            .as_ref()
            .expect("present until persisted")
            .as_file()
    }

    /// Renames the temporary file onto `real`.
    fn persist(mut self, real: &Path) -> std::io::Result<()> {
        let file = self.file.take().expect("persisted once");
        let mut pending = pending();
        let temp = file.path().to_path_buf();
        // On failure the returned file is dropped, and so removed, here.
        let result = file.persist(real).map(|_| ()).map_err(|e| e.error);
        pending.retain(|(p, _)| *p != temp);
        result
    }
}

impl Drop for Temporary {
    /// On error: the temporary file is removed.
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let mut pending = pending();
            let temp = file.path().to_path_buf();
            drop(file);
            pending.retain(|(p, _)| *p != temp);
        }
    }
}

/// Installs, once, a handler for SIGINT and SIGTERM that removes the
/// pending temporary files and ends the process with one `error:` line and
/// status 128 + the signal's number. Until then the signals keep their
/// default action (nothing of the host's is on disk to clean up).
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let (ready, installed) = std::sync::mpsc::channel();
        // The signals are registered on the thread that waits for them, so
        // that they are never caught with no thread to act on them.
        let spawned = std::thread::Builder::new()
            .name("host-signals".into())
            .spawn(move || {
                let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
                    Ok(signals) => signals,
                    Err(_) => {
                        let _ = ready.send(());
                        return;
                    }
                };
                let _ = ready.send(());
                if let Some(signal) = signals.forever().next() {
                    interrupted(signal);
                }
            });
        if spawned.is_ok() {
            let _ = installed.recv();
        }
    });
}

fn interrupted(signal: i32) -> ! {
    // Held to the end: no temporary file is renamed or created after this.
    let pending = pending();
    let mut kept = Vec::new();
    for (temp, shown) in pending.iter() {
        let _ = std::fs::remove_file(temp);
        kept.push(shown.display().to_string());
    }
    let name = if signal == signal_hook::consts::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    };
    if kept.is_empty() {
        eprintln!("error: interrupted by {name}");
    } else {
        eprintln!(
            "error: interrupted by {name}; nothing was written to {} (the temporary file was \
             removed)",
            kept.join(", ")
        );
    }
    std::process::exit(128 + signal)
}

/// The process id in a temporary file's name, `.NAME.<pid>.<random>.tmp`.
fn temporary_owner(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(b".")?.strip_suffix(b".tmp")?;
    let dot = rest.iter().rposition(|&b| b == b'.')?;
    let (rest, random) = (&rest[..dot], &rest[dot + 1..]);
    if random.len() != RANDOM_CHARS || !random.iter().all(u8::is_ascii_alphanumeric) {
        return None;
    }
    let dot = rest.iter().rposition(|&b| b == b'.')?;
    let (target, pid) = (&rest[..dot], &rest[dot + 1..]);
    if target.is_empty() || pid.is_empty() || !pid.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(pid).ok()?.parse().ok()
}

/// Removes from `dir` the temporary files of writers that are gone (killed
/// before they could clean up): those whose process id no running process
/// has. Nothing is removed where /proc cannot tell.
fn remove_stale_temporaries(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let own = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = temporary_owner(name.as_bytes()) else {
            continue;
        };
        let alive = pid == own || Path::new("/proc").join(pid.to_string()).exists();
        if !alive && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomically(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        write_atomically(&path, |w| w.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn the_temporary_file_is_named_with_the_process_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y.npy");
        let mut seen = Vec::new();
        write_atomically(&path, |w| {
            seen = names_in(dir.path());
            w.write_all(b"x")
        })
        .unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let prefix = format!(".y.npy.{}.", std::process::id());
        assert!(seen[0].starts_with(&prefix), "{seen:?}");
        assert_eq!(
            temporary_owner(seen[0].as_bytes()),
            Some(std::process::id())
        );
        assert!(!pending().iter().any(|(_, shown)| *shown == path));
        assert_eq!(names_in(dir.path()), ["y.npy"]);
    }

    #[test]
    fn a_file_keeps_its_mode_and_a_new_one_gets_the_umasks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kept");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&path, |w| w.write_all(b"new")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);

        let new = dir.path().join("new");
        write_atomically(&new, |w| w.write_all(b"new")).unwrap();
        let mode = std::fs::metadata(&new).unwrap().permissions().mode() & 0o7777;
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status
            .lines()
            .find_map(|l| l.strip_prefix("Umask:"))
            .map(|m| u32::from_str_radix(m.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(mode, 0o666 & !umask, "umask {umask:o}");
    }

    #[test]
    fn a_read_only_file_is_refused_naming_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = write_atomically(&path, |w| w.write_all(b"new")).unwrap_err();
        assert!(
            err.to_string().contains("it is read-only (mode 0444)"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(check_writable(&path).is_err());
    }

    #[test]
    fn a_symlink_is_written_through_and_stays_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("real", &link).unwrap();
        write_atomically(&link, |w| w.write_all(b"new")).unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");

        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("created", &dangling).unwrap();
        write_atomically(&dangling, |w| w.write_all(b"made")).unwrap();
        assert!(std::fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(dir.path().join("created")).unwrap(), b"made");
    }

    #[test]
    fn temporary_names_are_parsed_strictly() {
        assert_eq!(temporary_owner(b".y.npy.123.aB3xYz.tmp"), Some(123));
        assert_eq!(temporary_owner(b".y.123.aB3xYz.tmp"), Some(123));
        assert_eq!(temporary_owner(b"..123.aB3xYz.tmp"), None);
        assert_eq!(temporary_owner(b".y.npy.12a.aB3xYz.tmp"), None);
        assert_eq!(temporary_owner(b".y.npy.123.aB3x.tmp"), None);
        assert_eq!(temporary_owner(b"y.npy.123.aB3xYz.tmp"), None);
        assert_eq!(temporary_owner(b".y.npy.123.aB3xYz.tmpx"), None);
    }

    #[test]
    fn stale_temporaries_of_dead_processes_are_removed_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // Above any pid_max Linux allows (2^22).
        let dead = format!(".y.npy.{}.aaaaaa.tmp", 9_999_999);
        let live = format!(".y.npy.{}.bbbbbb.tmp", std::process::id());
        let other = ".y.npy.tmp".to_string();
        for name in [&dead, &live, &other] {
            std::fs::write(dir.path().join(name), b"partial").unwrap();
        }
        write_atomically(&dir.path().join("z.npy"), |w| w.write_all(b"z")).unwrap();
        let mut expected = vec![live, other, "z.npy".to_string()];
        expected.sort();
        assert_eq!(names_in(dir.path()), expected);
    }
}
