//! The logging channel over loopback TCP: handshake and refusals, streaming
//! and acks, the window and the lag throttle, liveness, corruption.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ftlog::{
    Acks, BackupExpect, BackupListener, BackupReceiver, ChannelConfig, ChannelError, DigestKind,
    EntryKind, ExecBackend, ExecPoint, LogEntry, LogError, LogHeader, PrimarySender, Refusal,
};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const IMAGE: [u8; 32] = [0x11; 32];

fn header(backend: ExecBackend, image: [u8; 32]) -> LogHeader {
    LogHeader {
        backend,
        image_digest: image,
        mem_mib: 64,
        cmdline: "console=ttyS0".into(),
        state_digest: DigestKind::Blake3RegsRam,
        digest_interval_ms: Some(100),
        net_mac: None,
        cpuid: Vec::new(),
        initrd_digest: None,
    }
}

fn config(key: &[u8]) -> ChannelConfig {
    let mut c = ChannelConfig::new(key);
    c.keepalive_interval = Duration::from_millis(50);
    c.peer_timeout = Duration::from_secs(1);
    c.handshake_timeout = Duration::from_secs(2);
    c
}

fn expect() -> BackupExpect {
    BackupExpect {
        backend: ExecBackend::Exits,
        image_digest: IMAGE,
    }
}

fn entry(seq: u64) -> LogEntry {
    LogEntry {
        seq,
        point: ExecPoint {
            count: seq * 3,
            rip: 0x1000 + seq,
            rcx: 0,
        },
        kind: if seq % 2 == 0 {
            EntryKind::IrqRaise { irq: 0 }
        } else {
            EntryKind::ClockRead {
                port: 0x510,
                data: seq.to_le_bytes().to_vec(),
            }
        },
    }
}

/// A listening backup: its address, the connections it refused, and the
/// primary it accepted.
type Reporting = (
    String,
    mpsc::Receiver<(SocketAddr, ChannelError)>,
    thread::JoinHandle<Result<BackupReceiver, ChannelError>>,
);

/// A backup accepting one primary on a background thread, reporting the
/// connections it refused on the way.
fn backup_reporting(
    cfg: ChannelConfig,
    exp: BackupExpect,
    check: Option<fn(u64) -> Result<(), Refusal>>,
) -> Reporting {
    let mut l = BackupListener::bind("127.0.0.1:0", &cfg, exp).unwrap();
    if let Some(c) = check {
        l = l.with_generation_check(c);
    }
    let addr = l.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        l.accept_reporting(Some(Duration::from_secs(4)), |peer, e| {
            let _ = tx.send((peer, e.clone()));
        })
    });
    (addr, rx, h)
}

/// A backup accepting one primary on a background thread.
fn backup(
    cfg: ChannelConfig,
    exp: BackupExpect,
) -> (
    String,
    thread::JoinHandle<Result<BackupReceiver, ChannelError>>,
) {
    let l = BackupListener::bind("127.0.0.1:0", &cfg, exp).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let h = thread::spawn(move || l.accept_timeout(Duration::from_secs(3)));
    (addr, h)
}

/// A connected pair, the primary optionally through `via` (a proxy in
/// front of the backup, given the backup's address).
fn pair(
    cfg: &ChannelConfig,
    via: Option<&dyn Fn(String) -> String>,
) -> (PrimarySender, BackupReceiver) {
    let (addr, b) = backup(cfg.clone(), expect());
    let addr = match via {
        Some(f) => f(addr),
        None => addr,
    };
    let p = PrimarySender::connect(&addr, cfg, &header(ExecBackend::Exits, IMAGE)).unwrap();
    let r = b.join().unwrap().unwrap();
    (p, r)
}

/// What the proxy does to the primary → backup direction.
#[derive(Default)]
struct Ctl {
    /// Hold data (primary → backup) while set.
    paused: AtomicBool,
    /// Drop everything, both ways, while set.
    blackhole: AtomicBool,
    /// Flip the last payload byte of this frame (0 is the hello).
    corrupt_frame: Option<u64>,
    /// Close the connection halfway through this frame.
    cut_frame: Option<u64>,
}

/// A one-connection TCP proxy in front of `target`; returns its address.
fn proxy(target: String, ctl: Arc<Ctl>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    thread::spawn(move || {
        let Ok((client, _)) = l.accept() else { return };
        let Ok(server) = TcpStream::connect(&target) else {
            return;
        };
        client.set_nodelay(true).unwrap();
        server.set_nodelay(true).unwrap();
        let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let ctl2 = ctl.clone();
        thread::spawn(move || pump(s2, c2, &ctl2, false));
        pump(client, server, &ctl, true);
    });
    addr
}

