//! Finding plugin libraries by layer name, reading their manifests without
//! running their code, and loading each once, from the very bytes that were
//! checked (and hashed, for a pinned layer).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use std::io::Read;
use std::os::fd::AsRawFd;

use abi_stable::abi_stability::abi_checking::check_layout_compatibility;
use abi_stable::std_types::RStr;
use layer_api::abi::{self, CoreTable, LayerError, LayerHandle, PluginTable, TableRef};
use layer_api::manifest::Manifest;
use thiserror::Error;

/// The environment variable holding extra plugin directories, colon-separated.
pub const PLUGIN_PATH_VAR: &str = "LAYER_PLUGIN_PATH";

/// Why a plugin could not be found or loaded.
#[derive(Debug, Clone, Error)]
pub enum PluginError {
    #[error(
        "invalid plugin name {}: names are letters, digits, '_' and '-', with no path \
         separators or '..'",
        quoted(.0)
    )]
    BadName(String),
    #[error(
        "no plugin named '{name}': looked for {file} in {}; plugins found there: {}",
        list_or_none(.searched.iter().map(|p| p.display().to_string())),
        list_or_none(.found.iter().cloned())
    )]
    NotFound {
        name: String,
        file: String,
        searched: Vec<PathBuf>,
        found: Vec<String>,
    },
    #[error("cannot read {}: {reason}", .path.display())]
    Read { path: PathBuf, reason: String },
    #[error(
        "{}; refused under --strict (chmod o-w {})",
        writable_text(.what, .path), .path.display()
    )]
    WritableByOthers { what: Writable, path: PathBuf },
    #[error("{}: not a loadable shared library: {reason}", .path.display())]
    NotALibrary { path: PathBuf, reason: String },
    #[error(
        "{}: a shared library, but not a layer plugin: it carries no plugin manifest (symbol \
         {}); it was not opened",
        .path.display(), abi::MANIFEST_SYMBOL
    )]
    NoManifest { path: PathBuf },
    #[error("{}: {reason}; it was not opened", .path.display())]
    BadManifest { path: PathBuf, reason: String },
    #[error(
        "{}: built for layer interface {}.{}, but this host speaks {}.{}; rebuild the plugin \
         against a layer-api of interface {}.x",
        .path.display(), .plugin.0, .plugin.1, abi::ABI_MAJOR, abi::ABI_MINOR, abi::ABI_MAJOR
    )]
    Incompatible { path: PathBuf, plugin: (u32, u32) },
    #[error(
        "{}: its interface table does not match layer interface {}.x as this host knows it \
         ({summary}): built against a modified copy of layer-abi? Rebuild it against a \
         layer-api of interface {}.x (--verbose shows the full report)",
        .path.display(), abi::ABI_MAJOR, abi::ABI_MAJOR
    )]
    Layout {
        path: PathBuf,
        summary: String,
        detail: String,
    },
    #[error(
        "{}: the plugin needs {}, which this host (interface {}.{}) does not have; it offers: \
         {}. Use a newer host",
        .path.display(),
        .missing.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(", "),
        abi::ABI_MAJOR, abi::ABI_MINOR,
        abi::CAPABILITIES.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    )]
    MissingCapability { path: PathBuf, missing: Vec<String> },
    #[error(
        "{}: built with panic = \"abort\", so a panic in it would end the host; it is not \
         loaded in-process. Rebuild it with panic = \"unwind\" (cargo's default), or run it \
         in a worker process with --isolate",
        .path.display()
    )]
    PanicAbort { path: PathBuf },
    #[error("{}: the plugin calls itself '{declared}', not '{expected}'", .path.display())]
    NameMismatch {
        path: PathBuf,
        declared: String,
        expected: String,
    },
    #[error("{}: the plugin failed to load: {message}", .path.display())]
    Init { path: PathBuf, message: String },
    /// What an isolation worker said when it checked or opened the library
    /// (the same text the host would give, path included).
    #[error("{0}")]
    InWorker(String),
    #[error(
        "plugin library {} has sha256 {actual}, but the model pins {expected}; it was not \
         loaded. If the new library is trusted, run `host lock` on the model to pin it",
        .path.display()
    )]
    Pin {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl PluginError {
    /// The full text behind a short message, for `--verbose`.
    pub fn detail(&self) -> Option<&str> {
        match self {
            PluginError::Layout { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

/// A plugin name as messages quote it: `'name'`, or Rust's escaped `"…"`
/// when it holds anything but printable ASCII (an escape sequence must not
/// reach the terminal raw).
fn quoted(name: &str) -> String {
    if name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        format!("'{name}'")
    } else {
        format!("{name:?}")
    }
}

/// What a plugin path writable by others is: the library itself, or the
/// directory holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writable {
    Library,
    Directory,
}

fn writable_text(what: &Writable, path: &Path) -> String {
    match what {
        Writable::Library => format!(
            "plugin library {} is writable by others: anyone could replace its code",
            path.display()
        ),
        Writable::Directory => format!(
            "plugin directory {} is writable by others: anyone could replace a plugin in it",
            path.display()
        ),
    }
}

/// Whether this process is an isolation worker, where a plugin built with
/// `panic = "abort"` may be opened: its panic ends the worker, which the
/// host reports, not the host.
static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// Lets plugins built with `panic = "abort"` load: for worker processes.
pub fn allow_panic_abort() {
    IN_WORKER.store(true, Ordering::Relaxed);
}

/// Whether a plugin library or directory writable by others is refused
/// (`--strict`) rather than warned about.
static STRICT: AtomicBool = AtomicBool::new(false);

/// Makes a plugin library, or the directory holding it, that others may
/// write an error instead of a warning (the command line's `--strict`).
pub fn set_strict(strict: bool) {
    STRICT.store(strict, Ordering::Relaxed);
}

/// Checks that others (users neither its owner nor in its group) cannot
/// change the library at `path`: neither the file (where a link leads) nor
/// the directory holding it, as named and where a link leads, may be
/// writable by others. A group-writable file is not flagged: with the
/// common umask 002 and per-user groups, every build would be. Only
/// that directory: a world-writable `/tmp` above a private one is harmless.
/// Each finding is a warning on stderr, once per path and process, or under
/// `--strict` an error.
fn check_not_writable_by_others(path: &Path) -> Result<(), PluginError> {
    use std::os::unix::fs::PermissionsExt;
    static WARNED: OnceLock<Mutex<HashSet<PathBuf>>> = OnceLock::new();
    let writable_by_others =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
    let mut findings = Vec::new();
    if writable_by_others(path) {
        findings.push((Writable::Library, path.to_path_buf()));
    }
    let named_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![named_dir];
    if let Some(real_dir) = path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let same = dirs[0].canonicalize().is_ok_and(|d| d == real_dir);
        if !same {
            dirs.push(real_dir);
        }
    }
    for dir in dirs {
        if writable_by_others(&dir) {
            findings.push((Writable::Directory, dir));
        }
    }
    for (what, path) in findings {
        if STRICT.load(Ordering::Relaxed) {
            return Err(PluginError::WritableByOthers { what, path });
        }
        let mut warned = WARNED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if warned.insert(path.clone()) {
            eprintln!(
                "warning: {} (chmod o-w {}; --strict refuses it)",
                writable_text(&what, &path),
                path.display()
            );
        }
    }
    Ok(())
}

fn list_or_none(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

/// A plugin library whose manifest was read and checked, without opening
/// it.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub path: PathBuf,
    pub manifest: Manifest,
    /// The size of the table's symbol in the file, if it has one.
    pub table_symbol_size: Option<u64>,
}

/// A loaded, checked plugin library. Libraries are never unloaded, so this
/// lives for the rest of the process.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    /// The interface version the plugin was built for, `major.minor`.
    pub interface_version: String,
    pub manifest: Manifest,
    /// The SHA-256 of the library bytes that were checked and loaded.
    pub sha256: String,
    pub table: TableRef,
    pub core: CoreTable,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("interface_version", &self.interface_version)
            .finish_non_exhaustive()
    }
}

