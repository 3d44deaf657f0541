//! The crate's modules depend on each other without cycles: a graph of the top-level modules of
//! `src/` (and, within `dispatch`, of its submodules), built from the paths each file names
//! (`crate::x::…`, `super::…`, `self::…`, `use crate::{x, y}`, and a module's own children),
//! must be acyclic. A cycle is printed edge by edge; `-- --nocapture` prints the whole graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules whose submodules are nodes of their own.
const SPLIT: &[&str] = &["dispatch"];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn the_module_graph_of_src_is_acyclic() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: Vec<(Vec<String>, String)> = files
        .iter()
        .filter_map(|path| {
            let module = module_of(&src, path)?;
            Some((module, std::fs::read_to_string(path).unwrap()))
        })
        .collect();
    let graph = graph(&sources, &|parent| children(&src, parent));
    for (from, to) in &graph {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        println!("{from} -> {}", to.join(", "));
    }
    // The parser sees what is there: a few edges every build of the crate has.
    for (from, to) in [("cli", "config"), ("stage", "kafka"), ("dispatch", "stage")] {
        assert!(
            graph.get(from).is_some_and(|to_| to_.contains(to)),
            "expected {from} -> {to} in the graph: {graph:?}"
        );
    }
    if let Some(cycle) = cycle(&graph) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn a_cycle_through_super_and_a_use_tree_is_found() {
    let sources = [
        (
            vec!["a".to_string()],
            "pub mod inner;\nuse crate::{b::Thing, c};\n// crate::d::not_code\n".to_string(),
        ),
        (
            vec!["b".to_string()],
            "fn f() -> u8 { let s = \"crate::d::\"; crate::c::g() }\n".to_string(),
        ),
        (
            vec!["c".to_string()],
            "use super::a::inner::X;\n".to_string(),
        ),
        (
            vec!["a".into(), "inner".into()],
            "mod tests { use super::*; }\n".to_string(),
        ),
    ];
    let graph = graph(&sources, &|_| BTreeSet::new());
    assert_eq!(
        graph["a"],
        BTreeSet::from(["b".to_string(), "c".to_string()])
    );
    assert!(
        !graph.contains_key("d"),
        "comments and strings are not code"
    );
    assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// `src/dispatch/handlers/enrich.rs` is `dispatch::handlers::enrich`; `mod.rs` is its directory;
/// the crate roots (`lib.rs`, `main.rs`) only declare modules.
fn module_of(src: &Path, path: &Path) -> Option<Vec<String>> {
    let relative = path.strip_prefix(src).unwrap().with_extension("");
    let mut module: Vec<String> = relative
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    if module.last().is_some_and(|m| m == "mod") {
        module.pop();
    }
    match module.as_slice() {
        [root] if root == "lib" || root == "main" => None,
        _ => Some(module),
    }
}

/// The submodules of a module, from the files and directories under `src/`.
fn children(src: &Path, module: &[String]) -> BTreeSet<String> {
    let dir = module.iter().fold(src.to_path_buf(), |dir, m| dir.join(m));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "mod")
        .collect()
}

/// The graph node of an absolute module path: its top-level module, or for the modules in
/// `SPLIT` the submodule too (when the path names one).
fn node(path: &[String], children: &dyn Fn(&[String]) -> BTreeSet<String>) -> Option<String> {
    let top = path.first()?;
    match path.get(1) {
        Some(sub) if SPLIT.contains(&top.as_str()) && children(&path[..1]).contains(sub) => {
            Some(format!("{top}::{sub}"))
        }
        _ => Some(top.clone()),
    }
}

/// Edges between nodes, from every file's paths.
fn graph(
    sources: &[(Vec<String>, String)],
    children: &dyn Fn(&[String]) -> BTreeSet<String>,
) -> Graph {
    let mut graph = Graph::new();
    for (module, text) in sources {
        let from = node(module, children).unwrap();
        for path in paths(module, &tokens(text)) {
            match node(&path, children) {
                Some(to) if to != from => {
                    graph.entry(from.clone()).or_default().insert(to);
                }
                _ => {}
            }
        }
    }
    graph
}

