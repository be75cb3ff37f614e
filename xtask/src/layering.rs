//! The module layering check: in every crate of the workspace, no two modules may refer to each
//! other, directly or through a ring. A module refers to another when its non-test code names a
//! path into it: `crate::a::b`, `super::x`, a `{...}` group after either, or (in a parent) a bare
//! `child::item`. A parent that declares a child and uses it is fine as long as the child does not
//! reach back: shared contracts live in modules of their own.
//!
//! This reads source text, not a compiler's resolution, so it errs on the side of seeing a
//! reference: comments are skipped, string literals are not parsed (a path spelled in a string
//! counts, which no code here does).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module's path inside its crate: `[]` is the crate root.
type ModPath = Vec<String>;

/// Every `.rs` file under `src` as its module path. A crate with both `lib.rs` and `main.rs`
/// counts as one tree rooted at `main.rs` (the library's modules are files of their own).
fn modules(src: &Path) -> std::io::Result<BTreeMap<ModPath, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension() != Some(std::ffi::OsStr::new("rs")) {
                continue;
            }
            let is_lib = path.file_name().is_some_and(|n| n == "lib.rs");
            if is_lib && path.with_file_name("main.rs").exists() {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap_or(&path).with_extension("");
            let mut parts: ModPath = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts
                .last()
                .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
            {
                parts.pop();
            }
            out.insert(parts, path);
        }
    }
    Ok(out)
}

/// The source without comments, with string and char literals emptied (so their braces and
/// words do not count), and without test modules (`#[cfg(...test...)] mod x { ... }`: children
/// that may use their parent freely).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |i| &after[i..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |i| &after[i + 2..]);
        } else if let Some(after) = raw_string_end(rest) {
            out.push_str("\"\"");
            rest = after;
        } else if c == '"' {
            rest = skip_quoted(&rest[1..], '"');
            out.push_str("\"\"");
        } else if c == '\'' && is_char_literal(rest) {
            rest = skip_quoted(&rest[1..], '\'');
            out.push_str("' '");
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    without_test_modules(&out)
}

/// After a raw string literal (`r"..."`, `r#"..."#`) at the start of `s`, if there is one.
fn raw_string_end(s: &str) -> Option<&str> {
    let after_r = s.strip_prefix('r').or_else(|| s.strip_prefix("br"))?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    let body = after_r[hashes..].strip_prefix('"')?;
    let close = format!("\"{}", "#".repeat(hashes));
    Some(body.find(&close).map_or("", |i| &body[i + close.len()..]))
}

/// After the closing `quote` of a literal whose opening quote is already consumed.
fn skip_quoted(s: &str, quote: char) -> &str {
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if c == quote {
            return &s[i + 1..];
        }
    }
    ""
}

