//! e2fsprogs as the state disk uses them: `mke2fs` for a blank disk, `e2fsck -p` for a
//! filesystem that recorded errors, `resize2fs` to grow a mounted one. As PID 1 the programs come
//! from the guest's root (the gateway root has Debian's e2fsprogs, the base root none: the phase
//! then fails where it needs one, saying which); a phase run on a host uses the host's own, as a
//! scratch root has no programs and a root's could not run on the host anyway.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use openshell_init::guest_path::under;

use super::ondisk::LABEL;

/// Where the programs are looked for, in order.
const DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{device}: {program} is needed to {purpose}, but the root has only BusyBox's ({path}), which cannot make or mend ext4 as e2fsprogs does; a root with e2fsprogs is needed")]
    BusyBox {
        device: String,
        program: &'static str,
        purpose: &'static str,
        path: PathBuf,
    },
    #[error("{device}: {program} is needed to {purpose}, but there is none in {searched}")]
    Missing {
        device: String,
        program: &'static str,
        purpose: &'static str,
        searched: String,
    },
    #[error("{device}: cannot run {program}: {source}")]
    Spawn {
        device: String,
        program: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: `{command}` failed ({status}): {output}")]
    Failed {
        device: String,
        command: String,
        status: String,
        output: String,
    },
}

/// What `e2fsck -p` reported for a filesystem it could repair on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Its exit status: 0 nothing to fix, 1 fixed, 2 fixed and a reboot asked for.
    pub status: i32,
    /// Its last lines.
    pub output: String,
}

/// The e2fsprogs programs of one root.
pub struct E2fs {
    dirs: Vec<PathBuf>,
}

impl E2fs {
    /// The programs under `root` as PID 1; the host's own otherwise.
    pub fn new(root: &Path, pid1: bool) -> Self {
        let base = if pid1 { root } else { Path::new("/") };
        Self::in_dirs(DIRS.iter().map(|d| under(base, d)).collect())
    }

    /// The programs in `dirs` only.
    pub fn in_dirs(dirs: Vec<PathBuf>) -> Self {
        Self { dirs }
    }

    fn program(
        &self,
        name: &'static str,
        purpose: &'static str,
        device: &str,
    ) -> Result<PathBuf, ToolError> {
        let found = self.dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        // BusyBox has applets by these names that take none of the options used here.
        if let Some(path) = found.as_ref().filter(|p| is_busybox(p)) {
            return Err(ToolError::BusyBox {
                device: device.to_string(),
                program: name,
                purpose,
                path: path.clone(),
            });
        }
        found.ok_or_else(|| ToolError::Missing {
            device: device.to_string(),
            program: name,
            purpose,
            searched: self
                .dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Runs `name args... dev`; returns its exit status and its last lines of output.
    fn run(
        &self,
        name: &'static str,
        purpose: &'static str,
        args: &[&str],
        dev: &Path,
        after: Option<&str>,
        device: &str,
    ) -> Result<(i32, String), ToolError> {
        let program = self.program(name, purpose, device)?;
        let path = std::env::join_paths(&self.dirs).unwrap_or_default();
        let out = Command::new(&program)
            .args(args)
            .arg(dev)
            .args(after)
            .env_clear()
            .env("PATH", path)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ToolError::Spawn {
                device: device.to_string(),
                program: name,
                source,
            })?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let status = match out.status.code() {
            Some(code) => code,
            None => {
                return Err(self.failed(name, args, device, "killed by a signal".into(), &text));
            }
        };
        Ok((status, tail(&text)))
    }

    fn failed(
        &self,
        name: &str,
        args: &[&str],
        device: &str,
        status: String,
        text: &str,
    ) -> ToolError {
        ToolError::Failed {
            device: device.to_string(),
            command: format!("{name} {} {device}", args.join(" ")),
            status,
            output: tail(text),
        }
    }

    /// Formats the blank device `dev` as our ext4: labelled, no blocks reserved for root (the
    /// guest runs everything as root), inode tables and journal initialised lazily (the kernel
    /// zeroes them in the background after the mount) and no discard pass, so the first boot
    /// is not spent writing the whole disk. `blocks` (of 4 KiB) leaves the disk's reserved tail
    /// out of the filesystem.
    pub fn format(&self, dev: &Path, device: &str, blocks: u64) -> Result<(), ToolError> {
        // -F: a format cut short left metadata that mke2fs would otherwise ask about.
        let args = [
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-m",
            "0",
            "-L",
            LABEL,
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        ];
        let blocks = blocks.to_string();
        match self.run(
            "mke2fs",
            "format the blank disk",
            &args,
            dev,
            Some(&blocks),
            device,
        )? {
            (0, _) => Ok(()),
            (code, text) => Err(self.failed(
                "mke2fs",
                &args,
                device,
                format!("exit status {code}"),
                &text,
            )),
        }
    }

    /// `e2fsck -p`: repairs what is safe to repair without asking. Statuses 4 and up (errors
    /// left, or e2fsck itself failed) are an error with e2fsck's own words.
    pub fn check(&self, dev: &Path, device: &str) -> Result<Checked, ToolError> {
        let purpose = "check the filesystem, which recorded errors";
        match self.run("e2fsck", purpose, &["-p"], dev, None, device)? {
            (status @ 0..=3, output) => Ok(Checked { status, output }),
            (code, text) => Err(self.failed(
                "e2fsck",
                &["-p"],
                device,
                format!("exit status {code}: {}", fsck_meaning(code)),
                &text,
            )),
        }
    }

    /// Grows the mounted filesystem on `dev` to the device's size.
    /// Grows the filesystem to `blocks` of 4 KiB (the disk's new size less its reserved tail).
    pub fn grow(&self, dev: &Path, device: &str, blocks: u64) -> Result<(), ToolError> {
        let purpose = "grow the filesystem to the disk's new size";
        let blocks = blocks.to_string();
        match self.run("resize2fs", purpose, &[], dev, Some(&blocks), device)? {
            (0, _) => Ok(()),
            (code, text) => Err(self.failed(
                "resize2fs",
                &[],
                device,
                format!("exit status {code}"),
                &text,
            )),
        }
    }
}

/// A BusyBox applet: a link (of any depth) to a program called `busybox`.
fn is_busybox(program: &Path) -> bool {
    std::fs::canonicalize(program)
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "busybox"))
        .unwrap_or(false)
}

