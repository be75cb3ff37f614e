//! The k3s release's checksum file (`sha256sum-<arch>.txt`): read strictly, so a damaged or
//! doctored file is refused rather than half-used.
//!
//! The release writes it with GNU `sha256sum` and concatenates the pieces: one line per asset,
//! `<64 hex digits><two spaces><asset name>` (`<space>*<name>` is sha256sum's binary mode, taken
//! too). k3s's installer greps the line ending in ` k3s<suffix>` and takes its first field; we
//! take the same digest but refuse the whole file when any line is not of that form.

use std::collections::BTreeMap;

/// The largest checksum file we keep: the real ones are a few hundred bytes (four lines).
pub const MAX_BYTES: u64 = 64 * 1024;

/// What is wrong with a checksum file, naming it (`file`: its URL or path) and the line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SumsError {
    #[error("{file}: line {line}: {what}; refusing the checksum file")]
    Line {
        file: String,
        line: usize,
        what: String,
    },
    #[error("{file}: not UTF-8 text; refusing the checksum file")]
    NotText { file: String },
    #[error("{file}: lists no asset at all; refusing the checksum file")]
    Empty { file: String },
}

/// A parsed checksum file: asset name to lowercase hex SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sums {
    /// Where it came from (URL or path), for messages.
    pub file: String,
    digests: BTreeMap<String, String>,
}

impl Sums {
    /// The published SHA-256 of `asset`, if the file lists it.
    pub fn digest(&self, asset: &str) -> Option<&str> {
        self.digests.get(asset).map(String::as_str)
    }
}

/// Parses `bytes` (the whole file, named `file` in errors). Every line must be a checksum line;
/// the file ends with a newline or not, but holds no blank lines.
pub fn parse(file: &str, bytes: &[u8]) -> Result<Sums, SumsError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SumsError::NotText { file: file.into() })?;
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut digests = BTreeMap::new();
    if body.is_empty() {
        return Err(SumsError::Empty { file: file.into() });
    }
    for (i, line) in body.split('\n').enumerate() {
        let bad = |what: String| SumsError::Line {
            file: file.into(),
            line: i + 1,
            what,
        };
        let (digest, asset) = split_line(line).map_err(bad)?;
        if let Some(first) = digests.insert(asset.to_string(), digest) {
            return Err(bad(format!("{asset} is listed twice (first with {first})")));
        }
    }
    Ok(Sums {
        file: file.into(),
        digests,
    })
}

/// One line into (lowercase digest, asset name), or what is wrong with it.
fn split_line(line: &str) -> Result<(String, &str), String> {
    let shown = || format!("{:?}", line.chars().take(120).collect::<String>());
    let Some((digest, rest)) = line.split_once(' ') else {
        return Err(format!("not `<sha256>  <asset>`: {}", shown()));
    };
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the digest is not 64 hex digits: {}", shown()));
    }
    let asset = rest
        .strip_prefix(' ')
        .or_else(|| rest.strip_prefix('*'))
        .ok_or_else(|| format!("not `<sha256>  <asset>`: {}", shown()))?;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+');
    if asset.is_empty() || !asset.chars().all(plain) || asset.starts_with('.') {
        return Err(format!(
            "the asset name is not a plain file name: {}",
            shown()
        ));
    }
    Ok((digest.to_ascii_lowercase(), asset))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "3ae8e35a62ac83e8e197c117858a564134057a7b8703cf73e67ce60d19f4a22b";
    const B: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn the_release_layout_is_read() {
        let text = format!(
            "{B}  k3s-airgap-images-amd64.tar\n{B}  k3s-airgap-images-amd64.tar.gz\n\
             {}  k3s-airgap-images-amd64.tar.zst\n{A}  k3s\n",
            B.replace('0', "1")
        );
        let s = parse("sha256sum-amd64.txt", text.as_bytes()).expect("parses");
        assert_eq!(s.digest("k3s"), Some(A));
        assert_eq!(s.digest("k3s-airgap-images-amd64.tar"), Some(B));
        assert_eq!(
            s.digest("k3s-airgap-images-amd64.tar.zst"),
            Some(B.replace('0', "1").as_str())
        );
        assert_eq!(s.digest("k3s-arm64"), None);
        // Binary mode, no final newline, uppercase digits (normalised).
        let s = parse(
            "f",
            format!("{}\x20*k3s-arm64", A.to_uppercase()).as_bytes(),
        )
        .expect("ok");
        assert_eq!(s.digest("k3s-arm64"), Some(A));
    }

    #[test]
    fn bad_files_are_refused_naming_file_and_line() {
        let cases: [(String, usize, &str); 9] = [
            (
                format!("{A}  k3s\n{}  k3s-arm64\n", &A[..63]),
                2,
                "64 hex digits",
            ),
            (format!("{A}  k3s\n{}g  x\n", &A[..63]), 2, "64 hex digits"),
            (format!("{A}  k3s\n{B}  k3s\n"), 2, "listed twice"),
            (
                format!("{A}  k3s\n\n{B}  x\n"),
                2,
                "not `<sha256>  <asset>`",
            ),
            (format!("{A}k3s\n"), 1, "not `<sha256>  <asset>`"),
            (format!("{A} \tk3s\n"), 1, "not `<sha256>  <asset>`"),
            (format!("{A}  ../k3s\n"), 1, "plain file name"),
            (format!("{A}  k3s \n"), 1, "plain file name"),
            (format!("{A}  k3s\r\n"), 1, "plain file name"),
        ];
        for (text, line, what) in cases {
            let err = parse("http://m/sha256sum-amd64.txt", text.as_bytes()).expect_err(&text);
            let msg = err.to_string();
            assert!(
                matches!(err, SumsError::Line { line: l, .. } if l == line),
                "{text:?}: {msg}"
            );
            assert!(msg.contains("http://m/sha256sum-amd64.txt"), "{msg}");
            assert!(msg.contains(&format!("line {line}")), "{msg}");
            assert!(msg.contains(what), "{text:?}: {msg}");
        }
        assert!(matches!(parse("f", b""), Err(SumsError::Empty { .. })));
        assert!(matches!(parse("f", b"\n"), Err(SumsError::Empty { .. })));
        assert!(matches!(
            parse("f", b"\xff\xfe"),
            Err(SumsError::NotText { .. })
        ));
    }
}