fn pump(mut from: TcpStream, mut to: TcpStream, ctl: &Ctl, forward: bool) {
    let mut seen: u64 = 0;
    let mut stream = Vec::new(); // everything forwarded, to find frames
    let mut next_frame = 12u64; // after the preamble
    let mut frame = 0u64;
    let mut flip_at = None;
    let mut cut_at = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if !ctl.blackhole.load(Ordering::SeqCst) {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        while forward && ctl.paused.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(2));
        }
        if ctl.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if forward {
            stream.extend_from_slice(chunk);
            while stream.len() as u64 >= next_frame + 8 {
                let h = next_frame as usize;
                let len = u32::from_le_bytes(stream[h..h + 4].try_into().unwrap()) as u64;
                if Some(frame) == ctl.corrupt_frame {
                    flip_at = Some(next_frame + 8 + len - 1);
                }
                if Some(frame) == ctl.cut_frame {
                    cut_at = Some(next_frame + 8 + len / 2);
                }
                next_frame += 8 + len;
                frame += 1;
            }
            if let Some(at) = flip_at {
                if (seen..seen + n as u64).contains(&at) {
                    chunk[(at - seen) as usize] ^= 0x40;
                    flip_at = None;
                }
            }
            if let Some(at) = cut_at {
                if at < seen + n as u64 {
                    let _ = to.write_all(&chunk[..(at - seen) as usize]);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        seen += n as u64;
        if to.write_all(chunk).is_err() {
            return;
        }
    }
}

/// Runs `f` on a thread; fails the test if it takes over `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
        panic!("test took over {limit:?}");
    }
    match h.join() {
        Ok(r) => r,
        Err(p) => std::panic::resume_unwind(p),
    }
}

#[test]
fn handshake_succeeds_and_a_clean_close_ends_the_stream() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        assert_eq!(r.header(), &header(ExecBackend::Exits, IMAGE));
        assert_eq!(p.next_seq(), 0);
        assert_eq!(p.acks(), Acks::default());
        let acks = p.close().unwrap();
        assert_eq!(acks, Acks::default());
        assert!(r.next().unwrap().is_none(), "clean close is Ok(None)");
        assert!(r.is_closed());
        assert!(r.next().unwrap().is_none(), "and stays so");
    });
}

/// Connects a primary with `pcfg`/`phead` to a backup with `bcfg`/`exp`;
/// returns both sides' errors. The backup keeps waiting after the refusal
/// and then serves the right primary (`bcfg`'s key, `exp`'s image).
fn refused(
    pcfg: ChannelConfig,
    phead: LogHeader,
    bcfg: ChannelConfig,
    exp: BackupExpect,
) -> (ChannelError, ChannelError) {
    within(Duration::from_secs(5), move || {
        let (addr, refusals, b) = backup_reporting(bcfg.clone(), exp, None);
        let pe = PrimarySender::connect(&addr, &pcfg, &phead).unwrap_err();
        let (_, be) = refusals.recv_timeout(Duration::from_secs(3)).unwrap();
        let good = PrimarySender::connect(&addr, &bcfg, &header(exp.backend, exp.image_digest));
        let r = b.join().unwrap().expect("the listener survives a refusal");
        let good = good.unwrap();
        good.push(ExecPoint::default(), EntryKind::IrqRaise { irq: 1 })
            .unwrap();
        assert_eq!(r.next().unwrap().unwrap().seq, 0);
        (pe, be)
    })
}

fn assert_refusal(pe: &ChannelError, be: &ChannelError, want: &Refusal, words: &[&str]) {
    assert!(
        matches!(pe, ChannelError::Refused(r) if r == want),
        "primary: {pe:?}"
    );
    assert!(
        matches!(be, ChannelError::Rejected(r) if r == want),
        "backup: {be:?}"
    );
    for w in words {
        assert!(pe.to_string().contains(w), "primary message {pe} lacks {w}");
        assert!(be.to_string().contains(w), "backup message {be} lacks {w}");
    }
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let (pe, be) = refused(
        config(b"not the key"),
        header(ExecBackend::Exits, IMAGE),
        config(KEY),
        expect(),
    );
    assert_refusal(&pe, &be, &Refusal::WrongKey, &["wrong shared key"]);
}

