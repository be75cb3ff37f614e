//! The docs' link check: every relative link in README.md, ARCHITECTURE.md and docs/*.md must
//! name a file that exists, and a `#fragment` must name one of that file's headings.

use std::path::{Path, PathBuf};

/// The targets of the Markdown links `[text](target)` in `text`, in order.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, spaces to '-', punctuation other than '-' and '_'
/// dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| anchor(l.trim_start_matches('#')))
        .collect()
}

/// What is wrong with the relative links of `file`, one line each.
pub fn broken_links(file: &Path) -> std::io::Result<Vec<String>> {
    let text = std::fs::read_to_string(file)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut broken = Vec::new();
    for target in link_targets(&text) {
        if target.contains("://") || target.starts_with("mailto:") {
            continue;
        }
        let (path, fragment) = match target.split_once('#') {
            Some((p, f)) => (p, Some(f)),
            None => (target.as_str(), None),
        };
        let resolved: PathBuf = if path.is_empty() {
            file.to_path_buf()
        } else {
            dir.join(path)
        };
        if !resolved.exists() {
            broken.push(format!("{}: `{target}`: no such file", file.display()));
            continue;
        }
        if let Some(fragment) = fragment {
            let ok = resolved.is_file()
                && std::fs::read_to_string(&resolved)
                    .map(|t| anchors(&t).iter().any(|a| a == fragment))
                    .unwrap_or(false);
            if !ok {
                broken.push(format!(
                    "{}: `{target}`: no heading `#{fragment}` in {}",
                    file.display(),
                    resolved.display()
                ));
            }
        }
    }
    Ok(broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_links_outside_code_blocks_only() {
        let text = "see [a](docs/a.md) and [b](b.md#x)\n```\n[c](c.md)\n```\n![p](p.png)";
        assert_eq!(link_targets(text), ["docs/a.md", "b.md#x", "p.png"]);
    }

    #[test]
    fn anchors_follow_githubs_rule() {
        assert_eq!(
            anchor(" What runs for real, and what does not"),
            "what-runs-for-real-and-what-does-not"
        );
        assert_eq!(anchor("`up`: exit codes"), "up-exit-codes");
    }

    #[test]
    fn a_missing_file_and_a_missing_heading_are_named() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("b.md"), "# Real heading\n").expect("write");
        let a = t.path().join("a.md");
        std::fs::write(
            &a,
            "[ok](b.md) [ok2](b.md#real-heading) [gone](c.md) [bad](b.md#nope) [web](https://x.y/z)",
        )
        .expect("write");
        let broken = broken_links(&a).expect("read");
        assert_eq!(broken.len(), 2, "{broken:?}");
        assert!(broken[0].contains("`c.md`: no such file"), "{broken:?}");
        assert!(broken[1].contains("no heading `#nope`"), "{broken:?}");
    }

    /// The check itself, on this repository's docs.
    #[test]
    fn every_relative_link_in_the_docs_resolves() {
        let ws = crate::paths::workspace();
        let mut files = vec![ws.join("README.md"), ws.join("ARCHITECTURE.md")];
        let docs = ws.join("docs");
        for entry in std::fs::read_dir(&docs).expect("docs/") {
            let p = entry.expect("docs/ entry").path();
            if p.extension().is_some_and(|e| e == "md") {
                files.push(p);
            }
        }
        let mut broken = Vec::new();
        for f in &files {
            broken.extend(broken_links(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
        }
        assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    }
}
