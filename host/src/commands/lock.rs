//! `host lock`: pins each layer (each node of a graph) to the SHA-256 of
//! the plugin library it resolves to, in the model file itself.

use std::path::PathBuf;

use crate::error::Error;
use crate::pin;
use crate::print::print_stdout;
use crate::registry::PluginRegistry;

/// What `host lock` was asked to do.
pub struct LockOptions {
    pub model: PathBuf,
    pub plugin_dirs: Vec<PathBuf>,
}

pub fn lock(opts: LockOptions) -> Result<(), Error> {
    let registry = PluginRegistry::new(&opts.plugin_dirs);
    let locked = pin::lock_model(&opts.model, &registry)?;
    let what = if locked.format == 1 { "layer" } else { "node" };
    let mut listing = String::new();
    for pin in &locked.pins {
        listing.push_str(&format!(
            "{what} '{}': {} {} ({})\n",
            pin.layer,
            if pin.changed { "pinned" } else { "unchanged" },
            pin.sha256,
            pin.path.display()
        ));
    }
    print_stdout(&listing)
}