/// `'x'` or `'\n'` rather than a lifetime `'a`.
fn is_char_literal(s: &str) -> bool {
    let mut chars = s.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// `code` without the modules behind a `#[cfg(...)]` that mentions `test`.
fn without_test_modules(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(") {
        out.push_str(&rest[..at]);
        let attr_end = rest[at..].find(")]").map_or(rest.len(), |i| at + i + 2);
        let attr = &rest[at..attr_end];
        let after = rest[attr_end..].trim_start();
        let is_test_mod = attr.contains("test")
            && after.starts_with("mod ")
            && after
                .find('{')
                .is_some_and(|b| after.find(';').is_none_or(|s| b < s));
        if !is_test_mod {
            out.push_str(attr);
            rest = &rest[attr_end..];
            continue;
        }
        let open = after.find('{').unwrap_or(0);
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The `::`-separated identifiers at the start of `s` (`a::b::C` -> [a, b, C]), and what
/// follows them; a trailing `::{` group is returned as the group's items.
fn path_at(s: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if len == 0 {
            break;
        }
        parts.push(rest[..len].to_string());
        rest = &rest[len..];
        match rest.strip_prefix("::") {
            Some(after) => rest = after,
            None => return (parts, Vec::new()),
        }
    }
    let group = rest
        .strip_prefix('{')
        .and_then(|g| g.find('}').map(|end| &g[..end]))
        .map(|g| {
            g.split(',')
                .map(|item| {
                    item.trim()
                        .split("::")
                        .map(|p| p.trim().to_string())
                        .filter(|p| !p.is_empty() && p.chars().all(is_ident))
                        .collect::<Vec<_>>()
                })
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    (parts, group)
}

/// Every path the code names after `crate::` and `super::` (made absolute), and bare paths that
/// start with one of `children`. Inside an inline `mod x { ... }`, `super` and children are
/// relative to that inline module.
fn named_paths(code: &str, me: &ModPath, children: &BTreeSet<String>) -> Vec<ModPath> {
    let mut found = Vec::new();
    // The inline modules around the current position, with the brace depth each opened at.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let c = rest.chars().next().unwrap_or(' ');
        let prev = code[..i].chars().next_back();
        let at_word = prev.is_none_or(|p| !is_ident(p) && p != ':');
        match c {
            '{' => depth += 1,
            '}' => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
            }
            _ => {}
        }
        if !at_word || !is_ident(c) {
            i += c.len_utf8();
            continue;
        }
        if let Some(name) = rest.strip_prefix("mod ").and_then(inline_mod_name) {
            inline.push((name, depth));
            i += 4;
            continue;
        }
        let here: ModPath = [me.clone(), inline.iter().map(|(n, _)| n.clone()).collect()].concat();
        let (base, tail): (ModPath, &str) = if let Some(t) = rest.strip_prefix("crate::") {
            (Vec::new(), t)
        } else if rest.starts_with("super::") {
            let mut t = rest;
            let mut up = 0;
            while let Some(after) = t.strip_prefix("super::") {
                t = after;
                up += 1;
            }
            (here[..here.len().saturating_sub(up)].to_vec(), t)
        } else {
            let word = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
            let child = inline.is_empty() && children.contains(&rest[..word]);
            if child && rest[word..].starts_with("::") {
                (me.clone(), rest)
            } else {
                i += word;
                continue;
            }
        };
        let (parts, group) = path_at(tail);
        let head = [base, parts].concat();
        if group.is_empty() {
            found.push(head.clone());
        }
        for item in group {
            found.push([head.clone(), item].concat());
        }
        i += (rest.len() - tail.len()).max(1);
    }
    found
}

/// The name of an inline module whose body opens right after it (`name {`), not `name;`.
fn inline_mod_name(s: &str) -> Option<String> {
    let len = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    let after = s[len..].trim_start();
    (len > 0 && after.starts_with('{')).then(|| s[..len].to_string())
}

/// The longest known module that `path` starts with.
fn resolve<'a>(path: &[String], known: &'a BTreeMap<ModPath, PathBuf>) -> Option<&'a ModPath> {
    (0..=path.len())
        .rev()
        .find_map(|n| known.get_key_value(&path[..n]).map(|(k, _)| k))
}

/// Which modules each module refers to.
pub fn edges(src: &Path) -> std::io::Result<BTreeMap<ModPath, BTreeSet<ModPath>>> {
    let known = modules(src)?;
    let mut out = BTreeMap::new();
    for (me, file) in &known {
        let code = code_of(&std::fs::read_to_string(file)?);
        let children: BTreeSet<String> = known
            .keys()
            .filter(|k| k.len() == me.len() + 1 && k.starts_with(me))
            .filter_map(|k| k.last().cloned())
            .collect();
        let targets: BTreeSet<ModPath> = named_paths(&code, me, &children)
            .iter()
            .filter_map(|p| resolve(p, &known))
            .filter(|t| *t != me)
            .cloned()
            .collect();
        out.insert(me.clone(), targets);
    }
    Ok(out)
}

