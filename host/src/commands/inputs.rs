//! What the command line says about a model's inputs before anything runs:
//! `--input-shape [NAME=]DIMS` and `--input [NAME=]FILE`, matched to the
//! model's inputs by name (a bare value only for a model of one input), and
//! the shapes of the inputs not given worked out from the declared ones,
//! each symbol (`batch`, `seq`) taking the size a given input has for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::Error;
use crate::inspect::{bind_symbols, declared_shape};
use crate::model::ModelSpec;
use crate::npy::NpyRowReader;
use crate::runtime::{Model, TensorSpec};

/// One `--input-shape`: `2,64`, or `tokens=2,16` for a named input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeArg {
    pub name: Option<String>,
    pub dims: Vec<usize>,
}

/// Parses `--input-shape`: sizes separated by commas, after `NAME=` for a
/// model input named NAME.
pub fn parse_shape_arg(text: &str) -> Result<ShapeArg, String> {
    let (name, dims) = match text.rsplit_once('=') {
        Some((name, dims)) => (Some(name.to_string()), dims),
        None => (None, text),
    };
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            format!(
                "'{text}' is not a shape: give sizes separated by commas, e.g. 2,64, or \
                 NAME=2,64 for the model input NAME"
            )
        })?;
    if name.as_deref() == Some("") {
        return Err(format!(
            "'{text}' names no input: write NAME=DIMS, e.g. tokens=2,16"
        ));
    }
    Ok(ShapeArg { name, dims })
}

/// `--input-shape` and `--input` as given.
#[derive(Debug, Clone, Default)]
pub struct InputArgs {
    pub shapes: Vec<ShapeArg>,
    /// `FILE` or `NAME=FILE`.
    pub files: Vec<String>,
}

/// What is given for one model input.
#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    Shape(Vec<usize>),
    File(PathBuf),
}

impl InputArgs {
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty() && self.files.is_empty()
    }

    /// What is given for each of `spec`'s inputs, in declared order.
    pub fn match_inputs(&self, spec: &ModelSpec) -> Result<Vec<Option<Given>>, Error> {
        let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
        let mut given: Vec<Option<Given>> = vec![None; names.len()];
        let mut place = |name: Option<&str>, what: Given, flag: &str| -> Result<(), Error> {
            let index = match name {
                Some(name) => names.iter().position(|n| *n == name).ok_or_else(|| {
                    Error::Usage(format!(
                        "{flag}: the model has no input '{name}'; its inputs are: {}",
                        names.join(", ")
                    ))
                })?,
                None if names.len() == 1 => 0,
                None => {
                    return Err(Error::Usage(format!(
                        "{flag}: the model takes {} inputs ({}): give each as NAME={}",
                        names.len(),
                        names.join(", "),
                        if flag == "--input" { "FILE" } else { "DIMS" }
                    )))
                }
            };
            if given[index].replace(what).is_some() {
                return Err(Error::Usage(format!(
                    "input '{}' is given twice (by --input-shape or --input)",
                    names[index]
                )));
            }
            Ok(())
        };
        for shape in &self.shapes {
            place(
                shape.name.as_deref(),
                Given::Shape(shape.dims.clone()),
                "--input-shape",
            )?;
        }
        for file in &self.files {
            // NAME=FILE only when NAME is an input: a path may hold '='.
            match file
                .split_once('=')
                .filter(|(name, _)| names.contains(name))
            {
                Some((name, path)) => place(Some(name), Given::File(path.into()), "--input")?,
                None => place(None, Given::File(file.into()), "--input")?,
            }
        }
        Ok(given)
    }
}

/// The element type an input of unknown type is planned with: the declared
/// one (format 2), or the first layer's preferred one (format 1).
pub fn default_dtype(model: &Model, index: usize) -> layer_api::DType {
    model.input_dtype_of(index, model.layers[0].signature.inputs[0].dtypes[0])
}

/// The element type and shape of each given input: a shape as given, of
/// [`default_dtype`]; a file's shape and its type converted as `run` would
/// (only the header is read: the file may be larger than memory).
pub fn given_specs(
    model: &Model,
    given: &[Option<Given>],
) -> Result<Vec<Option<TensorSpec>>, Error> {
    given
        .iter()
        .enumerate()
        .map(|(i, g)| {
            Ok(match g {
                None => None,
                Some(Given::Shape(dims)) => Some(TensorSpec::new(default_dtype(model, i), dims)),
                Some(Given::File(path)) => {
                    let reader = NpyRowReader::open(path).map_err(|source| Error::Npy {
                        path: path.clone(),
                        source,
                    })?;
                    let dtype = model.input_dtype_of(i, reader.dtype().tensor_dtype());
                    Some(TensorSpec::new(dtype, reader.shape()))
                }
            })
        })
        .collect()
}

