//! Which machine an ELF executable is for: the header fields a binary baked into a guest root must
//! agree on with the guest (64-bit, little-endian, an executable or PIE, the guest's
//! `e_machine`), read from the file's first 64 bytes, so a wrong-arch binary is refused at build
//! time instead of failing with "exec format error" inside the VM.

use std::io::Read;
use std::path::{Path, PathBuf};

use openshell_shared::Arch;

/// The ELF64 header's size; every field checked lies in it.
const HEADER: usize = 64;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not an ELF executable ({why})")]
    NotElf { file: PathBuf, why: String },
    #[error("{file}: built for {found} (ELF e_machine {found_machine}), but the root is {want} (e_machine {want_machine})")]
    WrongArch {
        file: PathBuf,
        found: String,
        found_machine: u16,
        want: &'static str,
        want_machine: u16,
    },
}

/// The `e_machine` value of `arch`'s executables.
pub fn machine_of(arch: Arch) -> u16 {
    match arch {
        Arch::X86_64 => 62,
        Arch::Aarch64 => 183,
    }
}

/// A readable name for an `e_machine` value (the common ones; the number otherwise).
pub fn machine_name(machine: u16) -> String {
    match machine {
        3 => "i386".into(),
        8 => "mips".into(),
        20 => "powerpc".into(),
        21 => "powerpc64".into(),
        22 => "s390x".into(),
        40 => "arm (32-bit)".into(),
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        258 => "loongarch".into(),
        other => format!("machine {other}"),
    }
}

/// Checks that `file` is a 64-bit little-endian ELF executable (or PIE) for `arch`.
pub fn check_executable(file: &Path, arch: Arch) -> Result<(), ElfError> {
    let mut head = Vec::with_capacity(HEADER);
    std::fs::File::open(file)
        .and_then(|f| f.take(HEADER as u64).read_to_end(&mut head))
        .map_err(|source| ElfError::Read {
            file: file.to_path_buf(),
            source,
        })?;
    let not = |why: &str| ElfError::NotElf {
        file: file.to_path_buf(),
        why: why.to_string(),
    };
    if head.len() < HEADER || head[..4] != *b"\x7fELF" {
        return Err(not("no ELF header"));
    }
    if head[4] != 2 {
        return Err(not("32-bit ELF; the guest runs 64-bit binaries"));
    }
    if head[5] != 1 {
        return Err(not("big-endian ELF; the guest is little-endian"));
    }
    let e_type = u16::from_le_bytes([head[16], head[17]]);
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Err(not(&format!(
            "ELF type {e_type}, not an executable (2) or position-independent executable (3)"
        )));
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    let want = machine_of(arch);
    if machine != want {
        return Err(ElfError::WrongArch {
            file: file.to_path_buf(),
            found: machine_name(machine),
            found_machine: machine,
            want: arch.name(),
            want_machine: want,
        });
    }
    Ok(())
}

/// A bare ELF64 header for `machine` and `e_type` (what [`check_executable`] reads), for tests:
/// no program headers, so it is not something a kernel would run.
#[cfg(test)]
pub fn header(machine: u16, e_type: u16) -> Vec<u8> {
    let mut h = vec![0u8; HEADER];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // ELFCLASS64
    h[5] = 1; // little-endian
    h[6] = 1; // EV_CURRENT
    h[16..18].copy_from_slice(&e_type.to_le_bytes());
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[52..54].copy_from_slice(&(HEADER as u16).to_le_bytes()); // e_ehsize
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    #[test]
    fn the_right_machine_passes_and_a_wrong_one_is_named() {
        let t = tempfile::tempdir().expect("tmp");
        let arm = write(t.path(), "sup-arm", &header(183, ET_DYN));
        check_executable(&arm, Arch::Aarch64).expect("aarch64 PIE for aarch64");
        let err = check_executable(&arm, Arch::X86_64).expect_err("wrong arch");
        let text = err.to_string();
        assert!(text.contains(&arm.display().to_string()), "{text}");
        assert!(text.contains("aarch64") && text.contains("183"), "{text}");
        assert!(text.contains("x86_64") && text.contains("62"), "{text}");
        let x86 = write(t.path(), "sup-x86", &header(62, ET_EXEC));
        check_executable(&x86, Arch::X86_64).expect("x86_64 executable");
        let riscv = write(t.path(), "sup-rv", &header(243, ET_EXEC));
        let text = check_executable(&riscv, Arch::Aarch64)
            .expect_err("riscv")
            .to_string();
        assert!(text.contains("riscv (ELF e_machine 243)"), "{text}");
    }

    #[test]
    fn what_is_not_a_64_bit_executable_is_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let script = write(t.path(), "s.sh", b"#!/bin/sh\necho supervisor\n");
        let mut elf32 = header(62, ET_EXEC);
        elf32[4] = 1;
        let mut big = header(62, ET_EXEC);
        big[5] = 2;
        let object = header(62, 1); // ET_REL: a .o file
        for (name, bytes, why) in [
            ("short", &b"\x7fELF"[..], "no ELF header"),
            ("elf32", &elf32[..], "32-bit"),
            ("big", &big[..], "big-endian"),
            ("obj", &object[..], "ELF type 1"),
        ] {
            let p = write(t.path(), name, bytes);
            let text = check_executable(&p, Arch::X86_64)
                .expect_err(name)
                .to_string();
            assert!(text.contains(why), "{name}: {text}");
        }
        let text = check_executable(&script, Arch::X86_64)
            .expect_err("a script")
            .to_string();
        assert!(text.contains("s.sh: not an ELF executable"), "{text}");
        assert!(check_executable(&t.path().join("absent"), Arch::X86_64).is_err());
    }
}
