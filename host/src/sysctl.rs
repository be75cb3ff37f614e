//! macOS only: reading an integer kernel setting by name (`sysctlbyname`), for the checks that
//! ask the kernel what it allows (Hypervisor.framework support, open files per process).

use std::ffi::CStr;

/// The integer `name` holds, or the error `sysctlbyname` gave.
pub fn int(name: &CStr) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>();
    // SAFETY: the name is NUL-terminated; `value` and `len` are ours and sized for an int.
    let rc = unsafe {
        libc::sysctlbyname(
            name.as_ptr(),
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}