/// e2fsck's exit status, in words (its manual's table; bits may combine).
fn fsck_meaning(code: i32) -> &'static str {
    if code & 4 != 0 {
        "errors left uncorrected"
    } else if code & 8 != 0 {
        "operational error"
    } else if code & 16 != 0 {
        "usage error"
    } else if code & 32 != 0 {
        "cancelled"
    } else {
        "shared library error"
    }
}

/// The last lines of a program's output, on one line.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out = lines[lines.len().saturating_sub(6)..].join(" | ");
    if out.len() > 800 {
        let cut = (0..=800)
            .rev()
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(0);
        out.truncate(cut);
        out.push_str("...");
    }
    if out.is_empty() {
        "no output".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_the_device_purpose_and_directories() {
        let empty = tempfile::tempdir().expect("tmp");
        let tools = E2fs::new(empty.path(), true);
        let err = tools
            .format(Path::new("/nonexistent"), "/dev/vdb", 1024)
            .unwrap_err()
            .to_string();
        let dir = empty.path().display();
        assert_eq!(
            err,
            format!(
                "/dev/vdb: mke2fs is needed to format the blank disk, but there is none in \
                 {dir}/usr/sbin, {dir}/sbin, {dir}/usr/bin, {dir}/bin"
            )
        );
    }

    /// The base root's mke2fs is a BusyBox applet: named for what it is, never run.
    #[test]
    fn a_busybox_applet_is_not_taken_for_e2fsprogs() {
        let root = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(root.path().join("bin")).expect("mkdir");
        std::fs::write(root.path().join("bin/busybox"), "#!/bin/sh\nexit 0\n").expect("write");
        std::os::unix::fs::symlink("busybox", root.path().join("bin/mke2fs")).expect("link");
        let err = E2fs::new(root.path(), true)
            .format(Path::new("/nonexistent"), "/dev/vda", 1024)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "/dev/vda: mke2fs is needed to format the blank disk, but the root has only BusyBox's ({}/bin/mke2fs)",
                root.path().display()
            )),
            "{err}"
        );
    }

    /// The real mke2fs and e2fsck on an image file: formats as ours, checks clean; a failing
    /// run carries the program's own words.
    #[test]
    fn format_then_check_with_the_hosts_e2fsprogs() {
        let tools = E2fs::new(Path::new("/"), false);
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(64 << 20))
            .expect("image");
        match tools.format(&img, "img", super::super::ondisk::fs_blocks(64 << 20)) {
            Err(ToolError::Missing { .. }) => {
                eprintln!("skipped: no e2fsprogs on this host");
                return;
            }
            other => other.expect("format"),
        }
        let head = std::fs::read(&img).expect("read");
        match super::super::ondisk::identify(&head[..4096]) {
            super::super::ondisk::Content::Ours(ext) => {
                assert_eq!(ext.bytes(), (64 << 20) - (1 << 20), "the tail is left out")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            super::super::ondisk::identify(&head[..4096]),
            super::super::ondisk::Content::Ours(_)
        ));
        assert_eq!(tools.check(&img, "img").expect("check").status, 0);
        let err = tools
            .check(&dir.path().join("none"), "/dev/none")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "/dev/none: `e2fsck -p /dev/none` failed (exit status 8: operational error): "
            ),
            "{err}"
        );
    }

    #[test]
    fn tails_are_short_and_on_one_line() {
        assert_eq!(tail(""), "no output");
        assert_eq!(tail("a\n\n b \nc\n"), "a | b | c");
        let many: String = (0..20).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            tail(&many),
            "line 14 | line 15 | line 16 | line 17 | line 18 | line 19"
        );
        assert!(tail(&"é".repeat(2000)).ends_with("..."));
    }
}
