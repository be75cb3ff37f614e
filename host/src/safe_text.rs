//! Guest text made harmless for the user's terminal. Phase names, log lines, errors and the
//! console come from a guest that may be hostile: raw, an escape sequence could retitle the
//! window, rewrite what was printed above, fake a host line after a newline, or (on some
//! terminals) answer with keystrokes. Control characters (C0, DEL, C1) and the invisible
//! direction overrides are shown as escapes instead; everything else passes unchanged.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal raw: controls and bidirectional formatting.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` on one line with every unsafe character escaped (`\n`, `\u{1b}`, ...).
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if is_unsafe(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
        c => out.push(c),
    }
}

/// A JSON line (serde_json's output) with the characters serde_json leaves raw (DEL, C1,
/// direction overrides) as JSON escapes: still the same JSON, but safe on a terminal.
pub fn escape_json(line: &str) -> Cow<'_, str> {
    if !line.chars().any(is_unsafe) {
        return Cow::Borrowed(line);
    }
    let mut out = String::with_capacity(line.len() + 8);
    for c in line.chars() {
        if is_unsafe(c) {
            // Outside strings serde_json writes only ASCII punctuation, digits and letters.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Console bytes for a terminal: lines (`\n`, `\r\n`) and tabs stay, every other control and
/// any byte that is not UTF-8 is escaped (`\x9b`).
pub fn escape_console(bytes: &[u8]) -> Vec<u8> {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        let mut chars = chunk.valid().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' | '\t' => out.push(c),
                '\r' if chars.peek() == Some(&'\n') => out.push(c),
                c => push_escaped(&mut out, c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hostile guest sends: a window retitle, a screen clear, a cursor move, a C1 CSI,
    /// a fake host line after a newline, a direction override.
    const HOSTILE: &str = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\u{1b}[1A\u{9b}31m\nopenshell-host: ready\u{202e}txt.exe\u{7f}";

    #[test]
    fn controls_and_overrides_are_escaped_on_one_line() {
        let shown = escape(HOSTILE);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(
            shown,
            "ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{1b}[1A\\u{9b}31m\\nopenshell-host: ready\\u{202e}txt.exe\\u{7f}"
        );
        assert!(matches!(escape("plain ü text"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_lines_stay_json() {
        let line = serde_json::json!({ "text": HOSTILE }).to_string();
        let shown = escape_json(&line);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        let back: serde_json::Value = serde_json::from_str(&shown).expect("still JSON");
        assert_eq!(back["text"], HOSTILE);
    }

    #[test]
    fn the_console_keeps_its_lines_and_loses_its_escapes() {
        let mut raw = b"boot\r\nline\ttab\r".to_vec();
        raw.extend(HOSTILE.as_bytes());
        raw.extend([0xff, b'\n']);
        let shown = String::from_utf8(escape_console(&raw)).expect("utf-8");
        assert!(
            shown.starts_with("boot\r\nline\ttab\\rok\\u{1b}]0;pwned"),
            "{shown}"
        );
        assert!(shown.ends_with("\\u{7f}\\xff\n"), "{shown}");
        assert!(!shown
            .chars()
            .any(|c| is_unsafe(c) && !matches!(c, '\n' | '\t' | '\r')));
    }
}