impl LoadedPlugin {
    /// Creates a layer from its config (a JSON object).
    pub fn create(&self, config: &serde_json::Value) -> Result<LayerHandle, LayerError> {
        let text = config.to_string();
        (self.core.create)(RStr::from_str(&text)).into_result()
    }
}

/// Where plugins are looked for, in order.
#[derive(Debug, Clone)]
pub struct PluginRegistry {
    dirs: Vec<PathBuf>,
}

impl PluginRegistry {
    /// Each `--plugin-dir`, then the directories in `LAYER_PLUGIN_PATH`, then
    /// the directory of the running executable (so that `target/release/host`
    /// finds the plugins cargo built beside it).
    pub fn new(plugin_dirs: &[PathBuf]) -> PluginRegistry {
        let mut dirs: Vec<PathBuf> = plugin_dirs.to_vec();
        if let Some(path) = std::env::var_os(PLUGIN_PATH_VAR) {
            dirs.extend(std::env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
        {
            dirs.push(dir);
        }
        let mut unique = Vec::new();
        for dir in dirs {
            if !unique.contains(&dir) {
                unique.push(dir);
            }
        }
        PluginRegistry { dirs: unique }
    }

    /// The directories searched, in order.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Finds and loads the plugin called `name`: the first directory holding
    /// its library wins.
    pub fn resolve(&self, name: &str) -> Result<&'static LoadedPlugin, PluginError> {
        let path = self.locate(name)?;
        load(&path, Some(name), None)
    }

    /// The library file of the plugin called `name`, without loading it:
    /// the first directory holding it wins.
    pub fn locate(&self, name: &str) -> Result<PathBuf, PluginError> {
        let file = library_file_name(name)?;
        self.dirs
            .iter()
            .map(|d| d.join(&file))
            .find(|p| p.is_file())
            .ok_or_else(|| PluginError::NotFound {
                name: name.to_string(),
                file,
                searched: self.dirs.clone(),
                found: self.available_names(),
            })
    }

    /// The plugin names whose libraries sit in the search directories
    /// (without loading them), sorted and without repeats.
    pub fn available_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .library_paths()
            .iter()
            .filter_map(|p| plugin_name_of(p))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every library file in the search directories, directory by directory.
    pub fn library_paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut in_dir: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && plugin_name_of(p).is_some())
                .collect();
            in_dir.sort();
            paths.extend(in_dir);
        }
        paths
    }

    /// Reads the manifest of every library in the search directories,
    /// without opening any of them, for `host plugins`.
    pub fn discover(&self) -> Vec<(PathBuf, Result<Inspected, PluginError>)> {
        self.library_paths()
            .into_iter()
            .map(|path| {
                let inspected = inspect(&path);
                (path, inspected)
            })
            .collect()
    }
}