#[test]
fn other_protocol_version_is_refused_naming_both() {
    let mut pcfg = config(KEY);
    pcfg.protocol_version = 7;
    let (pe, be) = refused(
        pcfg,
        header(ExecBackend::Exits, IMAGE),
        config(KEY),
        expect(),
    );
    assert_refusal(
        &pe,
        &be,
        &Refusal::Version {
            primary: 7,
            backup: ftlog::channel::PROTOCOL_VERSION,
        },
        &[
            "version 7",
            &format!("version {}", ftlog::channel::PROTOCOL_VERSION),
        ],
    );
}

#[test]
fn other_backend_is_refused_naming_both() {
    let (pe, be) = refused(
        config(KEY),
        header(ExecBackend::Pmu, IMAGE),
        config(KEY),
        expect(),
    );
    assert_refusal(
        &pe,
        &be,
        &Refusal::Backend {
            primary: ExecBackend::Pmu,
            backup: ExecBackend::Exits,
        },
        &["backend", "pmu", "exits"],
    );
}

#[test]
fn other_guest_image_is_refused_naming_both() {
    let (pe, be) = refused(
        config(KEY),
        header(ExecBackend::Exits, [0x22; 32]),
        config(KEY),
        expect(),
    );
    assert_refusal(
        &pe,
        &be,
        &Refusal::Image {
            primary: [0x22; 32],
            backup: IMAGE,
        },
        &["guest image", "2222", "1111"],
    );
}

#[test]
fn finding_7_one_accept_survives_strangers_and_refused_primaries() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (addr, refusals, b) = backup_reporting(cfg.clone(), expect(), None);
        let h = header(ExecBackend::Exits, IMAGE);
        let mut http = TcpStream::connect(&addr).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (peer, e) = refusals.recv_timeout(Duration::from_secs(3)).unwrap();
        assert_eq!(peer, http.local_addr().unwrap(), "the stranger is named");
        assert!(matches!(e, ChannelError::NotAChannel { .. }), "{e:?}");
        assert!(
            e.to_string().contains("not an ftvmm logging channel"),
            "{e}"
        );
        assert!(PrimarySender::connect(&addr, &config(b"stranger"), &h).is_err());
        let (_, e) = refusals.recv_timeout(Duration::from_secs(3)).unwrap();
        assert!(
            matches!(e, ChannelError::Rejected(Refusal::WrongKey)),
            "{e:?}"
        );
        assert!(!b.is_finished(), "still waiting for the primary");
        let p = PrimarySender::connect(&addr, &cfg, &h).unwrap();
        let r = b.join().unwrap().unwrap();
        p.push(ExecPoint::default(), EntryKind::IrqRaise { irq: 1 })
            .unwrap();
        assert_eq!(r.next().unwrap().unwrap().seq, 0);
    });
}

#[test]
fn finding_7_a_silent_stranger_does_not_hold_up_the_primary() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.handshake_timeout = Duration::from_secs(3);
        let (addr, refusals, b) = backup_reporting(cfg.clone(), expect(), None);
        // Connects and says nothing: its handshake would run 3 s.
        let silent = TcpStream::connect(&addr).unwrap();
        thread::sleep(Duration::from_millis(50));
        let mut pcfg = cfg.clone();
        pcfg.handshake_timeout = Duration::from_secs(1);
        let p = PrimarySender::connect(&addr, &pcfg, &header(ExecBackend::Exits, IMAGE))
            .expect("served while the stranger's handshake is pending");
        let r = b.join().unwrap().unwrap();
        assert!(
            refusals.try_recv().is_err(),
            "the stranger was not refused yet"
        );
        p.push(ExecPoint::default(), EntryKind::IrqRaise { irq: 1 })
            .unwrap();
        assert_eq!(r.next().unwrap().unwrap().seq, 0);
        drop(silent);
    });
}

#[test]
fn finding_11_a_stranger_cannot_make_the_backup_buffer_a_large_frame() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.handshake_timeout = Duration::from_secs(4);
        let (addr, refusals, b) = backup_reporting(cfg.clone(), expect(), None);
        let mut s = TcpStream::connect(&addr).unwrap();
        // A well-formed preamble, then a frame that claims 1 MiB.
        s.write_all(b"FTVMMCHN").unwrap();
        s.write_all(&ftlog::channel::PROTOCOL_VERSION.to_le_bytes())
            .unwrap();
        s.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
        s.write_all(&[0; 4 + 1000]).unwrap();
        let (_, e) = refusals.recv_timeout(Duration::from_secs(3)).unwrap();
        assert!(
            matches!(e.log_error(), Some(LogError::FrameTooLarge { len, max, .. })
                if *len == 1 << 20 && *max == ftlog::channel::PRE_AUTH_FRAME_LEN),
            "refused at once, not after waiting for the payload: {e:?}"
        );
        let p = PrimarySender::connect(&addr, &cfg, &header(ExecBackend::Exits, IMAGE)).unwrap();
        b.join().unwrap().unwrap();
        drop(p);
    });
}