/// The code's identifiers and punctuation; comments, strings and character literals dropped.
fn tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r'
            && matches!(next, Some('"') | Some('#'))
            && raw_string_end(&chars, i).is_some()
        {
            i = raw_string_end(&chars, i).unwrap();
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}'), else a lifetime or label.
            let close = if next == Some('\\') {
                let from = (i + 3).min(chars.len());
                chars[from..]
                    .iter()
                    .position(|&c| c == '\'')
                    .map(|p| from + p)
            } else {
                (chars.get(i + 2) == Some(&'\'')).then_some(i + 2)
            };
            i = close.map_or(i + 1, |close| close + 1);
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == ':' && next == Some(':') {
            tokens.push("::".into());
            i += 2;
        } else {
            if !c.is_whitespace() {
                tokens.push(c.to_string());
            }
            i += 1;
        }
    }
    tokens
}

/// Where a raw string (`r"…"`, `r#"…"#`) starting at `start` ends, if one starts there.
fn raw_string_end(chars: &[char], start: usize) -> Option<usize> {
    let hashes = chars[start + 1..].iter().take_while(|&&c| c == '#').count();
    let open = start + 1 + hashes;
    if chars.get(open) != Some(&'"') {
        return None;
    }
    let mut i = open + 1;
    while i < chars.len() {
        if chars[i] == '"'
            && chars[i + 1..]
                .iter()
                .take(hashes)
                .filter(|&&c| c == '#')
                .count()
                == hashes
        {
            return Some(i + 1 + hashes);
        }
        i += 1;
    }
    Some(chars.len())
}

/// The absolute module paths a file names, resolved from where each appears (inline modules
/// such as `mod tests { use super::*; }` included).
fn paths(file_module: &[String], tokens: &[String]) -> Vec<Vec<String>> {
    let declared: BTreeSet<&str> = tokens
        .windows(3)
        .filter(|w| w[0] == "mod" && w[2] == ";")
        .map(|w| w[1].as_str())
        .collect();
    let mut paths = Vec::new();
    // Inline modules opened so far, with the brace depth each closes at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i].as_str();
        if token == "{" {
            depth += 1;
        } else if token == "}" {
            depth -= 1;
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
        } else if token == "mod" && tokens.get(i + 2).is_some_and(|t| t == "{") {
            inline.push((tokens[i + 1].clone(), depth));
            depth += 1;
            i += 3;
            continue;
        }
        let after_path = i > 0 && tokens[i - 1] == "::";
        let starts_path = tokens.get(i + 1).is_some_and(|t| t == "::") && !after_path;
        if starts_path {
            let mut here: Vec<String> = file_module.to_vec();
            here.extend(inline.iter().map(|(name, _)| name.clone()));
            let base = match token {
                "crate" => Some(Vec::new()),
                "self" => Some(here.clone()),
                "super" => Some(here[..here.len().saturating_sub(1)].to_vec()),
                // A child module named without `self::` (`use registry::Router;`).
                child if inline.is_empty() && declared.contains(child) => {
                    let mut base = here.clone();
                    base.push(child.to_string());
                    Some(base)
                }
                _ => None,
            };
            if let Some(base) = base {
                i = use_tree(tokens, i + 2, base, &mut paths);
                continue;
            }
        }
        i += 1;
    }
    paths
}

/// Reads a path (or `{…}` tree of paths) from `tokens[i..]` after `prefix::`, adding each
/// complete path; returns the index after it. `super::` inside the path walks up.
fn use_tree(
    tokens: &[String],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match tokens.get(i).map(String::as_str) {
            Some("{") => {
                i += 1;
                while i < tokens.len() && tokens[i] != "}" {
                    if tokens[i] == "," {
                        i += 1;
                        continue;
                    }
                    i = use_tree(tokens, i, prefix.clone(), out);
                }
                return i + 1;
            }
            Some("super") if tokens.get(i + 1).is_some_and(|t| t == "::") => {
                prefix.pop();
                i += 2;
            }
            Some(name) if name.starts_with(|c: char| c.is_alphabetic() || c == '_') => {
                prefix.push(name.to_string());
                i += 1;
                if tokens.get(i).is_some_and(|t| t == "::") {
                    i += 1;
                    continue;
                }
                out.push(prefix);
                return i;
            }
            // `*`, or the end of the path.
            _ => {
                out.push(prefix);
                return i + 1;
            }
        }
    }
}

/// A cycle of the graph as its nodes, the first repeated at the end, if there is one.
fn cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next) {
                Some(Mark::Open) => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(Mark::Done) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, marks, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if !marks.contains_key(node) {
            if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}
