//! The model description, parsed and validated into one graph type.
//!
//! Format 1 is a chain: a list of one-input layers run in order, fed the
//! model's one input (called `input`).
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
//! Format 2 is a graph of named nodes, each naming where its inputs come
//! from: a model input, a node (its only output) or `node:output`.
//!
//! ```json
//! {"format": 2, "name": "residual",
//!  "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
//!  "nodes": [
//!    {"name": "dense", "type": "mydense", "config": {"units": 64}, "inputs": ["x"]},
//!    {"name": "sum", "type": "add", "inputs": {"a": "x", "b": "dense"}}],
//!  "outputs": ["sum"]}
//! ```
//!
//! Both formats become a [`ModelSpec`]: inputs, nodes (each a [`LayerSpec`]
//! with its input references) and outputs. Names are checked here; what the
//! references mean is resolved against the plugins' signatures when the
//! model is loaded.
//!
//! A layer may override the default initializer of its parameters (`init`)
//! and tie a parameter to another layer's (`share`, e.g.
//! `{"weight": "0.weight"}`); both are checked against the parameters the
//! layer declares when the model is planned ([`crate::runtime`]).
//!
//! Unknown fields are errors, so that a typo never passes silently.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use layer_api::{DType, Init};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::Error;

/// The model file formats this host reads.
pub const FORMATS: [u32; 2] = [1, 2];

/// Only the `format` field, read first to choose the parser.
#[derive(Debug, Deserialize)]
struct FormatOnly {
    format: u32,
}

/// A format-1 model file as written, checked for structure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    /// Read first, through `FormatOnly`; listed so that it is a known field.
    #[allow(dead_code)]
    format: u32,
    #[serde(default)]
    name: Option<String>,
    layers: Vec<LayerFile>,
    #[serde(default)]
    params: Option<PathBuf>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    isolate: bool,
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
    #[serde(default)]
    isolate: bool,
}

/// A format-2 model file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphFile {
    /// As in `ModelFile`.
    #[allow(dead_code)]
    format: u32,
    #[serde(default)]
    name: Option<String>,
    inputs: Vec<InputFile>,
    nodes: Vec<NodeFile>,
    outputs: Vec<String>,
    #[serde(default)]
    params: Option<PathBuf>,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    isolate: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFile {
    name: String,
    dtype: String,
    shape: Vec<Dim>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    name: String,
    #[serde(rename = "type")]
    plugin: String,
    #[serde(default)]
    config: Option<Map<String, Value>>,
    inputs: NodeInputs,
    #[serde(default)]
    init: Option<Map<String, Value>>,
    #[serde(default)]
    share: Option<BTreeMap<String, String>>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    isolate: bool,
}

/// One axis of a declared input shape: a size, or a symbol (`"batch"`)
/// that stands for the same size wherever it appears.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Size(usize),
    Symbol(String),
}

/// Where a node's inputs come from: in the order of the layer's signature,
/// or by the layer's input names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NodeInputs {
    Positional(Vec<String>),
    Named(BTreeMap<String, String>),
}

/// A model input, as a format-2 file declares it (format 1 has one, called
/// `input`, whose type and shape are the input file's).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    pub name: String,
    /// `None` for format 1: the input file's own type, converted to what
    /// the first layer takes.
    pub dtype: Option<DType>,
    /// `None` for format 1: any shape.
    pub shape: Option<Vec<Dim>>,
}

/// The name format 1 gives its one input.
pub const CHAIN_INPUT: &str = "input";

/// A validated model description: a graph (a chain for format 1).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The file it was read from.
    pub path: PathBuf,
    pub name: String,
    /// 1 (a chain) or 2 (a graph).
    pub format: u32,
    pub inputs: Vec<InputSpec>,
    /// The nodes, in file order (format 1: the layers).
    pub layers: Vec<LayerSpec>,
    /// References to the tensors the model returns.
    pub outputs: Vec<String>,
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
    /// Whether its plugin runs in a worker process (`"isolate": true` on
    /// the layer or the whole model; `--isolate` isolates every layer).
    pub isolate: bool,
    /// Where its inputs come from (format 1: the previous layer, or the
    /// model's input).
    pub inputs: NodeInputs,
}

