//! Damaged, cut and malformed streams: always a precise error, never a
//! panic and never a silently different entry.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{self, Read};

use common::*;
use ftlog::codec::{
    decode_frame, encode_frame, encode_preamble, Frame, FRAME_HEAD_LEN, MAX_FRAME_LEN, PREAMBLE_LEN,
};
use ftlog::{EntryKind, ExecPoint, LogEntry, LogError, LogReader, LogWriter};
use proptest::prelude::*;

/// Read a whole stream: the entries returned, then how it ended.
fn read_until_end(bytes: &[u8]) -> (Vec<LogEntry>, Result<(), LogError>) {
    let mut r = match LogReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let mut got = Vec::new();
    loop {
        match r.next_entry() {
            Ok(Some(e)) => got.push(e),
            Ok(None) => return (got, Ok(())),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// Byte offsets where each frame starts, and where the stream ends.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut at = PREAMBLE_LEN;
    let mut starts = vec![at];
    while at < bytes.len() {
        let (_, used) = decode_frame(&bytes[at..]).unwrap().unwrap();
        at += used;
        starts.push(at);
    }
    starts
}

fn stream_of(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_preamble(&mut out);
    for f in frames {
        encode_frame(f, &mut out).unwrap();
    }
    out
}

fn entry(seq: u64, count: u64) -> LogEntry {
    LogEntry {
        seq,
        point: ExecPoint {
            count,
            rip: 0x100,
            rcx: 0,
        },
        kind: EntryKind::IrqRaise { irq: 0 },
    }
}

#[test]
fn every_single_bit_flip_is_caught() {
    let (entries, bytes) = small_log();
    let starts = frame_starts(&bytes);
    for bit in 0..bytes.len() * 8 {
        let mut bad = bytes.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let (got, end) = read_until_end(&bad);
        let byte = bit / 8;
        assert_eq!(
            got,
            entries[..got.len()],
            "bit {bit}: a returned entry differs"
        );
        let err = end.expect_err("a flipped bit went unnoticed");
        if byte < 8 {
            assert!(matches!(err, LogError::BadMagic { .. }), "bit {bit}: {err}");
            continue;
        }
        if byte < PREAMBLE_LEN {
            assert!(
                matches!(err, LogError::UnsupportedVersion { .. }),
                "bit {bit}: {err}"
            );
            continue;
        }
        // The frame holding the flipped byte, and where in it.
        let frame = starts.iter().rposition(|&s| s <= byte).unwrap();
        let within = byte - starts[frame];
        // Entries before the damaged frame all came back.
        let before = frame.saturating_sub(1); // frame 0 is the header
        assert_eq!(got.len(), before, "bit {bit}");
        let err_frame = match &err {
            LogError::Checksum { at, .. } => at.index,
            LogError::Truncated { at, .. }
            | LogError::DamagedLength { at, .. }
            | LogError::FrameTooLarge { at, .. } => {
                assert!(
                    within < 4,
                    "bit {bit}: only a length flip can do that: {err}"
                );
                at.index
            }
            other => panic!("bit {bit}: unexpected error {other}"),
        };
        assert_eq!(err_frame, frame as u64, "bit {bit}: {err}");
        if within >= 4 {
            assert!(matches!(err, LogError::Checksum { .. }), "bit {bit}: {err}");
        }
    }
}

#[test]
fn a_cut_at_any_byte_returns_what_came_before_it() {
    let (entries, bytes) = small_log();
    let starts = frame_starts(&bytes);
    for cut in 0..=bytes.len() {
        let (got, end) = read_until_end(&bytes[..cut]);
        if cut < PREAMBLE_LEN {
            assert!(
                matches!(end, Err(LogError::TruncatedPreamble { present }) if present == cut),
                "cut {cut}: {end:?}"
            );
            continue;
        }
        if cut == PREAMBLE_LEN {
            assert!(
                matches!(end, Err(LogError::MissingHeader { offset: 12 })),
                "{end:?}"
            );
            continue;
        }
        // Frames wholly before the cut; the first is the header.
        let whole = starts.iter().filter(|&&s| s <= cut).count() - 1;
        assert_eq!(got, entries[..whole.saturating_sub(1)], "cut {cut}");
        if starts.contains(&cut) {
            assert!(end.is_ok(), "cut {cut} is at a frame boundary: {end:?}");
            continue;
        }
        let start = starts[whole];
        let full = starts[whole + 1] - start;
        let present = cut - start;
        let expected = if present < FRAME_HEAD_LEN {
            FRAME_HEAD_LEN
        } else {
            full
        };
        match end {
            Err(LogError::Truncated {
                at,
                expected: e,
                present: p,
            }) => {
                assert_eq!(at.index, whole as u64, "cut {cut}");
                assert_eq!(at.offset, start as u64, "cut {cut}");
                assert_eq!((e, p), (expected as u64, present as u64), "cut {cut}");
            }
            other => panic!("cut {cut}: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn wrong_magic_is_not_an_ftvmm_log() {
    let mut bytes = small_log().1;
    bytes[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
    let e = LogReader::new(&bytes[..]).unwrap_err();
    assert!(matches!(e, LogError::BadMagic { found } if &found[..4] == b"\x7fELF"));
    assert!(e.to_string().starts_with("not an ftvmm log"), "{e}");
    // Garbage shorter than the magic is still garbage, not "truncated".
    let e = LogReader::new(&b"hi"[..]).unwrap_err();
    assert!(matches!(e, LogError::BadMagic { .. }), "{e}");
}

#[test]
fn other_versions_are_refused_naming_both() {
    for v in [0u32, 1, 2, 3, 4, 6, 0xdead_beef] {
        let mut bytes = small_log().1;
        bytes[8..12].copy_from_slice(&v.to_le_bytes());
        let e = LogReader::new(&bytes[..]).unwrap_err();
        assert!(
            matches!(e, LogError::UnsupportedVersion { found, min: 5, max: 5 } if found == v),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&v.to_string()) && msg.contains("versions 5 to 5"),
            "{msg}"
        );
    }
}

/// An endless source, as a socket from a confused peer might be.
struct Endless;

impl Read for Endless {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        out.fill(0);
        Ok(out.len())
    }
}

#[test]
fn an_oversized_length_is_refused_before_reading_the_payload() {
    let mut bytes = stream_of(&[Frame::Header(header())]);
    let at = bytes.len();
    bytes.extend_from_slice(&(MAX_FRAME_LEN + 1).to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    let e = decode_frame(&bytes[at..]).unwrap_err();
    assert!(matches!(e, LogError::FrameTooLarge { len, max, .. }
        if len == u64::from(MAX_FRAME_LEN) + 1 && max == MAX_FRAME_LEN));

    // The reader gives up at the head, though the payload never ends.
    let mut r = LogReader::new(bytes.as_slice().chain(Endless)).unwrap();
    let e = r.next_entry().unwrap_err();
    assert!(
        matches!(e, LogError::FrameTooLarge { at: a, .. } if a.index == 1 && a.offset == at as u64),
        "{e}"
    );
    assert!(e.to_string().contains("frame 1 at byte"), "{e}");
}

/// A frame with a correct CRC over the given payload.
fn raw_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[test]
fn a_payload_that_is_no_frame_is_a_decode_error() {
    for payload in [&[][..], &[0xff], &[1, 1]] {
        let e = decode_frame(&raw_frame(payload)).unwrap_err();
        assert!(matches!(e, LogError::Decode { .. }), "{payload:?}: {e}");
        assert!(
            e.to_string().starts_with("undecodable payload in frame 0"),
            "{e}"
        );
    }
    // A valid frame value followed by stray bytes is refused too.
    let mut good = Vec::new();
    encode_frame(&Frame::Entry(entry(0, 0)), &mut good).unwrap();
    let mut payload = good[FRAME_HEAD_LEN..].to_vec();
    payload.push(0);
    let e = decode_frame(&raw_frame(&payload)).unwrap_err();
    assert!(matches!(&e, LogError::Decode { reason, .. } if reason.contains("1 bytes after")));
}

#[test]
fn the_first_frame_must_be_the_header_and_only_the_first() {
    let bytes = stream_of(&[Frame::Entry(entry(0, 0))]);
    let e = LogReader::new(&bytes[..]).unwrap_err();
    assert!(matches!(
        e,
        LogError::UnexpectedFrame {
            expected: "header",
            found: "entry",
            ..
        }
    ));

    let bytes = stream_of(&[
        Frame::Header(header()),
        Frame::Entry(entry(0, 0)),
        Frame::Header(header()),
    ]);
    let mut r = LogReader::new(&bytes[..]).unwrap();
    assert_eq!(r.next_entry().unwrap(), Some(entry(0, 0)));
    let e = r.next_entry().unwrap_err();
    assert!(
        matches!(e, LogError::UnexpectedFrame { at, expected: "entry", found: "header" }
        if at.index == 2)
    );
}

#[test]
fn the_reader_checks_sequence_and_time() {
    let h = Frame::Header(header());
    let cases = [
        (vec![entry(1, 0)], 0),              // must start at 0
        (vec![entry(0, 0), entry(2, 0)], 1), // gap
        (vec![entry(0, 0), entry(0, 0)], 1), // repeat
        (vec![entry(0, 5), entry(1, 4)], 1), // count went back
    ];
    for (entries, bad) in cases {
        let mut frames = vec![h.clone()];
        frames.extend(entries.iter().cloned().map(Frame::Entry));
        let (got, end) = read_until_end(&stream_of(&frames));
        assert_eq!(got, entries[..bad]);
        let e = end.unwrap_err();
        assert!(
            matches!(
                e,
                LogError::Sequence { .. } | LogError::PointBackwards { .. }
            ),
            "{e}"
        );
    }
    // Same count, lower RIP/RCX: fine (REP instructions count RCX down).
    let mut later = entry(1, 5);
    later.point.rcx = 0;
    let mut earlier = entry(0, 5);
    earlier.point.rcx = 9;
    let frames = [
        h,
        Frame::Entry(earlier.clone()),
        Frame::Entry(later.clone()),
    ];
    let (got, end) = read_until_end(&stream_of(&frames));
    end.unwrap();
    assert_eq!(got, [earlier, later]);
}

#[test]
fn the_writer_refuses_disorder_and_stays_usable() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.append(&entry(0, 10)).unwrap();
    let before = w.bytes_written();
    let e = w.append(&entry(2, 10)).unwrap_err();
    assert!(
        matches!(
            e,
            LogError::Sequence {
                expected: 1,
                found: 2,
                ..
            }
        ),
        "{e}"
    );
    let e = w.append(&entry(1, 9)).unwrap_err();
    assert!(matches!(e, LogError::PointBackwards { seq: 1, .. }), "{e}");
    assert!(e.to_string().contains("goes back in time"), "{e}");
    assert_eq!(w.bytes_written(), before, "nothing was written");
    w.append(&entry(1, 10)).unwrap();
    let (got, end) = read_until_end(&w.into_inner().unwrap());
    end.unwrap();
    assert_eq!(got, [entry(0, 10), entry(1, 10)]);
}

#[test]
fn errors_are_sticky_and_the_iterator_stops() {
    let (_, mut bytes) = small_log();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    let mut r = LogReader::new(&bytes[..]).unwrap();
    let n = r.by_ref().take_while(Result::is_ok).count();
    assert_eq!(n, KIND_COUNT - 1);
    assert!(r.next().is_none(), "the iterator stops after its error");
    for _ in 0..2 {
        assert!(matches!(r.next_entry(), Err(LogError::Checksum { .. })));
    }
}

/// Fails once with WouldBlock partway, like a socket with a read timeout.
struct Hiccup<'a> {
    data: &'a [u8],
    fail_at: usize,
    failed: bool,
}

impl Read for Hiccup<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if !self.failed && self.data.len() <= self.fail_at {
            self.failed = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let limit = if self.failed {
            self.data.len()
        } else {
            self.data.len() - self.fail_at
        };
        let n = out.len().min(limit).min(7);
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn an_io_error_loses_nothing_and_can_be_retried() {
    let (entries, bytes) = small_log();
    let src = Hiccup {
        data: &bytes,
        fail_at: bytes.len() / 2,
        failed: false,
    };
    let mut r = LogReader::new(src).unwrap();
    let mut got = Vec::new();
    let mut errors = 0;
    loop {
        match r.next_entry() {
            Ok(Some(e)) => got.push(e),
            Ok(None) => break,
            Err(LogError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => errors += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(errors, 1);
    assert_eq!(got, entries);
}

proptest! {
    #[test]
    fn random_damage_never_yields_a_wrong_entry(
        es in entries(12),
        pos in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let bytes = write_log(&header(), &es);
        let mut bad = bytes.clone();
        let i = pos.index(bad.len());
        bad[i] ^= mask;
        let (got, end) = read_until_end(&bad);
        prop_assert_eq!(&got[..], &es[..got.len()]);
        prop_assert!(end.is_err(), "damage at byte {} went unnoticed", i);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&data);
        let mut stream = Vec::new();
        encode_preamble(&mut stream);
        stream.extend_from_slice(&data);
        let _ = read_until_end(&stream);
    }
}

/// Accepts `budget` bytes, then fails every write.
struct Full {
    budget: usize,
    got: Vec<u8>,
}

impl io::Write for Full {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.budget == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = b.len().min(self.budget);
        self.budget -= n;
        self.got.extend_from_slice(&b[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn after_a_failed_write_the_writer_refuses_more() {
    let big = LogEntry {
        seq: 0,
        point: ExecPoint::default(),
        kind: EntryKind::RxFrame {
            queue: 0,
            bytes: vec![0; 200_000],
        },
    };
    let sink = Full {
        budget: 100_000,
        got: Vec::new(),
    };
    let mut w = LogWriter::new(sink, &header()).unwrap();
    let e = w.append(&big).unwrap_err();
    assert!(matches!(e, LogError::Io(_)), "{e}");
    let e = w.append(&entry(0, 0)).unwrap_err();
    assert!(matches!(e, LogError::WriterBroken), "{e}");
    // What reached the sink reads as a truncated log, not a wrong one.
    let (got, end) = read_until_end(&w.get_ref().got);
    assert!(got.is_empty());
    assert!(matches!(end, Err(LogError::Truncated { .. })), "{end:?}");
}

#[test]
fn a_damaged_length_mid_log_is_told_apart_from_a_cut_last_frame() {
    let (entries, bytes) = small_log();
    let starts = frame_starts(&bytes);
    // Frame 2 (entry 1) claims more bytes than the stream has left, so it
    // swallows entry 2 and everything after: damage, not a cut.
    let f = starts[2];
    let mut bad = bytes.clone();
    let claim = (bytes.len() - f) as u32 + 100;
    bad[f..f + 4].copy_from_slice(&claim.to_le_bytes());
    let (got, end) = read_until_end(&bad);
    assert_eq!(got, entries[..1]);
    match end {
        Err(LogError::DamagedLength { at, next_at, .. }) => {
            assert_eq!(at.index, 2);
            assert_eq!(next_at, starts[3] as u64);
        }
        other => panic!("expected DamagedLength, got {other:?}"),
    }
    // The same stream cut inside its last frame is a cut.
    let (got, end) = read_until_end(&bytes[..bytes.len() - 3]);
    assert_eq!(got.len(), entries.len() - 1);
    assert!(matches!(end, Err(LogError::Truncated { .. })), "{end:?}");
}
