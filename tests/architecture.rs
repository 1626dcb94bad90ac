//! The layering rules of STYLE.md, read from the source: which module names which (`crate::…` and
//! `super::…` paths in code outside `#[cfg(test)] mod tests` and comments).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path below the crate root (`["engine", "model"]`); the root itself is empty.
type Module = Vec<String>;

/// Mutual imports allowed: none (the decoder layer's types live in `engine::layer`; `engine::model` uses them).
const KNOWN_CYCLES: &[(&str, &str)] = &[];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file defines (`src/engine/mod.rs` and `src/engine.rs` are both `engine`).
fn module_of(file: &Path) -> Module {
    let rel = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file that the program is built from: no unit tests, no comment lines.
fn program_code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let code = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    code.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `(module, the modules it names)` for every file of `src/`.
fn imports() -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(f)).collect();
    // The longest known module that `base` followed by `segments` starts with.
    let resolve = |base: Module, segments: &[&str]| -> Module {
        let mut m = base;
        for s in segments {
            let mut next = m.clone();
            next.push((*s).to_string());
            if !modules.contains(&next) {
                break;
            }
            m = next;
        }
        m
    };
    let mut out = BTreeMap::new();
    for file in &files {
        let me = module_of(file);
        let parent: Module = me[..me.len().saturating_sub(1)].to_vec();
        let code = program_code(file);
        let mut named = BTreeSet::new();
        for (root, base) in [("crate::", Module::new()), ("super::", parent.clone())] {
            for (at, _) in code.match_indices(root) {
                if at > 0 && code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &code[at + root.len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a::X, b}`: the first segment of each item.
                    let inner = group.split('}').next().unwrap_or_default();
                    for item in inner.split(',') {
                        let first = item.trim().split("::").next().unwrap_or_default();
                        named.insert(resolve(base.clone(), &[first]));
                    }
                } else {
                    let path: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
                    named.insert(resolve(base.clone(), &segments));
                }
            }
        }
        named.retain(|m| !m.is_empty() && *m != me);
        out.insert(me, named);
    }
    out
}

fn name(m: &Module) -> String {
    m.join("::")
}

#[test]
fn no_two_modules_import_each_other() {
    let imports = imports();
    assert!(
        imports[&vec!["tui".to_string()]].contains(&vec!["app".to_string()]),
        "the reader finds imports (tui names app)"
    );
    let mut cycles = Vec::new();
    for (a, named) in &imports {
        for b in named {
            // A module and its own submodules (`app` and `app::chat`) belong together.
            if b.starts_with(a) || a.starts_with(b) || a >= b {
                continue;
            }
            if imports.get(b).is_some_and(|theirs| theirs.contains(a)) {
                let pair = (name(a), name(b));
                if !KNOWN_CYCLES.contains(&(pair.0.as_str(), pair.1.as_str())) {
                    cycles.push(format!("{} <-> {}", pair.0, pair.1));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other: {cycles:?}"
    );
}

#[test]
fn the_engine_data_and_config_never_import_the_ui() {
    let ui = ["app", "ui", "tui"];
    let mut found = Vec::new();
    for (m, named) in imports() {
        if !matches!(
            m.first().map(String::as_str),
            Some("engine" | "data" | "config" | "trainer" | "chat" | "export" | "resolve" | "api")
        ) {
            continue;
        }
        for n in named {
            if ui.contains(&n[0].as_str()) {
                found.push(format!("{} -> {}", name(&m), name(&n)));
            }
        }
    }
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn the_program_never_calls_the_test_helpers() {
    // `testing` and `engine::testing` stay in the library because the integration tests link the
    // library as the program does (no `cfg(test)` there); nothing the program runs may use them,
    // so the linker leaves them out of the binary.
    let helpers = [
        vec!["testing".to_string()],
        vec!["engine".into(), "testing".into()],
    ];
    for (m, named) in imports() {
        if helpers.contains(&m) {
            continue;
        }
        for h in &helpers {
            assert!(!named.contains(h), "{} uses {}", name(&m), name(h));
        }
    }
}