#[test]
fn finding_8_a_generation_the_backup_refuses_is_named_on_both_sides() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let check: fn(u64) -> Result<(), Refusal> = |g| {
            if g <= 5 {
                Err(Refusal::Generation {
                    offered: g,
                    latest_decided: 5,
                })
            } else {
                Ok(())
            }
        };
        let (addr, refusals, b) = backup_reporting(cfg.clone(), expect(), Some(check));
        let h = header(ExecBackend::Exits, IMAGE);
        let mut old = cfg.clone();
        old.generation = 3;
        let pe = PrimarySender::connect(&addr, &old, &h).unwrap_err();
        let (_, be) = refusals.recv_timeout(Duration::from_secs(3)).unwrap();
        let want = Refusal::Generation {
            offered: 3,
            latest_decided: 5,
        };
        assert_refusal(&pe, &be, &want, &["generation 3", "generation 5"]);
        let mut new = cfg.clone();
        new.generation = 6;
        let p = PrimarySender::connect(&addr, &new, &h).unwrap();
        let r = b.join().unwrap().unwrap();
        assert_eq!((p.generation(), r.generation()), (6, 6));
    });
}

#[test]
fn finding_7_a_paired_backup_refuses_later_primaries_as_busy() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.generation = 4;
        let l = BackupListener::bind("127.0.0.1:0", &cfg, expect()).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = header(ExecBackend::Exits, IMAGE);
        let b = thread::spawn(move || {
            let r = l.accept_timeout(Duration::from_secs(3)).unwrap();
            let busy = l.refuse_all(r.generation());
            (r, busy)
        });
        let p = PrimarySender::connect(&addr, &cfg, &h).unwrap();
        let (r, _busy) = b.join().unwrap();
        p.send(entry(0)).unwrap();
        let second = PrimarySender::connect(&addr, &cfg, &h).unwrap_err();
        assert!(
            matches!(
                second,
                ChannelError::Refused(Refusal::Busy { generation: 4 })
            ),
            "{second:?}"
        );
        let mut http = TcpStream::connect(&addr).unwrap();
        http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        p.send(entry(1)).unwrap();
        assert_eq!(r.next().unwrap().unwrap(), entry(0));
        assert_eq!(r.next().unwrap().unwrap(), entry(1));
        assert!(p.error().is_none() && r.error().is_none());
    });
}

#[test]
fn ten_thousand_entries_stream_in_order_and_acks_reach_the_last() {
    within(Duration::from_secs(5), || {
        const N: u64 = 10_000;
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        let replay = thread::spawn(move || {
            let mut n = 0;
            while let Some(e) = r.next().unwrap() {
                assert_eq!(e, entry(n));
                if e.seq % 100 == 99 {
                    r.report_executed(e.seq).unwrap();
                }
                n += 1;
            }
            n
        });
        for seq in 0..N {
            p.send(entry(seq)).unwrap();
        }
        p.flush().unwrap();
        assert!(p.wait_received(N - 1, Duration::from_secs(3)).unwrap());
        assert_eq!(p.acked_received(), Some(N - 1));
        let mut acks = p.acks();
        while acks.executed != Some(N - 1) {
            acks = p.wait_acks_change(acks, Duration::from_secs(3)).unwrap();
        }
        assert_eq!(p.lag(), 0);
        let stats = p.stats();
        assert_eq!(stats.entries_queued, N);
        assert_eq!(stats.entries_written, N);
        assert!(stats.bytes_written > N * 9, "{stats:?}");
        assert_eq!(stats.acks.received, Some(N - 1));
        assert!(stats
            .ack_latency
            .is_some_and(|l| l < Duration::from_secs(1)));
        let fin = p.close().unwrap();
        assert_eq!(fin.received, Some(N - 1));
        assert_eq!(replay.join().unwrap(), N);
    });
}