/// `mydense` → `libmydense.so` (on this platform), refusing names that could
/// reach outside the plugin directories.
pub fn library_file_name(name: &str) -> Result<String, PluginError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(PluginError::BadName(name.to_string()));
    }
    Ok(format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        name,
        std::env::consts::DLL_SUFFIX
    ))
}

fn plugin_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_prefix(std::env::consts::DLL_PREFIX)?
        .strip_suffix(std::env::consts::DLL_SUFFIX)?;
    (!stem.is_empty()).then(|| stem.to_string())
}

type LoadResult = Result<&'static LoadedPlugin, PluginError>;

/// The most a plugin library may weigh: it is read whole, hashed and
/// copied once before it is opened.
const MAX_LIBRARY_BYTES: u64 = 1 << 30;

/// Reads the library at `path` once, through one open handle.
fn read_library(path: &Path) -> Result<Vec<u8>, PluginError> {
    let read_error = |e: std::io::Error| PluginError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(PluginError::Read {
            path: path.to_path_buf(),
            reason: "not a regular file".to_string(),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_LIBRARY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_LIBRARY_BYTES {
        return Err(PluginError::Read {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_LIBRARY_BYTES} bytes; not a plugin library"),
        });
    }
    Ok(bytes)
}

/// The manifest bytes inside a library file's bytes, found through its
/// dynamic symbol table, without running anything.
fn manifest_bytes<'a>(
    path: &Path,
    bytes: &'a [u8],
) -> Result<(&'a [u8], Option<u64>), PluginError> {
    use object::{Object, ObjectSection, ObjectSymbol};
    let not_a_library = |reason: String| PluginError::NotALibrary {
        path: path.to_path_buf(),
        reason,
    };
    let file = object::File::parse(bytes).map_err(|e| not_a_library(e.to_string()))?;
    if file.kind() != object::ObjectKind::Dynamic {
        return Err(not_a_library(format!(
            "an object file of kind {:?}, not a shared library",
            file.kind()
        )));
    }
    // The table's symbol size bounds how much of the table the host reads,
    // whatever the table says of itself.
    let table_size = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok(abi::TABLE_SYMBOL) && s.is_definition())
        .map(|s| s.size());
    let symbol = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok(abi::MANIFEST_SYMBOL) && s.is_definition())
        .ok_or_else(|| PluginError::NoManifest {
            path: path.to_path_buf(),
        })?;
    let bad = |reason: &str| PluginError::BadManifest {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let section = symbol
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .ok_or_else(|| bad("its manifest symbol lies in no section"))?;
    let data = section
        .data()
        .map_err(|_| bad("its manifest's section cannot be read"))?;
    let offset = symbol
        .address()
        .checked_sub(section.address())
        .and_then(|o| usize::try_from(o).ok())
        .ok_or_else(|| bad("its manifest symbol lies outside its section"))?;
    let size = usize::try_from(symbol.size()).map_err(|_| bad("its manifest is too large"))?;
    let manifest = offset
        .checked_add(size)
        .and_then(|end| data.get(offset..end))
        .ok_or_else(|| bad("its manifest symbol lies outside its section's data"))?;
    Ok((manifest, table_size))
}