/// Fills in the inputs not given whose declared shapes the given ones (and
/// `bound`, e.g. `--batch`) determine, of their declared types.
pub fn complete(model: &Model, specs: &mut [Option<TensorSpec>], bound: &BTreeMap<String, usize>) {
    let shapes: Vec<Option<Vec<usize>>> = specs
        .iter()
        .map(|s| s.as_ref().map(|s| s.shape.clone()))
        .collect();
    let symbols = bind_symbols(&model.spec, &shapes, bound);
    for (i, (declared, spec)) in model.spec.inputs.iter().zip(specs.iter_mut()).enumerate() {
        if spec.is_some() {
            continue;
        }
        if let Some(shape) = declared
            .shape
            .as_deref()
            .and_then(|dims| declared_shape(dims, &symbols))
        {
            *spec = Some(TensorSpec::new(default_dtype(model, i), &shape));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(text: &str) -> ModelSpec {
        ModelSpec::parse(text, Path::new("m.json")).unwrap()
    }

    const TWO_INPUTS: &str = r#"{"format": 2,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "mask", "dtype": "bool", "shape": ["batch", "seq"]}],
        "nodes": [{"name": "n", "type": "x", "inputs": ["tokens", "mask"]}],
        "outputs": ["n"]}"#;

    #[test]
    fn shapes_parse_bare_or_named() {
        assert_eq!(
            parse_shape_arg("2,64").unwrap(),
            ShapeArg {
                name: None,
                dims: vec![2, 64]
            }
        );
        assert_eq!(
            parse_shape_arg("tokens=2, 16").unwrap(),
            ShapeArg {
                name: Some("tokens".into()),
                dims: vec![2, 16]
            }
        );
        assert!(parse_shape_arg("2x64").unwrap_err().contains("not a shape"));
        assert!(parse_shape_arg("tokens=")
            .unwrap_err()
            .contains("not a shape"));
        assert!(parse_shape_arg("=2")
            .unwrap_err()
            .contains("names no input"));
    }

    #[test]
    fn given_inputs_are_matched_by_name() {
        let spec = spec(TWO_INPUTS);
        let args = InputArgs {
            shapes: vec![parse_shape_arg("mask=2,3").unwrap()],
            files: vec!["tokens=t.npy".into()],
        };
        assert_eq!(
            args.match_inputs(&spec).unwrap(),
            vec![
                Some(Given::File("t.npy".into())),
                Some(Given::Shape(vec![2, 3]))
            ]
        );
        let bare = InputArgs {
            shapes: vec![parse_shape_arg("2,3").unwrap()],
            files: vec![],
        };
        let err = bare.match_inputs(&spec).unwrap_err().to_string();
        assert!(
            err.contains("the model takes 2 inputs (tokens, mask): give each as NAME=DIMS"),
            "{err}"
        );
        let unknown = InputArgs {
            shapes: vec![parse_shape_arg("ids=2,3").unwrap()],
            files: vec![],
        };
        let err = unknown.match_inputs(&spec).unwrap_err().to_string();
        assert!(
            err.contains("no input 'ids'; its inputs are: tokens, mask"),
            "{err}"
        );
        let twice = InputArgs {
            shapes: vec![parse_shape_arg("mask=2,3").unwrap()],
            files: vec!["mask=m.npy".into()],
        };
        let err = twice.match_inputs(&spec).unwrap_err().to_string();
        assert!(err.contains("input 'mask' is given twice"), "{err}");
    }

    #[test]
    fn symbols_bound_by_one_input_shape_the_others() {
        let spec = spec(TWO_INPUTS);
        let symbols = bind_symbols(&spec, &[Some(vec![2, 16]), None], &BTreeMap::new());
        let mask = spec.inputs[1].shape.as_deref().unwrap();
        assert_eq!(declared_shape(mask, &symbols), Some(vec![2, 16]));
        let only_batch = BTreeMap::from([("batch".to_string(), 8)]);
        assert_eq!(declared_shape(mask, &only_batch), None);
        assert_eq!(crate::inspect::format_declared(mask), "(batch, seq)");
    }
}