#[test]
fn a_full_window_stalls_the_sender_until_the_backup_acks() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.window = 16;
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let (p, r) = pair(&cfg, Some(&move |a| proxy(a, c.clone())));
        ctl.paused.store(true, Ordering::SeqCst); // the backup reads nothing
        let p = Arc::new(p);
        let sent = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (p, sent) = (p.clone(), sent.clone());
            thread::spawn(move || {
                for seq in 0..100 {
                    p.send(entry(seq)).unwrap();
                    sent.store(seq + 1, Ordering::SeqCst);
                }
            })
        };
        thread::sleep(Duration::from_millis(300));
        assert_eq!(sent.load(Ordering::SeqCst), 16, "stalled at the window");
        assert_eq!(p.acked_received(), None);
        assert!(!vcpu.is_finished());
        ctl.paused.store(false, Ordering::SeqCst);
        vcpu.join().unwrap();
        assert!(p.wait_received(99, Duration::from_secs(2)).unwrap());
        for seq in 0..100 {
            assert_eq!(r.next().unwrap().unwrap().seq, seq);
        }
    });
}

#[test]
fn wait_for_ack_returns_only_once_the_backup_received_the_entry() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let (p, r) = pair(&cfg, Some(&move |a| proxy(a, c.clone())));
        ctl.paused.store(true, Ordering::SeqCst);
        let seq = p
            .push(
                ExecPoint::default(),
                EntryKind::SerialInput { bytes: b"x".into() },
            )
            .unwrap();
        assert!(!p.is_received(seq));
        assert!(!p.wait_received(seq, Duration::from_millis(200)).unwrap());
        assert_eq!(r.received(), None, "the backup has not got it");
        let p = Arc::new(p);
        let waiter = {
            let p = p.clone();
            thread::spawn(move || {
                let ok = p.wait_received(seq, Duration::from_secs(3)).unwrap();
                (ok, Instant::now())
            })
        };
        thread::sleep(Duration::from_millis(100));
        assert!(
            !waiter.is_finished(),
            "no ack while the proxy holds the entry"
        );
        ctl.paused.store(false, Ordering::SeqCst);
        let (ok, _) = waiter.join().unwrap();
        assert!(ok);
        assert_eq!(r.received(), Some(seq), "acked only after receipt");
        assert!(p.is_received(seq));
        // The output thread's watch saw the advance too.
        let w = p.subscribe();
        assert!(w.borrow().has_received(seq));
    });
}

#[test]
fn executed_reports_reach_the_primary_and_drive_the_throttle() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.lag_bound = 10;
        let (p, r) = pair(&cfg, None);
        for seq in 0..20 {
            p.send(entry(seq)).unwrap();
        }
        assert!(p.wait_received(19, Duration::from_secs(2)).unwrap());
        assert_eq!(p.lag(), 20);
        assert_eq!(p.acked_executed(), None);
        let p = Arc::new(p);
        let throttled = {
            let p = p.clone();
            thread::spawn(move || p.throttle())
        };
        thread::sleep(Duration::from_millis(200));
        assert!(!throttled.is_finished(), "20 behind with a bound of 10");
        for _ in 0..16 {
            r.next().unwrap().unwrap();
        }
        r.report_executed(8).unwrap();
        let mut acks = p.acks();
        while acks.executed != Some(8) {
            acks = p.wait_acks_change(acks, Duration::from_secs(2)).unwrap();
        }
        assert_eq!(p.lag(), 11);
        thread::sleep(Duration::from_millis(50));
        assert!(!throttled.is_finished(), "11 behind with a bound of 10");
        r.report_executed(15).unwrap();
        throttled.join().unwrap().unwrap();
        let mut acks = p.acks();
        while acks.executed != Some(15) {
            acks = p.wait_acks_change(acks, Duration::from_secs(2)).unwrap();
        }
        assert_eq!(p.lag(), 4);
        assert!(matches!(
            r.report_executed(20),
            Err(ChannelError::BadEntry(_))
        ));
    });
}

#[test]
fn the_backup_sees_a_dropped_primary_as_peer_closed_after_its_entries() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        for seq in 0..50 {
            p.send(entry(seq)).unwrap();
        }
        assert!(p.wait_received(49, Duration::from_secs(2)).unwrap());
        drop(p); // the primary dies mid-stream, no close
        for seq in 0..50 {
            assert_eq!(
                r.next().unwrap().unwrap().seq,
                seq,
                "received entries first"
            );
        }
        let e = r.next().unwrap_err();
        assert!(matches!(e, ChannelError::PeerClosed { .. }), "{e:?}");
        assert!(e.is_peer_death());
    });
}

