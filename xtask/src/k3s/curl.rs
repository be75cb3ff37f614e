//! One download with curl into a file, bounded in size: curl writes to a pipe and we copy into
//! the file, so a server that sends more than the bound (or never stops) is cut off at the bound
//! and cannot fill the disk. Verifying what arrived is the caller's job.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Fetches `url` into `dest` (created or truncated), at most `max` bytes, with a byte progress
/// bar. On error `dest` may hold part of the body; the caller removes it.
pub fn download(url: &str, dest: &Path, max: u64) -> Result<u64, String> {
    let total = content_length(url);
    if let Some(n) = total.filter(|n| *n > max) {
        return Err(format!(
            "the server announces {n} bytes, more than the {max} we accept"
        ));
    }
    let mut out = std::fs::File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut child = Command::new("curl")
        .args([
            "-fsSL",
            "--proto",
            "=http,https,file",
            "--connect-timeout",
            "15",
            url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    let bar = crate::progress::bytes(total, &format!("download {url}"));
    let copied = child
        .stdout
        .take()
        .ok_or_else(|| "curl has no output pipe".to_string())
        .and_then(|body| copy_bounded(body, &mut out, max, |n| bar.set_position(n)));
    bar.finish_and_clear();
    if copied.is_err() {
        // Cut off (too large, or the disk failed): curl is stopped, not waited on to finish.
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| format!("curl: {e}"))?;
    let n = copied?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!("curl {status}: {}", err.trim()));
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    Ok(n)
}

/// Copies `body` into `out`, failing once more than `max` bytes arrive.
fn copy_bounded(
    mut body: impl Read,
    out: &mut impl Write,
    max: u64,
    progress: impl Fn(u64),
) -> Result<u64, String> {
    let mut buf = vec![0u8; 1 << 16];
    let mut n: u64 = 0;
    loop {
        let got = body
            .read(&mut buf)
            .map_err(|e| format!("reading curl: {e}"))?;
        if got == 0 {
            return Ok(n);
        }
        n += got as u64;
        if n > max {
            return Err(format!(
                "the server sent more than the {max} bytes we accept; cut off"
            ));
        }
        out.write_all(&buf[..got])
            .map_err(|e| format!("writing the download: {e}"))?;
        progress(n);
    }
}

/// The size a HEAD request announces, if the server answers one.
fn content_length(url: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args([
            "-fsSLI",
            "--proto",
            "=http,https,file",
            "--connect-timeout",
            "15",
            url,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .rev()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .filter(|n| *n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_over_the_bound_is_cut_off() {
        let mut out = Vec::new();
        let body = std::io::repeat(7).take(1 << 20);
        let err = copy_bounded(body, &mut out, 1000, |_| {}).expect_err("too big");
        assert!(err.contains("more than the 1000 bytes"), "{err}");
        assert!(out.len() <= 1000, "kept {} bytes", out.len());
        let mut out = Vec::new();
        let n = copy_bounded(&b"exactly"[..], &mut out, 7, |_| {}).expect("fits");
        assert_eq!((n, out.as_slice()), (7, &b"exactly"[..]));
    }

    #[test]
    fn file_urls_download_and_missing_ones_fail() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        std::fs::write(&src, b"payload").expect("write");
        let dest = t.path().join("dest");
        let url = format!("file://{}", src.display());
        assert_eq!(download(&url, &dest, 100).expect("copied"), 7);
        assert_eq!(std::fs::read(&dest).expect("read"), b"payload");
        let err = download(&url, &dest, 3).expect_err("over the bound");
        assert!(err.contains("more than the 3"), "{err}");
        let gone = format!("file://{}", t.path().join("nothing").display());
        let err = download(&gone, &dest, 100).expect_err("missing");
        assert!(err.contains("curl"), "{err}");
    }
}
