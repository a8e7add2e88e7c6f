//! The host's modules form a pipeline: no module uses one that uses it back,
//! directly or through others. Checked from the sources: every
//! `crate::module` a file names (outside comments) is an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name (`runtime`, `commands::run`) → the modules it names.
fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    let mut files = Vec::new();
    for dir in [src.to_path_buf(), src.join("commands")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for path in files {
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        let name = if path.parent().unwrap().ends_with("commands") {
            format!("commands::{stem}")
        } else {
            stem
        };
        if name == "lib" || name == "main" || name == "commands::mod" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let mut uses = BTreeSet::new();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let word: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let target = if word == "commands" {
                    let sub: String = rest["commands::".len().min(rest.len())..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    format!("commands::{sub}")
                } else {
                    word
                };
                if !target.is_empty() && target != name && target != "commands::" {
                    uses.insert(target);
                }
            }
        }
        graph.insert(name, uses);
    }
    graph
}

#[test]
fn host_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = edges(&src);
    assert!(graph.contains_key("runtime") && graph.contains_key("commands::run"));
    assert!(
        graph["runtime"].contains("graph"),
        "the scan must see real edges: {graph:?}"
    );
    // Depth-first search for a path back to where it started.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap().join(" → ")
        );
    }
}
