//! Finding plugin libraries by layer name, loading them once, and checking
//! that they speak this host's interface version before trusting them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use abi_stable::library::{AbiHeaderRef, LibraryError, ROOT_MODULE_LOADER_NAME_WITH_NUL};
use abi_stable::std_types::RStr;
use layer_api::abi::{LayerBox, LayerError, PluginModuleRef};
use thiserror::Error;

/// The environment variable holding extra plugin directories, colon-separated.
pub const PLUGIN_PATH_VAR: &str = "LAYER_PLUGIN_PATH";

/// Why a plugin could not be found or loaded.
#[derive(Debug, Clone, Error)]
pub enum PluginError {
    #[error(
        "invalid plugin name '{0}': names are letters, digits, '_' and '-', with no path \
         separators or '..'"
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
    #[error("{}: not a loadable shared library: {reason}", .path.display())]
    NotALibrary { path: PathBuf, reason: String },
    #[error(
        "{}: a shared library, but not a layer plugin (it exports no layer-api root module)",
        .path.display()
    )]
    NotAPlugin { path: PathBuf },
    #[error(
        "{}: built against layer-api interface {plugin_version}, but this host speaks \
         {host_version}{note}; rebuild the plugin against layer-api {host_version} \
         (--verbose shows the full report)",
        .path.display()
    )]
    Incompatible {
        path: PathBuf,
        plugin_version: String,
        host_version: String,
        note: String,
        detail: String,
    },
    #[error("{}: the plugin calls itself '{declared}', not '{expected}'", .path.display())]
    NameMismatch {
        path: PathBuf,
        declared: String,
        expected: String,
    },
    #[error("{}: the plugin failed to initialize: {message}", .path.display())]
    Init { path: PathBuf, message: String },
}

impl PluginError {
    /// The full text behind a short message, for `--verbose`.
    pub fn detail(&self) -> Option<&str> {
        match self {
            PluginError::Incompatible { detail, .. } => Some(detail),
            _ => None,
        }
    }
}

fn list_or_none(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "(none)".to_string()
    } else {
        items.join(", ")
    }
}

/// A loaded, checked plugin library. Libraries are never unloaded, so this
/// lives for the rest of the process.
pub struct LoadedPlugin {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub description: String,
    pub interface_version: String,
    module: PluginModuleRef,
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
    pub fn create(&self, config: &serde_json::Value) -> Result<LayerBox, LayerError> {
        let text = config.to_string();
        (self.module.create())(RStr::from_str(&text)).into_result()
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
        load(&path, Some(name))
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

    /// Loads every library in the search directories, for `host plugins`.
    pub fn discover(&self) -> Vec<(PathBuf, Result<&'static LoadedPlugin, PluginError>)> {
        self.library_paths()
            .into_iter()
            .map(|path| {
                let loaded = load(&path, None);
                (path, loaded)
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

/// Loads the plugin library at `path` (found by [`PluginRegistry::locate`],
/// or named by the user) at most once per process; later calls get the same
/// result, error included. With `expected_name`, the plugin must call itself
/// that.
pub fn load(
    path: &Path,
    expected_name: Option<&str>,
) -> Result<&'static LoadedPlugin, PluginError> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, LoadResult>>> = OnceLock::new();
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = loaded
        .entry(key)
        .or_insert_with(|| load_uncached(path).map(|p| &*Box::leak(Box::new(p))))
        .clone()?;
    if let Some(expected) = expected_name {
        if result.name != expected {
            return Err(PluginError::NameMismatch {
                path: path.to_path_buf(),
                declared: result.name.clone(),
                expected: expected.to_string(),
            });
        }
    }
    Ok(result)
}

fn load_uncached(path: &Path) -> Result<LoadedPlugin, PluginError> {
    // SAFETY: opening a library runs its initializers. The user chose this
    // file by putting it in a plugin directory; that is the trust decision.
    let library =
        unsafe { libloading::Library::new(path) }.map_err(|e| PluginError::NotALibrary {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    // SAFETY: abi_stable libraries export this symbol as a `LibHeader` static,
    // whose first field is the `AbiHeader`; `AbiHeaderRef` is a transparent
    // reference to it, so reading the symbol's address as one is what
    // abi_stable itself does. `upgrade` then checks the header before use.
    let header: Result<AbiHeaderRef, _> = unsafe {
        library
            .get::<AbiHeaderRef>(ROOT_MODULE_LOADER_NAME_WITH_NUL.as_bytes())
            .map(|symbol| *symbol)
    };
    let Ok(header) = header else {
        return Err(PluginError::NotAPlugin {
            path: path.to_path_buf(),
        });
    };
    // The references into the library are 'static: never unload it.
    std::mem::forget(library);

    let host_version = layer_api::INTERFACE_VERSION.to_string();
    let incompatible =
        |plugin_version: String, note: &str, detail: String| PluginError::Incompatible {
            path: path.to_path_buf(),
            plugin_version,
            host_version: host_version.clone(),
            note: note.to_string(),
            detail,
        };
    let lib_header = header.upgrade().map_err(|e| {
        incompatible(
            "(unknown)".to_string(),
            " (its abi_stable runtime is incompatible with the host's)",
            e.to_string(),
        )
    })?;
    let plugin_version = lib_header.version_strings().version.to_string();
    let module = lib_header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| match e {
            LibraryError::IncompatibleVersionNumber { .. } => {
                incompatible(plugin_version.clone(), "", e.to_string())
            }
            LibraryError::AbiInstability(_) => incompatible(
                plugin_version.clone(),
                if plugin_version == host_version {
                    " with a different layout (a modified copy of layer-api?)"
                } else {
                    ""
                },
                e.to_string(),
            ),
            other => PluginError::Init {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })?;
    Ok(LoadedPlugin {
        path: path.to_path_buf(),
        name: module.name().to_string(),
        version: module.version().to_string(),
        description: module.description().to_string(),
        interface_version: plugin_version,
        module,
    })
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