/// Reads and checks the manifest of the library at `path` without opening
/// it: everything the host can know about a plugin before running its code.
pub fn inspect(path: &Path) -> Result<Inspected, PluginError> {
    let bytes = read_library(path)?;
    inspect_bytes(path, &bytes, false)
}

fn inspect_bytes(path: &Path, bytes: &[u8], allow_abort: bool) -> Result<Inspected, PluginError> {
    let (manifest_bytes, table_symbol_size) = manifest_bytes(path, bytes)?;
    let manifest = Manifest::parse(manifest_bytes).map_err(|reason| PluginError::BadManifest {
        path: path.to_path_buf(),
        reason,
    })?;
    check_manifest(path, &manifest, allow_abort)?;
    Ok(Inspected {
        path: path.to_path_buf(),
        manifest,
        table_symbol_size,
    })
}

/// The checks a manifest must pass before its library is opened.
fn check_manifest(path: &Path, m: &Manifest, allow_abort: bool) -> Result<(), PluginError> {
    if m.abi.0 != abi::ABI_MAJOR {
        return Err(PluginError::Incompatible {
            path: path.to_path_buf(),
            plugin: m.abi,
        });
    }
    let missing: Vec<String> = m
        .needs
        .iter()
        .filter(|need| !abi::CAPABILITIES.iter().any(|(c, _)| c == need))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(PluginError::MissingCapability {
            path: path.to_path_buf(),
            missing,
        });
    }
    if m.abi_stable != abi::ABI_STABLE_VERSION {
        return Err(PluginError::BadManifest {
            path: path.to_path_buf(),
            reason: format!(
                "it was built with abi_stable {}, whose layout descriptions this host (built \
                 with abi_stable {}) cannot read; rebuild it against a layer-api of interface \
                 {}.x",
                m.abi_stable,
                abi::ABI_STABLE_VERSION,
                abi::ABI_MAJOR
            ),
        });
    }
    match m.panic.as_str() {
        "unwind" => {}
        // A panic in a worker ends only the worker.
        "abort" if allow_abort => {}
        "abort" => {
            return Err(PluginError::PanicAbort {
                path: path.to_path_buf(),
            })
        }
        other => {
            return Err(PluginError::BadManifest {
                path: path.to_path_buf(),
                reason: format!(
                "its manifest gives panic strategy \"{other}\"; expected \"unwind\" or \"abort\""
            ),
            })
        }
    }
    if plugin_name_of(path).is_some_and(|file_name| file_name != m.name) {
        return Err(PluginError::NameMismatch {
            path: path.to_path_buf(),
            declared: m.name.clone(),
            expected: plugin_name_of(path).unwrap_or_default(),
        });
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Loads the plugin library at `path` (found by [`PluginRegistry::locate`],
/// or named by the user) at most once per process; later calls get the same
/// result, error included. With `expected_name`, the plugin must call itself
/// that; with `pin`, the bytes loaded must have that SHA-256.
pub fn load(
    path: &Path,
    expected_name: Option<&str>,
    pin: Option<&str>,
) -> Result<&'static LoadedPlugin, PluginError> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, LoadResult>>> = OnceLock::new();
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = match loaded.get(&key) {
        Some(result) => result.clone()?,
        None => {
            // A pinned library that does not match is refused without being
            // opened, and without caching the refusal as the file's result.
            let result = load_uncached(path, pin).map(|p| &*Box::leak(Box::new(p)));
            if matches!(result, Err(PluginError::Pin { .. })) {
                return result;
            }
            loaded.insert(key, result.clone());
            result?
        }
    };
    if let Some(expected) = expected_name {
        if result.name != expected {
            return Err(PluginError::NameMismatch {
                path: path.to_path_buf(),
                declared: result.name.clone(),
                expected: expected.to_string(),
            });
        }
    }
    if let Some(pin) = pin {
        if result.sha256 != pin {
            return Err(PluginError::Pin {
                path: path.to_path_buf(),
                expected: pin.to_string(),
                actual: result.sha256.clone(),
            });
        }
    }
    Ok(result)
}

/// A plugin library read and checked, without being opened: what the host
/// knows of a plugin that runs in a worker process, where the worker opens
/// the library after checking that its bytes have this SHA-256.
#[derive(Debug, Clone)]
pub struct CheckedPlugin {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub sha256: String,
}

/// Reads the library at `path` once and makes every check that needs no
/// code of it to run (see [`load`]), without opening it.
pub fn check(
    path: &Path,
    expected_name: Option<&str>,
    pin: Option<&str>,
) -> Result<CheckedPlugin, PluginError> {
    // Checked for a worker, where a panic that aborts ends only the worker.
    let (_, sha256, inspected) = read_and_check(path, pin, true)?;
    if let Some(expected) = expected_name {
        if inspected.manifest.name != expected {
            return Err(PluginError::NameMismatch {
                path: path.to_path_buf(),
                declared: inspected.manifest.name.clone(),
                expected: expected.to_string(),
            });
        }
    }
    Ok(CheckedPlugin {
        path: path.to_path_buf(),
        manifest: inspected.manifest,
        sha256,
    })
}

/// Reads the library once and checks its permissions, pin, manifest and
/// table symbol: the bytes, their SHA-256 and what the manifest says.
fn read_and_check(
    path: &Path,
    pin: Option<&str>,
    allow_abort: bool,
) -> Result<(Vec<u8>, String, Inspected), PluginError> {
    check_not_writable_by_others(path)?;
    let bytes = read_library(path)?;
    let sha256 = sha256_hex(&bytes);
    // The pin first: a file that is not the one pinned is not even parsed.
    if let Some(pin) = pin {
        if sha256 != pin {
            return Err(PluginError::Pin {
                path: path.to_path_buf(),
                expected: pin.to_string(),
                actual: sha256,
            });
        }
    }
    let inspected = inspect_bytes(path, &bytes, allow_abort)?;
    // The table must be in the file, and hold at least the 1.0 core, before
    // the library is opened.
    match inspected.table_symbol_size {
        Some(n) if n >= abi::CORE_END as u64 => {}
        found => {
            return Err(PluginError::Init {
                path: path.to_path_buf(),
                message: match found {
                    None => format!(
                        "its manifest is there but its table (symbol {}) is not; it was not \
                         opened",
                        abi::TABLE_SYMBOL
                    ),
                    Some(n) => format!(
                        "its table (symbol {}) is {n} bytes long, shorter than interface 1.0's \
                         core ({} bytes); it was not opened",
                        abi::TABLE_SYMBOL,
                        abi::CORE_END
                    ),
                },
            })
        }
    }
    Ok((bytes, sha256, inspected))
}

/// Reads the library once, checks it ([`read_and_check`]), copies the very
/// bytes that were checked into a sealed in-memory file and opens that: a
/// file swapped or rewritten at `path` after the read is never what runs.
fn load_uncached(path: &Path, pin: Option<&str>) -> Result<LoadedPlugin, PluginError> {
    let (bytes, sha256, inspected) = read_and_check(path, pin, IN_WORKER.load(Ordering::Relaxed))?;
    let sealed =
        crate::sealed::sealed_file(&format!("layer-plugin-{}", inspected.manifest.name), &bytes)
            .map_err(|e| PluginError::Init {
                path: path.to_path_buf(),
                message: format!("cannot make a sealed in-memory copy to load: {e}"),
            })?;
    let fd_path = format!("/proc/self/fd/{}", sealed.as_raw_fd());
    // SAFETY: opening a library runs its initializers. The user chose this
    // file by putting it in a plugin directory, and its manifest (and pin)
    // passed; the bytes opened are exactly the bytes checked.
    let library =
        unsafe { libloading::Library::new(&fd_path) }.map_err(|e| PluginError::NotALibrary {
            path: path.to_path_buf(),
            reason: e.to_string().replace(&fd_path, "the library"),
        })?;
    // SAFETY: the manifest said interface 1.x, whose table symbol is a
    // `PluginTable` static; only its address is taken here.
    let table_ptr: Result<*const PluginTable, _> = unsafe {
        library
            .get::<*const PluginTable>(abi::TABLE_SYMBOL.as_bytes())
            .map(|symbol| *symbol)
    };
    let table_ptr = match table_ptr {
        Ok(ptr) if !ptr.is_null() => ptr,
        _ => {
            return Err(PluginError::Init {
                path: path.to_path_buf(),
                message: format!(
                    "its manifest is there but its table (symbol {}) is not",
                    abi::TABLE_SYMBOL
                ),
            })
        }
    };
    // The table and everything it points to are 'static: never unload.
    std::mem::forget(library);
    // Keep the descriptor open for the life of the process: the dynamic
    // loader knows the library by the name "/proc/self/fd/N", and would
    // hand back this library for a later plugin opened under a reused N.
    std::mem::forget(sealed);

    // SAFETY: the symbol of a library that stays loaded, whose manifest said
    // interface 1.x.
    let symbol_size = inspected
        .table_symbol_size
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let table =
        unsafe { TableRef::new(table_ptr, symbol_size) }.map_err(|message| PluginError::Init {
            path: path.to_path_buf(),
            message,
        })?;
    let manifest = inspected.manifest;
    if table.version() != manifest.abi {
        return Err(PluginError::Init {
            path: path.to_path_buf(),
            message: format!(
                "its manifest says interface {}.{} but its table says {}.{}",
                manifest.abi.0,
                manifest.abi.1,
                table.version().0,
                table.version().1
            ),
        });
    }
    // A plugin built against layer-api 1.0, when the core types were
    // defined in layer-api rather than layer-abi, describes the same layout
    // under that package's name: accepted as well.
    check_layout_compatibility(abi::CORE_LAYOUT, table.core_layout())
        .or_else(|errors| {
            check_layout_compatibility(layer_api::core_1_0::CORE_LAYOUT, table.core_layout())
                .map_err(|_| errors)
        })
        .map_err(|errors| {
            let detail = errors.to_string();
            let summary = layout_summary(&detail);
            PluginError::Layout {
                path: path.to_path_buf(),
                summary,
                detail,
            }
        })?;
    Ok(LoadedPlugin {
        path: path.to_path_buf(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        description: manifest.description.clone(),
        interface_version: format!("{}.{}", manifest.abi.0, manifest.abi.1),
        sha256,
        core: table.core(),
        table,
        manifest,
    })
}

/// The gist of abi_stable's layout report (which can run to a thousand
/// lines): its last error and the expected and found values after it, as
/// `incompatible type size: expected 56, found 72`.
fn layout_summary(detail: &str) -> String {
    let lines: Vec<&str> = detail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let Some(at) = lines.iter().rposition(|l| l.starts_with("Error:")) else {
        return "layouts differ".to_string();
    };
    let mut summary = lines[at].trim_start_matches("Error:").trim().to_string();
    // abi_stable writes `Expected:` and `Found:` alone, the value on the
    // next line; values of a line or two (a size, a name) are worth showing.
    for (label, word) in [("Expected:", "expected"), ("Found:", "found")] {
        let value = lines[at + 1..]
            .iter()
            .position(|l| *l == label)
            .and_then(|i| lines.get(at + 2 + i));
        if let Some(value) = value.filter(|v| v.len() <= 60 && !v.ends_with(':')) {
            summary.push_str(&format!(", {word} {value}"));
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_library_files_and_paths_are_refused() {
        assert_eq!(library_file_name("mydense").unwrap(), "libmydense.so");
        assert_eq!(
            library_file_name("tensor_reduction").unwrap(),
            "libtensor_reduction.so"
        );
        for bad in ["", "../evil", "a/b", "a\\b", "..", "x.y", "caf\u{e9}"] {
            assert!(
                matches!(library_file_name(bad), Err(PluginError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_refused_name_is_quoted_with_its_escapes_shown() {
        let err = library_file_name("x\u{1b}[2J\u{202e}")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(r#"invalid plugin name "x\u{1b}[2J\u{202e}": names are"#),
            "{err}"
        );
        let err = library_file_name("../a").unwrap_err().to_string();
        assert!(
            err.starts_with("invalid plugin name '../a': names are"),
            "{err}"
        );
    }

    #[test]
    fn a_layout_report_is_summed_up_by_its_last_error() {
        let report = "Layout mismatch\n   field: data\n\nError:incompatible type size\n\
                      Expected:\n56\nFound:\n72\n";
        assert_eq!(
            layout_summary(report),
            "incompatible type size, expected 56, found 72"
        );
        assert_eq!(layout_summary("nothing useful"), "layouts differ");
    }

    #[test]
    fn plugin_names_come_from_library_file_names() {
        assert_eq!(
            plugin_name_of(Path::new("/x/libmydense.so")).as_deref(),
            Some("mydense")
        );
        assert_eq!(plugin_name_of(Path::new("/x/libhost.rlib")), None);
        assert_eq!(plugin_name_of(Path::new("/x/mydense.so")), None);
        assert_eq!(plugin_name_of(Path::new("/x/lib.so")), None);
    }

    #[test]
    fn a_missing_plugin_names_the_places_searched() {
        let registry = PluginRegistry {
            dirs: vec![
                PathBuf::from("/nonexistent/a"),
                PathBuf::from("/nonexistent/b"),
            ],
        };
        let err = registry.resolve("mydense").unwrap_err().to_string();
        assert_eq!(
            err,
            "no plugin named 'mydense': looked for libmydense.so in /nonexistent/a, \
             /nonexistent/b; plugins found there: (none)"
        );
    }
}
