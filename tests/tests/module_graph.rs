//! Dependencies between modules run one way: no import cycle among the
//! top-level modules of trustweave-sds (`sds-server/src/*`) or of the
//! filter's engine (`filter/engine/src/*`). Read from the `use` lines and
//! paths of each module's non-test code; `cargo test --test module_graph`
//! prints a cycle if one appears.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source directory").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A module's code without its test module and comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names that follow `prefix` in `text` (`crate::render::x` → `render`), including `use prefix{a, b}`.
fn referenced(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        let items: Vec<&str> = match rest.strip_prefix('{') {
            Some(inside) => inside
                .split('}')
                .next()
                .unwrap_or_default()
                .split(',')
                .collect(),
            None => vec![rest],
        };
        for item in items {
            let name: String = item
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() && name != "self" {
                names.insert(name);
            }
        }
    }
    names
}

/// The module graph of `dir`: each top-level module → the modules it uses.
fn graph(
    dir: &Path,
    prefixes: &[&str],
    nested_super_is_parent: bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(dir, &mut files);
    let mut modules: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let relative = file.strip_prefix(dir).expect("under dir");
        let node = relative
            .components()
            .next()
            .map(|c| {
                c.as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string()
            })
            .unwrap_or_default();
        if ["lib", "main", "mod", "bin"].contains(&node.as_str()) {
            continue; // the root declares every module
        }
        let nested = relative.components().count() > 1;
        let text = code(file);
        let mut uses = BTreeSet::new();
        for prefix in prefixes {
            if *prefix == "super::" && nested && nested_super_is_parent {
                continue; // a nested file's `super` is its own top-level module
            }
            uses.extend(referenced(&text, prefix));
        }
        uses.remove(&node);
        modules.entry(node).or_default().extend(uses);
    }
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    for uses in modules.values_mut() {
        uses.retain(|m| known.contains(m));
    }
    modules
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut found = path[start..].to_vec();
            found.push(node.to_string());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn trustweave_sds_modules_depend_one_way() {
    let modules = graph(&repo().join("sds-server/src"), &["crate::"], true);
    assert!(modules.contains_key("render") && modules.contains_key("snapshot"));
    if let Some(found) = cycle(&modules) {
        panic!("import cycle in sds-server: {}", found.join(" → "));
    }
}

#[test]
fn the_filter_engine_modules_depend_one_way() {
    let modules = graph(
        &repo().join("filter/engine/src"),
        &["super::", "crate::"],
        false,
    );
    assert!(modules.contains_key("certificate") && modules.contains_key("identity"));
    if let Some(found) = cycle(&modules) {
        panic!("import cycle in the filter's engine: {}", found.join(" → "));
    }
}

#[test]
fn a_cycle_is_found() {
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(cycle(&g), Some(vec!["a".into(), "b".into(), "a".into()]));
    assert_eq!(
        referenced("use crate::{render, snapshot::X};", "crate::"),
        BTreeSet::from(["render".to_string(), "snapshot".to_string()])
    );
}