impl ModelSpec {
    /// Reads and validates a model file.
    pub fn load(path: &Path) -> Result<ModelSpec, Error> {
        // A regular file only (a FIFO or /dev/zero could block or never
        // end), read within the memory budget.
        let text = crate::budget::read_text(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ModelSpec::parse(&text, path)
    }

    /// Validates the text of a model file; `path` is where it came from.
    pub fn parse(text: &str, path: &Path) -> Result<ModelSpec, Error> {
        let syntax = |e: serde_json::Error| Error::ModelSyntax {
            path: path.to_path_buf(),
            line: e.line(),
            column: e.column(),
            message: message_without_position(&e),
        };
        let invalid = |message: String| Error::Model {
            path: path.to_path_buf(),
            message,
        };
        let format = serde_json::from_str::<FormatOnly>(text)
            .map_err(syntax)?
            .format;
        let dir = path.parent().unwrap_or(Path::new(""));
        let default_name = || {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        match format {
            1 => {
                let file: ModelFile = serde_json::from_str(text).map_err(syntax)?;
                if file.layers.is_empty() {
                    return Err(invalid(
                        "\"layers\" is empty: a model needs at least one layer".to_string(),
                    ));
                }
                check_model_fields(file.name.as_deref(), file.params.as_deref(), &invalid)?;
                let mut layers: Vec<LayerSpec> = Vec::with_capacity(file.layers.len());
                let mut names = HashMap::with_capacity(file.layers.len());
                for (index, layer) in file.layers.into_iter().enumerate() {
                    let name = layer.name.unwrap_or_else(|| index.to_string());
                    let source = match layers.last() {
                        Some(previous) => previous.name.clone(),
                        None => CHAIN_INPUT.to_string(),
                    };
                    let node = NodeFile {
                        name,
                        plugin: layer.plugin,
                        config: layer.config,
                        inputs: NodeInputs::Positional(vec![source]),
                        init: layer.init,
                        share: layer.share,
                        sha256: layer.sha256,
                        isolate: layer.isolate || file.isolate,
                    };
                    layers.push(node_spec(node, index, "layer", &mut names, &invalid)?);
                }
                let last = layers.last().expect("checked not empty").name.clone();
                Ok(ModelSpec {
                    path: path.to_path_buf(),
                    name: file.name.unwrap_or_else(default_name),
                    format,
                    inputs: vec![InputSpec {
                        name: CHAIN_INPUT.to_string(),
                        dtype: None,
                        shape: None,
                    }],
                    layers,
                    outputs: vec![last],
                    params: file.params.map(|p| dir.join(p)),
                    seed: file.seed,
                })
            }
            2 => {
                let file: GraphFile = serde_json::from_str(text).map_err(syntax)?;
                check_model_fields(file.name.as_deref(), file.params.as_deref(), &invalid)?;
                let inputs = graph_inputs(file.inputs, &invalid)?;
                if file.nodes.is_empty() {
                    return Err(invalid(
                        "\"nodes\" is empty: a model needs at least one node".to_string(),
                    ));
                }
                if file.outputs.is_empty() {
                    return Err(invalid(
                        "\"outputs\" is empty: name at least one node output to return".to_string(),
                    ));
                }
                let input_names: HashSet<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
                let mut layers: Vec<LayerSpec> = Vec::with_capacity(file.nodes.len());
                let mut names = HashMap::with_capacity(file.nodes.len());
                for (index, node) in file.nodes.into_iter().enumerate() {
                    if input_names.contains(node.name.as_str()) {
                        return Err(invalid(format!(
                            "node {} has the name of a model input; names of inputs and \
                             nodes must differ",
                            quoted(&node.name)
                        )));
                    }
                    let mut node = node;
                    node.isolate |= file.isolate;
                    let spec = node_spec(node, index, "node", &mut names, &invalid)?;
                    layers.push(spec);
                }
                let mut seen = HashSet::new();
                for output in &file.outputs {
                    check_reference(output, "\"outputs\"").map_err(&invalid)?;
                    if !seen.insert(output.as_str()) {
                        return Err(invalid(format!("\"outputs\" names '{output}' twice")));
                    }
                }
                Ok(ModelSpec {
                    path: path.to_path_buf(),
                    name: file.name.unwrap_or_else(default_name),
                    format,
                    inputs,
                    layers,
                    outputs: file.outputs,
                    params: file.params.map(|p| dir.join(p)),
                    seed: file.seed,
                })
            }
            other => Err(invalid(format!(
                "unsupported \"format\": {other}; this host reads format 1 (a chain of \
                 layers) and format 2 (a graph of nodes)"
            ))),
        }
    }
}

/// Checks a model's declared inputs: names unique and plain, dtypes spelled
/// as numpy spells them, at least one.
fn graph_inputs(
    inputs: Vec<InputFile>,
    invalid: &impl Fn(String) -> Error,
) -> Result<Vec<InputSpec>, Error> {
    if inputs.is_empty() {
        return Err(invalid(
            "\"inputs\" is empty: a model needs at least one input".to_string(),
        ));
    }
    let mut specs: Vec<InputSpec> = Vec::with_capacity(inputs.len());
    let mut names = HashSet::with_capacity(inputs.len());
    for input in inputs {
        check_name(&input.name, "input").map_err(invalid)?;
        if !names.insert(input.name.clone()) {
            return Err(invalid(format!(
                "two inputs are named '{}'; input names must be unique",
                input.name
            )));
        }
        let dtype = DType::from_name(&input.dtype).ok_or_else(|| {
            invalid(format!(
                "input '{}': unknown dtype {:?}; use one of {}",
                input.name,
                input.dtype,
                DType::ALL.map(|d| d.name()).join(", ")
            ))
        })?;
        if let Some(Dim::Symbol(s)) = input.shape.iter().find(|d| {
            matches!(d, Dim::Symbol(s) if s.is_empty()
                || s.contains(|c: char| c.is_whitespace() || is_unsafe_char(c)))
        }) {
            return Err(invalid(format!(
                "input '{}': dimension {s:?} must be a size or a symbol without spaces or \
                 control characters",
                input.name
            )));
        }
        specs.push(InputSpec {
            name: input.name,
            dtype: Some(dtype),
            shape: Some(input.shape),
        });
    }
    Ok(specs)
}

/// Names of inputs, nodes and layers: not empty, no `:` (it separates a
/// node from one of its outputs in references), nothing [`is_unsafe_char`].
fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(':') || name.chars().any(is_unsafe_char) {
        return Err(format!(
            "{what} name {name:?} is not valid: names are not empty and hold no ':', \
             control characters (such as ESC, newline or tab) or invisible formatting \
             characters (such as bidi overrides)"
        ));
    }
    Ok(())
}

/// A reference to a tensor (`node`, `node:output`, an input), or a
/// parameter name: any text a terminal would show as it is.
fn check_reference(text: &str, what: &str) -> Result<(), String> {
    if text.chars().any(is_unsafe_char) {
        return Err(format!(
            "{what}: {text:?} holds a control character or an invisible formatting \
             character; names never do"
        ));
    }
    Ok(())
}

/// The model's own `name` and `params` path: free text, but nothing that
/// would reach a terminal as an escape sequence when printed.
fn check_model_fields(
    name: Option<&str>,
    params: Option<&Path>,
    invalid: &impl Fn(String) -> Error,
) -> Result<(), Error> {
    if let Some(name) = name {
        check_reference(name, "model \"name\"").map_err(invalid)?;
    }
    if let Some(params) = params {
        check_reference(&params.to_string_lossy(), "\"params\"").map_err(invalid)?;
    }
    Ok(())
}

/// A character a name must not hold, because a terminal does not show it
/// as itself: controls (C0 such as ESC, newline and tab; DEL; C1 U+0080 to
/// U+009F) and invisible formatting characters that change how the text
/// around them reads (bidi marks, embeddings, overrides and isolates such as
/// U+202E; zero-width spaces and joiners; line and paragraph separators;
/// the byte-order mark).
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// `text` with every [`is_unsafe_char`] written as Rust escapes it
/// (`\u{1b}`, `\n`), for messages that quote text from a file.
pub fn escape_unsafe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A name as messages quote it: `'name'`, or `"…"` with escapes when it
/// holds characters a terminal would not show as themselves.
fn quoted(name: &str) -> String {
    if name.chars().any(is_unsafe_char) {
        format!("{name:?}")
    } else {
        format!("'{name}'")
    }
}

/// Validates one node (or format-1 layer, `what` says which) against the
/// ones before it, whose names `names` holds with their indices.
fn node_spec(
    node: NodeFile,
    index: usize,
    what: &str,
    names: &mut HashMap<String, usize>,
    invalid: &impl Fn(String) -> Error,
) -> Result<LayerSpec, Error> {
    let name = node.name;
    if name.is_empty() {
        return Err(invalid(format!(
            "layer {index}: \"name\" must not be empty"
        )));
    }
    check_name(&name, what).map_err(invalid)?;
    if let Some(other) = names.insert(name.clone(), index) {
        return Err(invalid(format!(
            "layers {other} and {index} are both named '{name}': layer names must be \
             unique, since parameters are named after them"
        )));
    }
    match &node.inputs {
        NodeInputs::Positional(sources) => {
            for source in sources {
                check_reference(source, &format!("layer '{name}': \"inputs\"")).map_err(invalid)?;
            }
        }
        NodeInputs::Named(sources) => {
            for (input, source) in sources {
                check_reference(input, &format!("layer '{name}': \"inputs\""))
                    .and_then(|()| check_reference(source, &format!("layer '{name}': \"inputs\"")))
                    .map_err(invalid)?;
            }
        }
    }
    let mut init = BTreeMap::new();
    for (param, value) in node.init.unwrap_or_default() {
        check_reference(&param, &format!("layer '{name}': \"init\"")).map_err(invalid)?;
        let parsed = Init::from_json(&value).map_err(|e| {
            invalid(format!(
                "layer '{name}': \"init\" of parameter '{param}': {e}"
            ))
        })?;
        init.insert(param, parsed);
    }
    let share = node.share.unwrap_or_default();
    for (param, owner) in &share {
        check_reference(param, &format!("layer '{name}': \"share\""))
            .and_then(|()| check_reference(owner, &format!("layer '{name}': \"share\"")))
            .map_err(invalid)?;
    }
    if let Some(param) = share.keys().find(|p| init.contains_key(*p)) {
        return Err(invalid(format!(
            "layer '{name}': parameter '{param}' is both in \"init\" and in \"share\"; \
             a shared parameter is initialized by its owner '{}', so set \"init\" there",
            share[param]
        )));
    }
    let sha256 = node
        .sha256
        .map(|pin| parse_pin(&name, &pin))
        .transpose()
        .map_err(invalid)?;
    Ok(LayerSpec {
        name,
        plugin: node.plugin,
        config: Value::Object(node.config.unwrap_or_default()),
        init,
        share,
        sha256,
        isolate: node.isolate,
        inputs: node.inputs,
    })
}

/// Checks a pin as written in a model file: 64 hex digits, either case.
/// Returns it in lowercase, the form the registry computes.
pub fn parse_pin(layer: &str, value: &str) -> Result<String, String> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!(
            "layer '{layer}': \"sha256\" must be 64 hex digits (the SHA-256 of the plugin \
             library), got \"{}\"",
            escape_unsafe(value)
        ))
    }
}

