//! Pinning a layer to the exact plugin library it was tested with.
//!
//! A layer in the model file may carry `"sha256"`, the hex SHA-256 of its
//! plugin's library file (checked for form by the model parser). The
//! registry hashes the bytes it read and compares
//! before loading them (see `registry::load`), because loading a library
//! already runs its code. `host lock` writes these pins into a model file:
//! under each of `"layers"` (format 1) or each of `"nodes"` (format 2).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::atomic_file::write_atomically;
use crate::model::ModelSpec;
use crate::registry::{self, PluginRegistry};

/// One layer's (node's) pin as `host lock` wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPin {
    /// The layer's or node's name.
    pub layer: String,
    pub path: PathBuf,
    pub sha256: String,
    /// False when the model already held this pin.
    pub changed: bool,
}

/// What `host lock` did to a model file.
#[derive(Debug, Clone, PartialEq)]
pub struct Locked {
    /// The model file's format: 1 pins layers, 2 pins nodes.
    pub format: u32,
    /// One per layer or node, in file order.
    pub pins: Vec<LayerPin>,
}

/// Resolves every layer's (node's) plugin (loading it, so that only real plugins of
/// the right name are pinned) and writes the hash of each library into the
/// model file as the layer's `"sha256"`. Everything else in the file keeps
/// its keys, values and order; the file is re-indented with two spaces and
/// replaced atomically, keeping its mode and owner; a symbolic link is
/// followed, so the real file is pinned and the link stays (see
/// [`crate::atomic_file`]).
pub fn lock_model(path: &Path, registry: &PluginRegistry) -> Result<Locked, crate::Error> {
    let spec = ModelSpec::load(path)?;
    let mut pins = Vec::with_capacity(spec.layers.len());
    for layer in &spec.layers {
        let plugin_error = |source| crate::Error::Plugin {
            layer: layer.name.clone(),
            source: Box::new(source),
        };
        let library = registry.locate(&layer.plugin).map_err(plugin_error)?;
        // Loading checks the manifest; the pin is the hash of the very bytes
        // that were checked and loaded.
        let sha256 = registry::load(&library, Some(&layer.plugin), None)
            .map_err(plugin_error)?
            .sha256
            .clone();
        pins.push(LayerPin {
            layer: layer.name.clone(),
            changed: layer.sha256.as_deref() != Some(sha256.as_str()),
            path: library,
            sha256,
        });
    }
    // ModelSpec::load read and validated this text a moment ago.
    let text = crate::budget::read_text(path).map_err(|source| crate::Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut model: Value = serde_json::from_str(&text).map_err(|e| crate::Error::Model {
        path: path.to_path_buf(),
        message: format!("changed while being locked: {e}"),
    })?;
    let hashes: Vec<String> = pins.iter().map(|p| p.sha256.clone()).collect();
    if write_pins(&mut model, &hashes) > 0 {
        write_atomically(path, |w| {
            serde_json::to_writer_pretty(&mut *w, &model)?;
            w.write_all(b"\n")
        })?;
    }
    Ok(Locked {
        format: spec.format,
        pins,
    })
}

/// Sets `"sha256"` on each layer object (`"layers"`, format 1) or node
/// object (`"nodes"`, format 2) of a parsed model file, in file order,
/// leaving every other key where it was (serde_json keeps insertion order
/// in this workspace; a new key goes last). Returns how many pins changed.
pub fn write_pins(model: &mut Value, pins: &[String]) -> usize {
    let key = if model.get("nodes").is_some() {
        "nodes"
    } else {
        "layers"
    };
    let Some(layers) = model.get_mut(key).and_then(Value::as_array_mut) else {
        return 0;
    };
    let mut changed = 0;
    for (layer, pin) in layers.iter_mut().zip(pins) {
        if let Some(object) = layer.as_object_mut() {
            let new = Value::String(pin.clone());
            if object.get("sha256") != Some(&new) {
                object.insert("sha256".to_string(), new);
                changed += 1;
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_go_last_in_each_layer_and_keep_the_other_keys_in_order() {
        let mut model: Value = serde_json::from_str(
            r#"{"format": 1, "layers": [{"type": "a", "name": "x", "config": {"z": 1, "a": 2}},
                                       {"sha256": "old", "type": "b"}], "seed": 3}"#,
        )
        .unwrap();
        let changed = write_pins(&mut model, &["1".repeat(64), "2".repeat(64)]);
        assert_eq!(changed, 2);
        let text = serde_json::to_string(&model).unwrap();
        let expected = format!(
            r#"{{"format":1,"layers":[{{"type":"a","name":"x","config":{{"z":1,"a":2}},"sha256":"{}"}},{{"sha256":"{}","type":"b"}}],"seed":3}}"#,
            "1".repeat(64),
            "2".repeat(64)
        );
        assert_eq!(text, expected);
        assert_eq!(write_pins(&mut model, &["1".repeat(64), "2".repeat(64)]), 0);
    }

    #[test]
    fn a_graph_pins_its_nodes() {
        let mut model: Value = serde_json::from_str(
            r#"{"format": 2, "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}],
                "nodes": [{"name": "a", "type": "relu", "inputs": ["x"]},
                          {"name": "b", "type": "relu", "inputs": ["a"], "sha256": "old"}],
                "outputs": ["b"]}"#,
        )
        .unwrap();
        assert_eq!(write_pins(&mut model, &["1".repeat(64), "2".repeat(64)]), 2);
        let nodes = model["nodes"].as_array().unwrap();
        let keys: Vec<&str> = nodes[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["name", "type", "inputs", "sha256"]);
        assert_eq!(nodes[0]["sha256"], "1".repeat(64));
        assert_eq!(nodes[1]["sha256"], "2".repeat(64));
        let keys: Vec<&str> = nodes[1]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["name", "type", "inputs", "sha256"]);
        assert!(model.get("layers").is_none());
    }
}