#[test]
fn a_silent_link_times_out_on_both_sides() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.peer_timeout = Duration::from_millis(500);
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let (p, r) = pair(&cfg, Some(&move |a| proxy(a, c.clone())));
        p.send(entry(0)).unwrap();
        assert!(p.wait_received(0, Duration::from_secs(2)).unwrap());
        ctl.blackhole.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        p.send(entry(1)).unwrap();
        assert_eq!(r.next().unwrap().unwrap().seq, 0);
        let be = r.next().unwrap_err();
        assert!(matches!(be, ChannelError::PeerTimeout { .. }), "{be:?}");
        assert!(be.to_string().contains("timed out"), "{be}");
        let pe = p.wait_received(1, Duration::from_secs(3)).unwrap_err();
        assert!(matches!(pe, ChannelError::PeerTimeout { .. }), "{pe:?}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // A dead channel refuses further entries with the same error.
        assert!(matches!(
            p.send(entry(2)),
            Err(ChannelError::PeerTimeout { .. })
        ));
    });
}

#[test]
fn an_idle_channel_stays_up_on_keepalives() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.peer_timeout = Duration::from_millis(300);
        let (p, r) = pair(&cfg, None);
        thread::sleep(Duration::from_millis(1000));
        assert!(p.error().is_none(), "{:?}", p.error());
        assert!(r.error().is_none(), "{:?}", r.error());
        p.send(entry(0)).unwrap();
        assert_eq!(r.next().unwrap().unwrap(), entry(0));
    });
}

#[test]
fn the_primary_sees_a_dropped_backup_as_peer_closed() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        p.send(entry(0)).unwrap();
        assert!(p.wait_received(0, Duration::from_secs(2)).unwrap());
        drop(r);
        let e = p.wait_received(1, Duration::from_secs(3)).unwrap_err();
        assert!(matches!(e, ChannelError::PeerClosed { .. }), "{e:?}");
        assert!(e.is_peer_death());
        assert!(
            p.wait_received(0, Duration::ZERO).unwrap(),
            "old acks stand"
        );
    });
}

#[test]
fn a_corrupted_byte_in_the_stream_is_a_checksum_error() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let ctl = Arc::new(Ctl {
            corrupt_frame: Some(503), // entry 500: hello, auth, header, entries
            ..Ctl::default()
        });
        let c = ctl.clone();
        let (p, r) = pair(&cfg, Some(&move |a| proxy(a, c.clone())));
        for seq in 0..1000 {
            p.send(entry(seq)).unwrap();
        }
        let mut got = 0;
        let e = loop {
            match r.next() {
                Ok(Some(e)) => {
                    assert_eq!(e.seq, got);
                    got += 1;
                }
                Ok(None) => panic!("clean end after {got} entries"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, 500, "every entry before the damaged one arrives");
        assert!(
            matches!(e.log_error(), Some(LogError::Checksum { at, .. }) if at.index == 503),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("checksum mismatch in frame 503"),
            "{e}"
        );
        // The backup tells the primary why it gave up.
        let pe = p.wait_received(999, Duration::from_secs(3)).unwrap_err();
        assert!(
            matches!(&pe, ChannelError::PeerAborted { reason } if reason.contains("checksum")),
            "{pe:?}"
        );
    });
}

#[test]
fn finding_4_a_stream_cut_inside_a_frame_is_the_primarys_death() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let ctl = Arc::new(Ctl {
            cut_frame: Some(13), // entry 10
            ..Ctl::default()
        });
        let c = ctl.clone();
        let (p, r) = pair(&cfg, Some(&move |a| proxy(a, c.clone())));
        for seq in 0..20 {
            p.send(entry(seq)).unwrap();
        }
        for seq in 0..10 {
            assert_eq!(r.next().unwrap().unwrap().seq, seq);
        }
        let e = r.next().unwrap_err();
        assert!(
            matches!(&e, ChannelError::PeerClosed { detail } if detail.contains("inside frame 13")),
            "the end of the log, like a reset after the same bytes: {e:?}"
        );
        assert!(e.is_peer_death());
    });
}

#[test]
fn finding_11_close_works_while_other_threads_hold_the_sender() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        let p = Arc::new(p);
        let output_thread = p.clone();
        for seq in 0..5 {
            p.send(entry(seq)).unwrap();
        }
        let fin = p.close().unwrap();
        assert_eq!(fin.received, Some(4));
        assert_eq!(
            p.close().unwrap(),
            fin,
            "closing again gives the same answer"
        );
        assert!(matches!(
            output_thread.send(entry(5)),
            Err(ChannelError::Closed)
        ));
        for seq in 0..5 {
            assert_eq!(r.next().unwrap().unwrap().seq, seq);
        }
        assert!(r.next().unwrap().is_none(), "a clean close");
    });
}

