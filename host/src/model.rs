//! The model description: a JSON file listing layers to run in order.
//!
//! ```json
//! {
//!   "format": 1,
//!   "name": "mlp",
//!   "layers": [
//!     {"type": "mydense", "config": {"units": 8}},
//!     {"type": "mydense", "name": "out", "config": {"units": 1},
//!      "init": {"weight": {"normal": {"std": 0.05}}, "bias": "zeros"}}
//!   ],
//!   "params": "mlp.safetensors",
//!   "seed": 0
//! }
//! ```
//!
//! A layer may override the default initializer of its parameters (`init`)
//! and tie a parameter to another layer's (`share`, e.g.
//! `{"weight": "0.weight"}`); both are checked against the parameters the
//! layer declares when the model is planned ([`crate::runtime`]).
//!
//! Unknown fields are errors, so that a typo never passes silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use layer_api::Init;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::Error;

/// The model file format this host reads.
pub const FORMAT: u32 = 1;

/// A model file as written, checked for structure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    format: u32,
    #[serde(default)]
    name: Option<String>,
    layers: Vec<LayerFile>,
    #[serde(default)]
    params: Option<PathBuf>,
    #[serde(default)]
    seed: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerFile {
    #[serde(rename = "type")]
    plugin: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    config: Option<Map<String, Value>>,
    #[serde(default)]
    init: Option<Map<String, Value>>,
    #[serde(default)]
    share: Option<BTreeMap<String, String>>,
    #[serde(default)]
    sha256: Option<String>,
}

/// A validated model description.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The file it was read from.
    pub path: PathBuf,
    pub name: String,
    pub layers: Vec<LayerSpec>,
    /// The parameter file, resolved against the model file's directory.
    pub params: Option<PathBuf>,
    /// The seed for initializing parameters that no file provides.
    pub seed: u64,
}

/// One layer of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// The layer's name: as given, or its index (`"0"`, `"1"`, …) as in
    /// `torch.nn.Sequential`. Parameters are called `<name>.<param>`.
    pub name: String,
    /// The plugin that implements it (`"mydense"`).
    pub plugin: String,
    /// The plugin's config, a JSON object (`{}` when absent).
    pub config: Value,
    /// Initializers that replace the layer's defaults, by parameter name
    /// within the layer (`weight`).
    pub init: BTreeMap<String, Init>,
    /// Parameters stored as another layer's parameter: local name (`weight`)
    /// → full name of the owner (`0.weight`).
    pub share: BTreeMap<String, String>,
    /// The SHA-256 its plugin library must have (lowercase hex), if pinned.
    pub sha256: Option<String>,
}

impl ModelSpec {
    /// Reads and validates a model file.
    pub fn load(path: &Path) -> Result<ModelSpec, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ModelSpec::parse(&text, path)
    }

    /// Validates the text of a model file; `path` is where it came from.
    pub fn parse(text: &str, path: &Path) -> Result<ModelSpec, Error> {
        let file: ModelFile = serde_json::from_str(text).map_err(|e| Error::ModelSyntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: message_without_position(&e),
        })?;
        let invalid = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        if file.format != FORMAT {
            return Err(invalid(format!(
                "unsupported \"format\": {}; this host reads format {FORMAT}",
                file.format
            )));
        }
        if file.layers.is_empty() {
            return Err(invalid(
                "\"layers\" is empty: a model needs at least one layer".to_string(),
            ));
        }
        let mut layers: Vec<LayerSpec> = Vec::with_capacity(file.layers.len());
        for (index, layer) in file.layers.into_iter().enumerate() {
            let name = layer.name.unwrap_or_else(|| index.to_string());
            if name.is_empty() {
                return Err(invalid(format!(
                    "layer {index}: \"name\" must not be empty"
                )));
            }
            if let Some(other) = layers.iter().position(|l| l.name == name) {
                return Err(invalid(format!(
                    "layers {other} and {index} are both named '{name}': layer names must be \
                     unique, since parameters are named after them"
                )));
            }
            let mut init = BTreeMap::new();
            for (param, value) in layer.init.unwrap_or_default() {
                let parsed = Init::from_json(&value).map_err(|e| {
                    invalid(format!(
                        "layer '{name}': \"init\" of parameter '{param}': {e}"
                    ))
                })?;
                init.insert(param, parsed);
            }
            let share = layer.share.unwrap_or_default();
            if let Some(param) = share.keys().find(|p| init.contains_key(*p)) {
                return Err(invalid(format!(
                    "layer '{name}': parameter '{param}' is both in \"init\" and in \"share\"; \
                     a shared parameter is initialized by its owner '{}', so set \"init\" there",
                    share[param]
                )));
            }
            let sha256 = layer
                .sha256
                .map(|pin| crate::pin::parse_pin(&name, &pin))
                .transpose()
                .map_err(|e| invalid(e.to_string()))?;
            layers.push(LayerSpec {
                name,
                plugin: layer.plugin,
                config: Value::Object(layer.config.unwrap_or_default()),
                init,
                share,
                sha256,
            });
        }
        let dir = path.parent().unwrap_or(Path::new(""));
        Ok(ModelSpec {
            path: path.to_path_buf(),
            name: file.name.unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            layers,
            params: file.params.map(|p| dir.join(p)),
            seed: file.seed,
        })
    }
}

