//! Arbitrary bytes into the frame decoder and the stream reader: no input
//! may panic, and whatever decodes must re-encode to an equal value.

#![no_main]

use ftlog::codec::{decode_frame, encode_frame, encode_preamble};
use ftlog::LogReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Frame by frame, as an async reader would.
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest) {
        let mut again = Vec::new();
        let n = encode_frame(&frame, &mut again).expect("a decoded frame re-encodes");
        let (back, m) = decode_frame(&again)
            .expect("re-encoded frame decodes")
            .expect("re-encoded frame is whole");
        assert_eq!(back, frame);
        assert_eq!(m, n);
        rest = &rest[used..];
    }

    // The reader on the raw bytes, and behind a valid preamble so the
    // fuzzer need not find the magic itself.
    let mut framed = Vec::with_capacity(data.len() + 12);
    encode_preamble(&mut framed);
    framed.extend_from_slice(data);
    for input in [data, &framed[..]] {
        if let Ok(mut r) = LogReader::new(input) {
            let mut last = None;
            while let Ok(Some(e)) = r.next_entry() {
                if let Some(prev) = last {
                    assert_eq!(e.seq, prev + 1);
                }
                last = Some(e.seq);
                assert!(r.offset() <= input.len() as u64);
            }
        }
    }
});