#[test]
fn finding_11_a_full_receive_queue_stops_reading_the_socket() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.window = 16;
        cfg.lag_bound = 16;
        cfg.peer_timeout = Duration::from_secs(3);
        let (p, r) = pair(&cfg, None);
        let p = Arc::new(p);
        let sent = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (p, sent) = (p.clone(), sent.clone());
            thread::spawn(move || {
                for seq in 0..200 {
                    p.send(entry(seq)).unwrap();
                    sent.store(seq + 1, Ordering::SeqCst);
                }
            })
        };
        thread::sleep(Duration::from_millis(400));
        // Nothing taken: the backup holds about `queue_limit` (32) entries,
        // the rest waits in TCP and in the primary's window.
        let held = r.pending();
        assert!(
            (32..=64).contains(&held),
            "{held} entries held with a limit of 32"
        );
        assert!(p.acked_received().is_some_and(|a| a < 64), "{:?}", p.acks());
        assert!(sent.load(Ordering::SeqCst) < 100, "the sender stalls");
        for seq in 0..200 {
            assert_eq!(r.next().unwrap().unwrap().seq, seq);
        }
        vcpu.join().unwrap();
        assert!(p.wait_received(199, Duration::from_secs(2)).unwrap());
    });
}

#[test]
fn finding_6_throttle_gives_up_on_a_backup_whose_replay_is_stuck() {
    within(Duration::from_secs(5), || {
        let mut cfg = config(KEY);
        cfg.lag_bound = 10;
        cfg.peer_timeout = Duration::from_millis(500);
        cfg.keepalive_interval = Duration::from_millis(50);
        let (p, r) = pair(&cfg, None);
        for seq in 0..20 {
            p.send(entry(seq)).unwrap();
        }
        assert!(p.wait_received(19, Duration::from_secs(2)).unwrap());
        // Received, acked, never executed: the replay is stuck.
        let t0 = Instant::now();
        let e = p.throttle().unwrap_err();
        assert!(
            t0.elapsed() >= Duration::from_millis(450),
            "{:?}",
            t0.elapsed()
        );
        assert!(matches!(e, ChannelError::PeerTimeout { .. }), "{e:?}");
        assert!(e.to_string().contains("executed nothing"), "{e}");
        assert!(e.is_peer_death());
        assert!(p.send(entry(20)).is_err(), "the channel is dead");
        for seq in 0..20 {
            assert_eq!(r.next().unwrap().unwrap().seq, seq);
        }
        let be = r.next().unwrap_err();
        assert!(
            matches!(&be, ChannelError::PeerAborted { reason } if reason.contains("executed nothing")),
            "the backup is told: {be:?}"
        );
    });
}

#[test]
fn abort_declares_the_backup_dead_and_tells_it() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        p.send(entry(0)).unwrap();
        assert!(p.wait_received(0, Duration::from_secs(2)).unwrap());
        p.abort("the backup's heartbeats stopped");
        let e = p.send(entry(1)).unwrap_err();
        assert!(
            matches!(&e, ChannelError::DeclaredDead { reason } if reason.contains("heartbeats")),
            "{e:?}"
        );
        assert!(e.is_peer_death());
        assert_eq!(r.next().unwrap().unwrap(), entry(0));
        let be = r.next().unwrap_err();
        assert!(
            matches!(&be, ChannelError::PeerAborted { reason } if reason.contains("heartbeats")),
            "{be:?}"
        );
    });
}

#[test]
fn the_release_watermark_reaches_the_backup_after_its_entries() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        assert_eq!(r.released_through(), None);
        for seq in 0..10 {
            p.send(entry(seq)).unwrap();
        }
        assert!(p.wait_received(9, Duration::from_secs(2)).unwrap());
        p.set_released_through(3);
        p.set_released_through(6);
        p.set_released_through(2); // lower: ignored
        let t0 = Instant::now();
        while r.released_through() != Some(6) && t0.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r.released_through(), Some(6));
        // A watermark ahead of the entries waits for them.
        p.set_released_through(12);
        thread::sleep(Duration::from_millis(100));
        assert_eq!(r.released_through(), Some(6));
        for seq in 10..13 {
            p.send(entry(seq)).unwrap();
        }
        assert!(p.wait_received(12, Duration::from_secs(2)).unwrap());
        let t0 = Instant::now();
        while r.released_through() != Some(12) && t0.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r.released_through(), Some(12));
        p.close().unwrap();
    });
}

