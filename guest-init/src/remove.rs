//! Removal that never follows links: a file, link or whole tree, or what is inside a directory,
//! counting what went. A link is removed as a link, so a planted one cannot point a cleanup at
//! anything outside the directories it was given. The cleanup phases use it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot remove {path}: {source}")]
pub struct CleanupError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// A directory itself, not a link to one.
pub fn is_real_dir(p: &Path) -> bool {
    p.symlink_metadata().is_ok_and(|m| m.is_dir())
}

/// Removes `path` (file, link or directory tree) and returns how many entries went. A link is
/// removed as a link; a missing path removes nothing.
pub fn remove_tree(path: &Path) -> Result<usize, CleanupError> {
    let err = |source| CleanupError {
        path: path.to_path_buf(),
        source,
    };
    let meta = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(err(e)),
    };
    if !meta.is_dir() {
        std::fs::remove_file(path).map_err(err)?;
        return Ok(1);
    }
    let mut count = 0;
    for entry in std::fs::read_dir(path).map_err(err)? {
        count += remove_tree(&entry.map_err(err)?.path())?;
    }
    std::fs::remove_dir(path).map_err(err)?;
    Ok(count + 1)
}

/// Removes what is inside `dir` and returns how many entries went; `dir` stays (a link in its
/// place is removed as a link, never followed).
pub fn empty_dir(dir: &Path) -> Result<usize, CleanupError> {
    if !is_real_dir(dir) {
        return remove_tree(dir);
    }
    let err = |source| CleanupError {
        path: dir.to_path_buf(),
        source,
    };
    let mut count = 0;
    for entry in std::fs::read_dir(dir).map_err(err)? {
        count += remove_tree(&entry.map_err(err)?.path())?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_removes_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        assert_eq!(remove_tree(&t.path().join("none")).expect("missing"), 0);
        assert_eq!(empty_dir(&t.path().join("none")).expect("missing"), 0);
    }

    #[test]
    fn trees_are_counted_and_links_removed_as_links() {
        let t = tempfile::tempdir().expect("tmp");
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("kept"), "mine").expect("write");
        let dir = t.path().join("dir");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/f"), "x").expect("write");
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).expect("link");
        // sub/f, sub, link: emptied, the directory stays.
        assert_eq!(empty_dir(&dir).expect("empty"), 3);
        assert!(is_real_dir(&dir));
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        assert!(outside.path().join("kept").exists());
        // A link in the directory's place goes as a link.
        std::fs::remove_dir(&dir).expect("rmdir");
        std::os::unix::fs::symlink(outside.path(), &dir).expect("link");
        assert!(!is_real_dir(&dir));
        assert_eq!(empty_dir(&dir).expect("link"), 1);
        assert!(dir.symlink_metadata().is_err());
        assert!(outside.path().join("kept").exists());
    }
}
