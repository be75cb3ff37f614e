//! Feeds arbitrary bytes, split at arbitrary points, to the boot channel decoder: it must never
//! panic, never buffer more than one bounded frame, and every frame it accepts must re-encode.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openshell_shared::protocol::{encode, FrameDecoder, GuestMessage, HostMessage, HEADER_LEN};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let mut guest = FrameDecoder::new(MAX);
    let mut host = FrameDecoder::new(MAX);
    for piece in rest.chunks(chunk) {
        guest.push(piece);
        host.push(piece);
        while let Ok(Some(frame)) = guest.next_frame::<GuestMessage>() {
            let bytes = encode(&frame).expect("accepted frame re-encodes");
            let mut again = FrameDecoder::new(usize::MAX >> 1);
            again.push(&bytes);
            assert_eq!(again.next_frame::<GuestMessage>().ok().flatten(), Some(frame));
        }
        while let Ok(Some(_)) = host.next_frame::<HostMessage>() {}
        assert!(guest.buffered() <= MAX + HEADER_LEN + chunk);
        assert!(host.buffered() <= MAX + HEADER_LEN + chunk);
    }
    let _ = guest.finish();
});
