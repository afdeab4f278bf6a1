//! Everything written comes back equal: frames, headers, whole logs, over
//! buffers, dribbling readers and a real TCP socket.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};

use common::*;
use ftlog::codec::{decode_frame, encode_frame, Frame, FRAME_HEAD_LEN};
use ftlog::{EntryKind, LogEntry, LogHeader, LogReader};
use proptest::prelude::*;

fn round_trip_frame(f: &Frame) {
    let mut buf = vec![0xee; 3]; // encode_frame appends
    let n = encode_frame(f, &mut buf).unwrap();
    assert_eq!(n, buf.len() - 3);
    let (back, used) = decode_frame(&buf[3..]).unwrap().unwrap();
    assert_eq!(&back, f);
    assert_eq!(used, n);
    // A prefix is "need more", never an error or a different frame.
    for cut in 0..n {
        assert!(
            decode_frame(&buf[3..3 + cut]).unwrap().is_none(),
            "cut {cut}"
        );
    }
}

fn read_all<R: Read>(r: R) -> (LogHeader, Vec<LogEntry>) {
    let mut reader = LogReader::new(r).unwrap();
    let header = reader.header().clone();
    let entries = reader.by_ref().collect::<Result<Vec<_>, _>>().unwrap();
    (header, entries)
}

/// Hands out at most `step` bytes per read, as a socket may.
struct Dribble<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Dribble<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn every_entry_kind_round_trips() {
    for (i, kind) in one_of_each_kind().into_iter().enumerate() {
        let e = LogEntry {
            seq: i as u64,
            point: Default::default(),
            kind,
        };
        round_trip_frame(&Frame::Entry(e));
    }
    round_trip_frame(&Frame::Header(header()));
}

#[test]
fn small_log_reads_back_with_its_header() {
    let (entries, bytes) = small_log();
    let (h, back) = read_all(&bytes[..]);
    assert_eq!(h, header());
    assert_eq!(back, entries);
    let mut r = LogReader::new(&bytes[..]).unwrap();
    assert_eq!(r.format_version(), ftlog::codec::FORMAT_VERSION);
    while r.next_entry().unwrap().is_some() {}
    assert_eq!(r.offset(), bytes.len() as u64);
    assert_eq!(r.next_seq(), entries.len() as u64);
    // The end stays the end.
    assert!(r.next_entry().unwrap().is_none());
}

#[test]
fn push_numbers_entries_from_zero() {
    let mut w = ftlog::LogWriter::new(Vec::new(), &header()).unwrap();
    let p = ftlog::ExecPoint {
        count: 5,
        rip: 1,
        rcx: 0,
    };
    assert_eq!(w.push(p, EntryKind::IrqRaise { irq: 0 }).unwrap(), 0);
    assert_eq!(w.push(p, EntryKind::Inject { vector: 32 }).unwrap(), 1);
    assert_eq!(w.next_seq(), 2);
    let written = w.bytes_written();
    let bytes = w.into_inner().unwrap();
    assert_eq!(written, bytes.len() as u64);
    let (_, back) = read_all(&bytes[..]);
    assert_eq!(back.iter().map(|e| e.seq).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(back[1].kind, EntryKind::Inject { vector: 32 });
}

#[test]
fn a_log_streams_over_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (entries, _) = small_log();
    let sent = entries.clone();
    let primary = std::thread::spawn(move || {
        let sock = TcpStream::connect(addr).unwrap();
        let mut w = ftlog::LogWriter::new(sock, &header()).unwrap();
        for e in &sent {
            w.append(e).unwrap();
            w.flush().unwrap(); // the backup sees each entry at once
        }
    });
    let (sock, _) = listener.accept().unwrap();
    let (h, back) = read_all(sock);
    primary.join().unwrap();
    assert_eq!(h, header());
    assert_eq!(back, entries);
}

proptest! {
    #[test]
    fn any_entry_round_trips(e in entry()) {
        round_trip_frame(&Frame::Entry(e));
    }

    #[test]
    fn any_header_round_trips(h in log_header()) {
        round_trip_frame(&Frame::Header(h));
    }

    #[test]
    fn frames_decode_one_at_a_time(es in proptest::collection::vec(entry(), 1..8)) {
        let mut buf = Vec::new();
        for e in &es {
            encode_frame(&Frame::Entry(e.clone()), &mut buf).unwrap();
        }
        let mut rest = &buf[..];
        for e in &es {
            let (f, used) = decode_frame(rest).unwrap().unwrap();
            prop_assert_eq!(f, Frame::Entry(e.clone()));
            prop_assert!(used >= FRAME_HEAD_LEN);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn logs_round_trip_through_writer_and_reader(
        h in log_header(),
        es in entries(40),
        step in 1usize..300,
    ) {
        let bytes = write_log(&h, &es);
        let (h2, back) = read_all(&bytes[..]);
        prop_assert_eq!(&h2, &h);
        prop_assert_eq!(&back, &es);
        let (h3, back) = read_all(Dribble { data: &bytes, step });
        prop_assert_eq!(h3, h);
        prop_assert_eq!(back, es);
    }
}
