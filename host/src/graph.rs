//! A model's wiring, resolved against its layers' signatures: where each
//! node input comes from, the order nodes run in, and when each tensor is
//! last read. Names are checked here, before any shape is known: unknown
//! references, cycles, inputs nobody reads and nodes nobody uses are refused
//! with one line naming them.

use std::collections::{BTreeMap, HashMap};

use crate::error::Error;
use crate::model::{ModelSpec, NodeInputs};
use crate::plan::Signature;

/// Where a tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The model's input of this index.
    Input(usize),
    /// Output `output` of node `node` (indices into the model's nodes and
    /// that node's declared outputs).
    Node { node: usize, output: usize },
}

/// The resolved wiring of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    /// Per node, per declared input: where it comes from (`None`: an
    /// optional input left out).
    pub sources: Vec<Vec<Option<Source>>>,
    /// Node indices in the order they run: each after every node it reads.
    pub order: Vec<usize>,
    /// What the model returns, and the names it returns them under.
    pub outputs: Vec<(String, Source)>,
}

impl Graph {
    /// Resolves `spec`'s references; `signatures[i]` is node `i`'s.
    pub fn resolve(spec: &ModelSpec, signatures: &[&Signature]) -> Result<Graph, Error> {
        let invalid = |message: String| Error::Model {
            path: spec.path.clone(),
            message,
        };
        let names = Names {
            inputs: spec
                .inputs
                .iter()
                .enumerate()
                .map(|(i, input)| (input.name.as_str(), i))
                .collect(),
            nodes: spec
                .layers
                .iter()
                .enumerate()
                .map(|(i, layer)| (layer.name.as_str(), i))
                .collect(),
        };
        let mut sources = Vec::with_capacity(spec.layers.len());
        for (node, layer) in spec.layers.iter().enumerate() {
            let signature = signatures[node];
            let ports = &signature.inputs;
            let mut wired: Vec<Option<Source>> = vec![None; ports.len()];
            let place =
                |what: &str| format!("node '{}' (plugin '{}'){what}", layer.name, layer.plugin);
            match &layer.inputs {
                NodeInputs::Positional(refs) => {
                    if refs.len() > ports.len() {
                        return Err(invalid(format!(
                            "{} takes {} input(s) ({}), but {} are given",
                            place(""),
                            ports.len(),
                            port_names(signature),
                            refs.len()
                        )));
                    }
                    for (i, r) in refs.iter().enumerate() {
                        wired[i] = Some(resolve_ref(spec, &names, signatures, r, &place(""))?);
                    }
                }
                NodeInputs::Named(refs) => {
                    for (name, r) in refs {
                        let i = ports.iter().position(|p| &p.name == name).ok_or_else(|| {
                            invalid(format!(
                                "{} has no input '{name}'; its inputs are: {}",
                                place(""),
                                port_names(signature)
                            ))
                        })?;
                        wired[i] = Some(resolve_ref(spec, &names, signatures, r, &place(""))?);
                    }
                }
            }
            for (port, source) in ports.iter().zip(&wired) {
                if source.is_none() && !port.optional {
                    return Err(invalid(format!(
                        "{} needs its input '{}', which is not given; its inputs are: {}",
                        place(""),
                        port.name,
                        port_names(signature)
                    )));
                }
            }
            sources.push(wired);
        }

        let mut outputs = Vec::with_capacity(spec.outputs.len());
        for r in &spec.outputs {
            let source = resolve_ref(spec, &names, signatures, r, "\"outputs\"")?;
            outputs.push((r.clone(), source));
        }

        let order = topological_order(spec, &sources)?;

        // Everything declared must be used: an input nobody reads, or a
        // node whose outputs reach nothing, is a mistake in the file.
        let read: std::collections::HashSet<Source> = sources
            .iter()
            .flatten()
            .flatten()
            .copied()
            .chain(outputs.iter().map(|(_, s)| *s))
            .collect();
        let read_nodes: std::collections::HashSet<usize> = read
            .iter()
            .filter_map(|s| match s {
                Source::Node { node, .. } => Some(*node),
                Source::Input(_) => None,
            })
            .collect();
        for (i, input) in spec.inputs.iter().enumerate() {
            if !read.contains(&Source::Input(i)) {
                return Err(invalid(format!(
                    "model input '{}' is never used: no node reads it and it is not an output",
                    input.name
                )));
            }
        }
        for (n, layer) in spec.layers.iter().enumerate() {
            if !read_nodes.contains(&n) {
                return Err(invalid(format!(
                    "node '{}' is never used: no node reads its outputs and none is a model \
                     output",
                    layer.name
                )));
            }
        }
        Ok(Graph {
            sources,
            order,
            outputs,
        })
    }