/// serde_json's message without its "at line L column C" suffix, which the
/// caller reports in its own form.
fn message_without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        ModelSpec::parse(text, Path::new("models/m.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn layers_are_named_by_index_and_params_resolve_beside_the_model() {
        let spec = parse(
            r#"{"format": 1, "name": "mlp", "seed": 7, "params": "w.safetensors",
                "layers": [{"type": "mydense", "config": {"units": 8}},
                           {"type": "centered", "name": "center"}]}"#,
        )
        .unwrap();
        assert_eq!(spec.name, "mlp");
        assert_eq!(spec.seed, 7);
        assert_eq!(spec.params, Some(PathBuf::from("models/w.safetensors")));
        assert_eq!(spec.layers[0].name, "0");
        assert_eq!(spec.layers[0].plugin, "mydense");
        assert_eq!(spec.layers[0].config, serde_json::json!({"units": 8}));
        assert_eq!(spec.layers[1].name, "center");
        assert_eq!(spec.layers[1].config, serde_json::json!({}));
        assert!(spec.layers[1].init.is_empty() && spec.layers[1].share.is_empty());
    }

    #[test]
    fn init_overrides_and_sharing_are_read_per_layer() {
        let spec = parse(
            r#"{"format": 1, "layers": [
                {"type": "mydense", "config": {"units": 8},
                 "init": {"weight": {"normal": {"std": 0.05}}, "bias": "zeros"}},
                {"type": "mydense", "config": {"units": 8}, "share": {"weight": "0.weight"}}]}"#,
        )
        .unwrap();
        assert_eq!(spec.layers[0].init["weight"], Init::normal(0.0, 0.05));
        assert_eq!(spec.layers[0].init["bias"], Init::Zeros);
        assert_eq!(spec.layers[1].share["weight"], "0.weight");
    }

    #[test]
    fn mistakes_are_reported_with_place_and_remedy() {
        let cases = [
            (
                "{\"format\": 1,\n \"layers\": [}",
                "models/m.json:2:13: expected value",
            ),
            (
                r#"{"format": 1, "layer": []}"#,
                "unknown field `layer`, expected one of `format`, `name`, `layers`, `params`, `seed`",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "confg": {}}]}"#,
                "unknown field `confg`, expected one of `type`, `name`, `config`, `init`, `share`, `sha256`",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "init": {"weight": "gaussian"}}]}"#,
                "layer '0': \"init\" of parameter 'weight': unknown initializer `gaussian`",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "init": {"weight": {"normal": {"std": -1}}}}]}"#,
                "layer '0': \"init\" of parameter 'weight': initializer `normal`: `std` must be at least 0",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "share": {"weight": 0}}]}"#,
                "invalid type: integer `0`, expected a string",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x"}, {"type": "x", "share": {"weight": "0.weight"},
                    "init": {"weight": "zeros"}}]}"#,
                "layer '1': parameter 'weight' is both in \"init\" and in \"share\"",
            ),
            (
                r#"{"format": 2, "layers": [{"type": "x"}]}"#,
                "models/m.json: unsupported \"format\": 2; this host reads format 1",
            ),
            (r#"{"format": 1, "layers": []}"#, "\"layers\" is empty"),
            (
                r#"{"format": 1, "layers": [{"type": "x", "name": "a"}, {"type": "y", "name": "a"}]}"#,
                "layers 0 and 1 are both named 'a'",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "sha256": "abc"}]}"#,
                "models/m.json: layer '0': \"sha256\" must be 64 hex digits",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "config": [1]}]}"#,
                "invalid type: sequence, expected a map",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.contains(expected),
                "{text}\n  gave: {err}\n  want: {expected}"
            );
        }
    }
}