#[test]
fn entries_out_of_order_are_refused_before_sending() {
    within(Duration::from_secs(5), || {
        let cfg = config(KEY);
        let (p, r) = pair(&cfg, None);
        let e = p.send(entry(1)).unwrap_err();
        assert!(matches!(e, ChannelError::BadEntry(_)), "{e:?}");
        assert!(e.to_string().contains("expected seq 0, found 1"), "{e}");
        p.send(entry(0)).unwrap();
        let mut back = entry(1);
        back.point.count = 0;
        p.send(entry(1)).unwrap();
        back.seq = 2;
        let e = p.send(back).unwrap_err();
        assert!(e.to_string().contains("goes back in time"), "{e}");
        assert_eq!(p.next_seq(), 2);
        assert_eq!(r.next().unwrap().unwrap(), entry(0));
        assert_eq!(r.next().unwrap().unwrap(), entry(1));
    });
}

#[test]
fn bad_configurations_are_rejected_up_front() {
    let mut c = config(b"");
    assert!(matches!(c.validate(), Err(ChannelError::Config(_))));
    c = config(KEY);
    c.window = 0;
    assert!(c.validate().is_err());
    c = config(KEY);
    c.keepalive_interval = c.peer_timeout;
    let e = c.validate().unwrap_err();
    assert!(e.to_string().contains("keepalive"), "{e}");
    assert!(!format!("{c:?}").contains("0123"), "the key is not printed");
}

#[test]
fn a_joining_primary_sends_pages_and_its_state_before_the_log() {
    let cfg = config(KEY);
    let (addr, b) = backup(cfg.clone(), expect());
    let p =
        PrimarySender::connect_joining(&addr, &cfg, &header(ExecBackend::Exits, IMAGE)).unwrap();
    let r = b.join().unwrap().unwrap();
    assert!(r.joins(), "the backup is told the primary joins");
    // No entry before the state: the backup would have nothing to replay it on.
    let early = p.send(entry(0)).unwrap_err();
    assert!(matches!(early, ChannelError::BadEntry(_)), "{early}");
    // The backup takes parts as they come (as its restore does).
    let taker = thread::spawn(move || {
        let mut pages = 0;
        let state = loop {
            match r.next_join_part().unwrap() {
                ftlog::JoinPart::Pages { first, data } => {
                    assert_eq!(data.len() % 4096, 0);
                    if first != 3 {
                        assert_eq!(first % 64, 0);
                        assert!(data.iter().all(|&x| x == (first / 64) as u8));
                    }
                    pages += data.len() / 4096;
                }
                ftlog::JoinPart::State(s) => break s,
            }
        };
        (r, pages, state)
    });
    // 40 MiB of pages: more than either side queues, so the sender waits
    // for the socket and the socket for the backup.
    let chunk = 64 * 4096;
    for i in 0..160u64 {
        p.send_pages(i * 64, vec![i as u8; chunk]).unwrap();
    }
    p.send_pages(3, vec![0xee; 4096]).unwrap();
    p.send_join_state(b"state".to_vec()).unwrap();
    assert!(
        p.send_pages(0, vec![0; 4096]).is_err(),
        "no pages after the state"
    );
    for s in 0..3 {
        p.send(entry(s)).unwrap();
    }
    let (r, pages, state) = within(Duration::from_secs(30), move || taker.join().unwrap());
    assert_eq!(pages, 160 * 64 + 1);
    assert_eq!(state, b"state");
    for s in 0..3 {
        assert_eq!(r.next().unwrap().unwrap().seq, s);
    }
    p.close().unwrap();
    assert_eq!(r.next().unwrap(), None);
    assert!(p.join_bytes_written() > 40 << 20);
}

#[test]
fn a_backup_sees_a_join_cut_short_as_the_primary_gone() {
    let cfg = config(KEY);
    let (addr, b) = backup(cfg.clone(), expect());
    let p =
        PrimarySender::connect_joining(&addr, &cfg, &header(ExecBackend::Exits, IMAGE)).unwrap();
    let r = b.join().unwrap().unwrap();
    p.send_pages(0, vec![1; 4096]).unwrap();
    p.flush_join().unwrap();
    drop(p);
    assert!(matches!(
        r.next_join_part().unwrap(),
        ftlog::JoinPart::Pages { first: 0, .. }
    ));
    let e = within(Duration::from_secs(5), move || {
        r.next_join_part().unwrap_err()
    });
    assert!(e.is_peer_death(), "{e}");
}