/// The rings among `edges`: strongly connected components of more than one module (Tarjan).
pub fn rings(edges: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Vec<Vec<ModPath>> {
    struct Walk<'a> {
        edges: &'a BTreeMap<ModPath, BTreeSet<ModPath>>,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        rings: Vec<Vec<ModPath>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a ModPath) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let at = self.stack.iter().rposition(|x| *x == v).unwrap_or(0);
                let ring: Vec<ModPath> = self.stack.drain(at..).cloned().collect();
                if ring.len() > 1 {
                    self.rings.push(ring);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        rings: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.rings
}

fn name(m: &ModPath) -> String {
    if m.is_empty() {
        "<crate root>".into()
    } else {
        m.join("::")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        for (path, text) in files {
            let p = t.path().join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }
        t
    }

    fn ring_names(t: &tempfile::TempDir) -> Vec<Vec<String>> {
        let mut r: Vec<Vec<String>> = rings(&edges(t.path()).expect("edges"))
            .iter()
            .map(|ring| {
                let mut names: Vec<String> = ring.iter().map(name).collect();
                names.sort();
                names
            })
            .collect();
        r.sort();
        r
    }

    #[test]
    fn a_parent_using_a_child_that_uses_the_parent_is_a_ring() {
        let t = tree(&[
            ("main.rs", "mod phases;\nfn main() {}"),
            (
                "phases/mod.rs",
                "mod a;\npub struct Ctx;\nconst P: &[u8] = &a::X;",
            ),
            (
                "phases/a.rs",
                "use super::{Ctx, Other};\npub const X: u8 = 1;",
            ),
        ]);
        assert_eq!(ring_names(&t), vec![vec!["phases", "phases::a"]]);
    }

    #[test]
    fn a_child_using_the_crate_root_that_calls_it_is_a_ring() {
        let t = tree(&[
            (
                "main.rs",
                "mod up;\npub fn run() {}\nfn main() { up::go() }",
            ),
            ("up.rs", "pub fn go() { crate::run() }"),
        ]);
        assert_eq!(ring_names(&t), vec![vec!["<crate root>", "up"]]);
    }

    #[test]
    fn a_ring_through_three_modules_is_found() {
        let t = tree(&[
            ("main.rs", "mod a; mod b; mod c;\nfn main() {}"),
            ("a.rs", "use crate::b::X;"),
            ("b.rs", "fn f() { crate::c::g() }"),
            ("c.rs", "use crate::{a::Y, d};"),
        ]);
        assert_eq!(ring_names(&t), vec![vec!["a", "b", "c"]]);
    }

    #[test]
    fn layers_that_only_point_down_are_no_ring_and_comments_and_tests_do_not_count() {
        let t = tree(&[
            ("main.rs", "mod engine; mod context; mod phases;\nfn main() { engine::run(&phases::PLAN) }"),
            ("engine.rs", "// see crate::phases::PLAN\nuse crate::context::Ctx;\npub struct Phase;"),
            ("context.rs", "/* crate::engine */ pub struct Ctx;"),
            ("phases/mod.rs", "mod a;\npub const PLAN: &[u8] = &[a::X];"),
            (
                "phases/a.rs",
                "use crate::engine::Phase;\nuse crate::context::Ctx;\npub const X: u8 = 1;\n#[cfg(test)]\nmod tests { use super::super::PLAN; }",
            ),
        ]);
        assert_eq!(ring_names(&t), Vec::<Vec<String>>::new());
    }

    /// The check itself, on this workspace.
    #[test]
    fn no_module_of_the_workspace_is_in_a_ring() {
        let ws = crate::paths::workspace();
        let mut found = Vec::new();
        for krate in ["shared", "guest-init", "host", "xtask", "tests"] {
            let src = ws.join(krate).join("src");
            let e = edges(&src).unwrap_or_else(|err| panic!("{}: {err}", src.display()));
            for ring in rings(&e) {
                let names: Vec<String> = ring.iter().map(name).collect();
                found.push(format!("{krate}: {}", names.join(" <-> ")));
            }
        }
        assert!(found.is_empty(), "modules in rings:\n{}", found.join("\n"));
    }
}
