//! File replacement both sides need: a reader sees the old content or the new, never half of
//! either, and a crash leaves the old file in place.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`. A
/// symlink at `path` is replaced, not followed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_inner(path, bytes, None, true)
}

/// [`write_atomic`] without the sync, for files rewritten on every boot (resolv.conf): readers
/// still see old or new, never half, but a crash may lose the new content, which the next boot
/// writes again. On virtio-fs a sync is a round trip to the host's disk, during boot.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_inner(path, bytes, None, false)
}

/// [`write_atomic`] for secrets: the file has exactly `mode` (umask aside) from its creation on,
/// so the content is never readable under a wider mode, not even as the temporary file.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    write_atomic_inner(path, bytes, Some(mode), true)
}

fn write_atomic_inner(
    path: &Path,
    bytes: &[u8],
    mode: Option<u32>,
    sync: bool,
) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let result = (|| {
        // A temporary left by a crash may exist with another mode: start from nothing.
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode.unwrap_or(0o666))
            .open(&tmp)?;
        if let Some(mode) = mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
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

    #[test]
    fn mode_is_exact_even_over_a_wider_file() {
        use std::os::unix::fs::PermissionsExt;
        let t = std::env::temp_dir().join(format!("osh-fsutil-mode-{}", std::process::id()));
        std::fs::create_dir_all(&t).expect("dir");
        let p = t.join("key");
        std::fs::write(&p, "old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic_mode(&p, b"secret", 0o600).expect("replace");
        let meta = std::fs::metadata(&p).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&p).expect("read"), b"secret");
        std::fs::remove_dir_all(&t).expect("cleanup");
    }
}
