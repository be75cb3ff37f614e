//! Feeds arbitrary bytes to the bundle's tar reader (the root member as the host reads it) and
//! to the manifest parser: neither may panic, and the reader never returns a body longer than
//! the size its header gave or a header over its own limits.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use openshell_shared::bundle::manifest::Manifest;
use openshell_shared::bundle::tar::{Kind, Reader, MAX_PATH_BYTES};

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::parse(data);
    let mut reader = Reader::new(data);
    let mut entries = 0;
    while let Ok(Some(h)) = reader.next_entry() {
        assert!(h.path.len() <= MAX_PATH_BYTES && h.link.len() <= MAX_PATH_BYTES);
        assert!(h.kind == Kind::File || h.size == 0);
        let mut body = Vec::new();
        let limit = h.size.min(1 << 20);
        let read = reader.body().take(limit).read_to_end(&mut body);
        if let Ok(n) = read {
            assert!(n as u64 <= h.size);
        }
        entries += 1;
        if entries > 10_000 {
            break;
        }
    }
});