/// serde_json's message without its "at line L column C" suffix, which the
/// caller reports in its own form.
fn message_without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(at) => &text[..at],
        None => &text,
    };
    // serde quotes unknown field names and values as they are in the file.
    escape_unsafe(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelSpec, String> {
        ModelSpec::parse(text, Path::new("models/m.json")).map_err(|e| e.to_string())
    }

    #[test]
    fn pins_must_be_64_hex_digits() {
        let upper = "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD";
        assert_eq!(parse_pin("0", upper).unwrap(), upper.to_ascii_lowercase());
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            let err = parse_pin("dense", bad).unwrap_err();
            assert!(
                err.starts_with("layer 'dense': \"sha256\" must be 64 hex"),
                "{err}"
            );
        }
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
    fn names_with_controls_or_invisible_formatting_are_refused_escaped() {
        let bad = [
            "a\u{1b}[31mred",
            "a\nb",
            "a\rb",
            "a\tb",
            "a\u{7f}",
            "a\u{85}",
            "a\u{9f}",
            "abc\u{202e}txt",
            "a\u{2066}b",
            "a\u{200b}b",
        ];
        for name in bad {
            let escaped = format!("{name:?}");
            let layer = serde_json::json!([{"type": "relu", "name": name}]);
            let err = parse(&format!(r#"{{"format": 1, "layers": {layer}}}"#)).unwrap_err();
            assert!(
                err.contains(&format!("layer name {escaped} is not valid")),
                "{err}"
            );
            assert!(!err.chars().any(is_unsafe_char), "raw in: {err:?}");
            let graph = serde_json::json!({
                "format": 2,
                "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}],
                "nodes": [{"name": name, "type": "relu", "inputs": ["x"]}],
                "outputs": [name]});
            let err = parse(&graph.to_string()).unwrap_err();
            assert!(
                err.contains(&format!("node name {escaped} is not valid")),
                "{err}"
            );
            assert!(!err.chars().any(is_unsafe_char), "raw in: {err:?}");
        }
        // Every other place a file names something is checked too, and
        // serde's own messages quote field names escaped.
        let e = "\u{1b}[2J";
        let others = [
            serde_json::json!({"format": 1, "name": e, "layers": [{"type": "relu"}]}),
            serde_json::json!({"format": 1, "params": e, "layers": [{"type": "relu"}]}),
            serde_json::json!({"format": 1, "layers": [{"type": "relu", "init": {e: "zeros"}}]}),
            serde_json::json!({"format": 1, "layers": [{"type": "relu", "share": {"w": e}}]}),
            serde_json::json!({"format": 1, "layers": [{"type": "relu", "sha256": e}]}),
            serde_json::json!({"format": 1, "layers": [{"type": "relu", e: 1}]}),
            serde_json::json!({"format": 2, "nodes": [{"name": "n", "type": "relu", "inputs": [e]}],
                "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}], "outputs": ["n"]}),
            serde_json::json!({"format": 2, "nodes": [{"name": "n", "type": "relu", "inputs": ["x"]}],
                "inputs": [{"name": "x", "dtype": "float32", "shape": [2]}], "outputs": [e]}),
            serde_json::json!({"format": 2, "nodes": [{"name": "n", "type": "relu", "inputs": ["x"]}],
                "inputs": [{"name": "x", "dtype": e, "shape": [2]}], "outputs": ["n"]}),
            serde_json::json!({"format": 2, "nodes": [{"name": "n", "type": "relu", "inputs": ["x"]}],
                "inputs": [{"name": "x", "dtype": "float32", "shape": [e]}], "outputs": ["n"]}),
        ];
        for model in others {
            let err = parse(&model.to_string()).unwrap_err();
            assert!(err.contains("\\u{1b}[2J"), "{model}: {err}");
            assert!(!err.chars().any(is_unsafe_char), "{model}: raw in {err:?}");
        }
        // Names in other scripts, combining marks and spaces stay valid.
        let ok = serde_json::json!([{"type": "relu", "name": "cafe\u{301} 層 x"}]);
        parse(&format!(r#"{{"format": 1, "layers": {ok}}}"#)).unwrap();
    }

    #[test]
    fn duplicate_names_among_many_layers_name_both_indices() {
        let mut layers: Vec<_> = (0..2000)
            .map(|i| serde_json::json!({"type": "relu", "name": format!("l{i}")}))
            .collect();
        layers.push(serde_json::json!({"type": "relu", "name": "l1234"}));
        let model = serde_json::json!({"format": 1, "layers": layers});
        let err = parse(&model.to_string()).unwrap_err();
        assert!(
            err.contains("layers 1234 and 2000 are both named 'l1234'"),
            "{err}"
        );
        // A given name may not take an index another layer is named by.
        let err =
            parse(r#"{"format": 1, "layers": [{"type": "relu"}, {"type": "relu", "name": "0"}]}"#)
                .unwrap_err();
        assert!(err.contains("layers 0 and 1 are both named '0'"), "{err}");
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
                "unknown field `layer`, expected one of `format`, `name`, `layers`, `params`, `seed`, `isolate`",
            ),
            (
                r#"{"format": 1, "layers": [{"type": "x", "confg": {}}]}"#,
                "unknown field `confg`, expected one of `type`, `name`, `config`, `init`, `share`, `sha256`, `isolate`",
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
                r#"{"format": 3, "layers": [{"type": "x"}]}"#,
                "models/m.json: unsupported \"format\": 3; this host reads format 1",
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
