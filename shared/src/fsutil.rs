//! File replacement both sides need: a reader sees the old content or the new, never half of
//! either, and a crash leaves the old file in place.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`. A
/// symlink at `path` is replaced, not followed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_links_and_leaves_no_temporary() {
        let t = std::env::temp_dir().join(format!("osh-fsutil-{}", std::process::id()));
        std::fs::create_dir_all(&t).expect("dir");
        let p = t.join("f");
        std::fs::write(&p, "old").expect("write");
        write_atomic(&p, b"new").expect("replace");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "new");
        let link = t.join("l");
        std::os::unix::fs::symlink(&p, &link).expect("link");
        write_atomic(&link, b"own").expect("replace link");
        assert!(std::fs::symlink_metadata(&link).expect("meta").is_file());
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "new",
            "target untouched"
        );
        assert_eq!(std::fs::read_dir(&t).expect("ls").count(), 2);
        // A directory in the way: the error comes back and nothing is left behind.
        assert!(write_atomic(&t.join("missing/x"), b"x").is_err());
        std::fs::remove_dir_all(&t).expect("cleanup");
    }
}