    /// For each tensor, the step (position in [`Graph::order`]) of its last
    /// reader; model outputs live to the end (`usize::MAX`). A tensor no
    /// one reads dies at the step that made it.
    pub fn last_use(&self) -> BTreeMap<Source, usize> {
        let mut last = BTreeMap::new();
        for (step, &node) in self.order.iter().enumerate() {
            for source in self.sources[node].iter().flatten() {
                last.insert(*source, step);
            }
        }
        for (_, source) in &self.outputs {
            last.insert(*source, usize::MAX);
        }
        last
    }
}

fn port_names(signature: &Signature) -> String {
    signature
        .inputs
        .iter()
        .map(|p| {
            if p.optional {
                format!("{} (optional)", p.name)
            } else {
                p.name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The model's input and node names, for looking references up.
struct Names<'a> {
    inputs: HashMap<&'a str, usize>,
    nodes: HashMap<&'a str, usize>,
}

/// What a reference names: a model input, a node's only output, or
/// `node:output`.
fn resolve_ref(
    spec: &ModelSpec,
    names: &Names<'_>,
    signatures: &[&Signature],
    reference: &str,
    place: &str,
) -> Result<Source, Error> {
    let invalid = |message: String| Error::Model {
        path: spec.path.clone(),
        message,
    };
    let node_index = |name: &str| names.nodes.get(name).copied();
    if let Some((node, output)) = reference.split_once(':') {
        let n = node_index(node).ok_or_else(|| {
            invalid(format!(
                "{place}: '{reference}' names node '{node}', which does not exist; {}",
                known_names(spec)
            ))
        })?;
        let outputs = &signatures[n].outputs;
        let o = outputs
            .iter()
            .position(|name| name == output)
            .ok_or_else(|| {
                invalid(format!(
                    "{place}: node '{node}' (plugin '{}') has no output '{output}'; its outputs \
                 are: {}",
                    spec.layers[n].plugin,
                    outputs.join(", ")
                ))
            })?;
        return Ok(Source::Node { node: n, output: o });
    }
    if let Some(&i) = names.inputs.get(reference) {
        return Ok(Source::Input(i));
    }
    if let Some(n) = node_index(reference) {
        let outputs = &signatures[n].outputs;
        if outputs.len() != 1 {
            return Err(invalid(format!(
                "{place}: node '{reference}' (plugin '{}') has several outputs ({}); name one \
                 as '{reference}:{}'",
                spec.layers[n].plugin,
                outputs.join(", "),
                outputs[0]
            )));
        }
        return Ok(Source::Node { node: n, output: 0 });
    }
    Err(invalid(format!(
        "{place}: '{reference}' is neither a model input nor a node; {}",
        known_names(spec)
    )))
}

fn known_names(spec: &ModelSpec) -> String {
    format!(
        "the inputs are: {}; the nodes are: {}",
        spec.inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        spec.layers
            .iter()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Kahn's algorithm, taking the earliest node in the file among those
/// ready, so that a chain runs in file order; a cycle is refused naming it.
fn topological_order(
    spec: &ModelSpec,
    sources: &[Vec<Option<Source>>],
) -> Result<Vec<usize>, Error> {
    let n = sources.len();
    let reads = |node: usize| -> Vec<usize> {
        let mut r: Vec<usize> = sources[node]
            .iter()
            .flatten()
            .filter_map(|s| match s {
                Source::Node { node, .. } => Some(*node),
                Source::Input(_) => None,
            })
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    };
    let needs: Vec<Vec<usize>> = (0..n).map(reads).collect();
    let mut pending: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (node, deps) in needs.iter().enumerate() {
        for &d in deps {
            readers[d].push(node);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> =
        (0..n).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(node) = ready.pop_first() {
        order.push(node);
        for &r in &readers[node] {
            pending[r] -= 1;
            if pending[r] == 0 {
                ready.insert(r);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk back along unresolved inputs from a stuck node until a node
    // repeats: that stretch is a cycle.
    let stuck = |i: usize| pending[i] > 0;
    let start = (0..n).find(|&i| stuck(i)).expect("some node is stuck");
    let mut path = vec![start];
    let mut current = start;
    loop {
        let next = *needs[current]
            .iter()
            .find(|&&d| stuck(d))
            .expect("a stuck node waits for a stuck node");
        if let Some(at) = path.iter().position(|&p| p == next) {
            let mut cycle: Vec<&str> = path[at..]
                .iter()
                .rev()
                .map(|&i| spec.layers[i].name.as_str())
                .collect();
            // Close the loop where it started.
            cycle.push(cycle[0]);
            return Err(Error::Model {
                path: spec.path.clone(),
                message: format!(
                    "nodes form a cycle: {}; a node cannot read its own output, directly or \
                     through others",
                    cycle.join(" → ")
                ),
            });
        }
        path.push(next);
        current = next;
    }
}
