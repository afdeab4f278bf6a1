//! The channel's wire layout: a preamble, then frames framed exactly like
//! log frames (u32 LE payload length, u32 LE CRC-32 of the payload, the
//! payload) whose payload is one postcard-encoded [`Msg`].

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::{ChannelError, Refusal};
use crate::codec::{checked_payload, decode_value, encode_value, FRAME_HEAD_LEN, MAX_FRAME_LEN};
use crate::{ExecBackend, FramePos, LogEntry, LogError, LogHeader};

/// The first eight bytes each side sends.
pub const CHANNEL_MAGIC: [u8; 8] = *b"FTVMMCHN";
/// The channel protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 6;
/// Magic plus version.
pub const CHANNEL_PREAMBLE_LEN: usize = 12;
/// Length of the handshake nonces and MACs.
pub const NONCE_LEN: usize = 32;
/// Largest frame payload accepted before the peer has proved the key: the
/// handshake's messages are a few dozen bytes, so a stranger cannot make a
/// side buffer a 16 MiB frame.
pub const PRE_AUTH_FRAME_LEN: u32 = 4096;

/// One channel message. Variant order is part of the wire format (bump
/// [`PROTOCOL_VERSION`] on any change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Msg {
    /// Primary → backup, first frame: who the primary is.
    Hello {
        backend: ExecBackend,
        image_digest: [u8; 32],
        /// The pairing generation the primary offers (from its arbiter).
        generation: u64,
        /// The primary's guest is already running: the backup starts from
        /// the state the primary sends (pages, then the state at the join
        /// point), not from the image.
        join: bool,
        nonce: [u8; NONCE_LEN],
    },
    /// Backup → primary: the backup's nonce.
    Challenge { nonce: [u8; NONCE_LEN] },
    /// Primary → backup: the primary's proof of the key.
    Auth { mac: [u8; 32] },
    /// Backup → primary: accepted, with the backup's proof of the key.
    Welcome { mac: [u8; 32] },
    /// Backup → primary: refused, then the backup closes.
    Refuse(Refusal),
    /// Primary → backup, first frame after the handshake.
    Header(LogHeader),
    /// Primary → backup: one log entry.
    Entry(LogEntry),
    /// Primary → backup: nothing to send lately, still alive.
    Keepalive,
    /// Backup → primary: highest seq received and executed (None: none
    /// yet). Also the backup's keepalive.
    Ack {
        received: Option<u64>,
        executed: Option<u64>,
    },
    /// Either way: a clean close; nothing follows.
    Close,
    /// Either way: a fatal error, said before closing.
    Abort { reason: String },
    /// Primary → backup: the primary has put out every output whose log
    /// entry is at or below `through` (coalesced: only the latest is sent).
    Released { through: u64 },
    /// Primary → backup, joining: guest RAM from page `first` on (4 KiB
    /// pages, `data` a whole number of them). A page sent again replaces
    /// the earlier copy (pre-copy rounds).
    Pages {
        first: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Primary → backup, joining: the VM's state at the join point (vCPU,
    /// devices, run loop; RAM came as pages). The log follows from seq 0.
    JoinState {
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
}

impl Msg {
    /// The variant's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Challenge { .. } => "challenge",
            Msg::Auth { .. } => "auth",
            Msg::Welcome { .. } => "welcome",
            Msg::Refuse(_) => "refuse",
            Msg::Header(_) => "header",
            Msg::Entry(_) => "entry",
            Msg::Keepalive => "keepalive",
            Msg::Ack { .. } => "ack",
            Msg::Close => "close",
            Msg::Abort { .. } => "abort",
            Msg::Released { .. } => "released",
            Msg::Pages { .. } => "pages",
            Msg::JoinState { .. } => "join state",
        }
    }
}

/// Append the preamble for `version` to `out`.
pub(crate) fn encode_preamble(version: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&CHANNEL_MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
}

/// Append `msg`, framed, to `out`; on error `out` is unchanged.
pub(crate) fn encode_msg(msg: &Msg, out: &mut Vec<u8>, at: FramePos) -> Result<(), ChannelError> {
    let payload = encode_value(msg).map_err(|reason| LogError::Encode { at, reason })?;
    let len = match u32::try_from(payload.len()) {
        Ok(len) if len <= MAX_FRAME_LEN => len,
        _ => {
            return Err(LogError::FrameTooLarge {
                at,
                len: payload.len() as u64,
                max: MAX_FRAME_LEN,
            }
            .into())
        }
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// Frames an outgoing stream: keeps the position for error messages.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    pos: FramePos,
    pub buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new() -> Self {
        FrameWriter {
            pos: FramePos {
                index: 0,
                offset: CHANNEL_PREAMBLE_LEN as u64,
            },
            buf: Vec::new(),
        }
    }

    /// Queue `msg` in the buffer.
    pub fn push(&mut self, msg: &Msg) -> Result<(), ChannelError> {
        let before = self.buf.len();
        encode_msg(msg, &mut self.buf, self.pos)?;
        self.pos = self.pos.next(self.buf.len() - before);
        Ok(())
    }

    /// Write the buffer out and clear it.
    pub async fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        during: &'static str,
    ) -> Result<(), ChannelError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = w.write_all(&self.buf).await;
        self.buf.clear();
        r.map_err(|e| ChannelError::io(during, e))
    }

    /// Queue `msg` and write it out at once.
    pub async fn send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        msg: &Msg,
        during: &'static str,
    ) -> Result<(), ChannelError> {
        self.push(msg)?;
        self.flush(w, during).await
    }
}

/// How much to ask the socket for at a time.
const CHUNK: usize = 64 * 1024;

/// Reads frames off a byte stream. Every read is cancellation safe: a
/// `read_more` cancelled by a timeout loses no bytes.
#[derive(Debug)]
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    pos: FramePos,
    /// Largest payload accepted: [`PRE_AUTH_FRAME_LEN`] until the peer
    /// proved the key, then [`MAX_FRAME_LEN`].
    limit: u32,
}

impl FrameReader {
    /// A reader for a peer that has not proved the key yet.
    pub fn new() -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            pos: FramePos {
                index: 0,
                offset: CHANNEL_PREAMBLE_LEN as u64,
            },
            limit: PRE_AUTH_FRAME_LEN,
        }
    }

    /// The peer proved the key: accept frames up to the log's limit.
    pub fn authenticated(&mut self) {
        self.limit = MAX_FRAME_LEN;
    }

    /// Where the next frame starts.
    pub fn pos(&self) -> FramePos {
        self.pos
    }

    /// The next complete frame already buffered, if any.
    pub fn next_buffered(&mut self) -> Result<Option<Msg>, ChannelError> {
        let at = self.pos;
        let pending = self.buf.get(self.start..).unwrap_or_default();
        if let Some(h) = pending.get(..4) {
            let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
            if len > self.limit {
                return Err(LogError::FrameTooLarge {
                    at,
                    len: u64::from(len),
                    max: self.limit,
                }
                .into());
            }
        }
        let Some((payload, end)) = checked_payload(pending, at)? else {
            return Ok(None);
        };
        let msg: Msg = decode_value(payload).map_err(|reason| LogError::Decode { at, reason })?;
        self.start += end;
        self.pos = self.pos.next(end);
        Ok(Some(msg))
    }

    /// Read more bytes; Ok(false) at an end of stream at a frame boundary.
    /// A stream that ends inside a frame is the peer's death in the middle
    /// of a write (the kernel closes a killed process's socket after
    /// whatever it had written): [`ChannelError::PeerClosed`] naming the
    /// partial frame, exactly like a reset after the same bytes. Everything
    /// before it was delivered.
    pub async fn read_more<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        during: &'static str,
    ) -> Result<bool, ChannelError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        // `read_buf` appends only the bytes read, so a read cancelled by a
        // timer leaves the buffer as it was.
        self.buf.reserve(CHUNK);
        let n = r
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| ChannelError::io(during, e))?;
        if n > 0 {
            return Ok(true);
        }
        if self.buf.is_empty() {
            return Ok(false);
        }
        let expected = match self.buf.get(..4) {
            Some(h) if self.buf.len() >= FRAME_HEAD_LEN => {
                FRAME_HEAD_LEN as u64 + u64::from(u32::from_le_bytes([h[0], h[1], h[2], h[3]]))
            }
            _ => FRAME_HEAD_LEN as u64,
        };
        Err(ChannelError::PeerClosed {
            detail: format!(
                "end of stream inside {}: {} of its {expected} bytes arrived, the peer died in \
                 the middle of a write",
                self.pos,
                self.buf.len()
            ),
        })
    }

    /// The next frame, reading as needed; Ok(None) at a clean end.
    pub async fn next<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        during: &'static str,
    ) -> Result<Option<Msg>, ChannelError> {
        loop {
            if let Some(m) = self.next_buffered()? {
                return Ok(Some(m));
            }
            if !self.read_more(r, during).await? {
                return Ok(None);
            }
        }
    }
}

/// Read the peer's preamble; returns its protocol version.
pub(crate) async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<u32, ChannelError> {
    let mut p = [0u8; CHANNEL_PREAMBLE_LEN];
    let mut got = 0;
    while got < p.len() {
        let n = r
            .read(&mut p[got..])
            .await
            .map_err(|e| ChannelError::io("reading the peer's preamble", e))?;
        if n == 0 {
            return Err(ChannelError::PeerClosed {
                detail: format!(
                    "end of stream after {got} of the {CHANNEL_PREAMBLE_LEN} preamble bytes"
                ),
            });
        }
        got += n;
        let k = got.min(CHANNEL_MAGIC.len());
        if p[..k] != CHANNEL_MAGIC[..k] {
            let mut found = [0u8; 8];
            found[..k].copy_from_slice(&p[..k]);
            return Err(ChannelError::NotAChannel { found });
        }
    }
    Ok(u32::from_le_bytes([p[8], p[9], p[10], p[11]]))
}

/// Fresh random bytes for a nonce.
pub(crate) fn nonce() -> Result<[u8; NONCE_LEN], ChannelError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| ChannelError::Io {
        during: "drawing a handshake nonce",
        source: std::sync::Arc::new(std::io::Error::other(e.to_string())),
    })?;
    Ok(n)
}

/// Which side a MAC proves.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Prover {
    Primary,
    Backup,
}

/// What both MACs cover: who proves, the protocol version, the primary's
/// backend, image and pairing generation, and both nonces. Binding the Hello's fields means a
/// man in the middle cannot alter them unnoticed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transcript {
    pub version: u32,
    pub backend: ExecBackend,
    pub image_digest: [u8; 32],
    pub generation: u64,
    pub join: bool,
    pub primary_nonce: [u8; NONCE_LEN],
    pub backup_nonce: [u8; NONCE_LEN],
}

fn mac_over(key: &[u8], who: Prover, t: &Transcript) -> Result<Hmac<Sha256>, ChannelError> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .map_err(|e| ChannelError::Config(format!("unusable shared key: {e}")))?;
    let label: &[u8] = match who {
        Prover::Primary => b"ftvmm-channel-v1 primary",
        Prover::Backup => b"ftvmm-channel-v1 backup",
    };
    let backend = ExecBackend::ALL
        .iter()
        .position(|b| *b == t.backend)
        .unwrap_or(usize::MAX) as u64;
    mac.update(label);
    mac.update(&t.version.to_le_bytes());
    mac.update(&backend.to_le_bytes());
    mac.update(&t.image_digest);
    mac.update(&t.generation.to_le_bytes());
    mac.update(&[u8::from(t.join)]);
    mac.update(&t.primary_nonce);
    mac.update(&t.backup_nonce);
    Ok(mac)
}

/// HMAC-SHA256 proving `who` holds `key`.
pub(crate) fn prove(key: &[u8], who: Prover, t: &Transcript) -> Result<[u8; 32], ChannelError> {
    let tag = mac_over(key, who, t)?.finalize().into_bytes();
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag);
    Ok(out)
}

/// Check `who`'s proof in constant time.
pub(crate) fn verify(
    key: &[u8],
    who: Prover,
    t: &Transcript,
    tag: &[u8; 32],
) -> Result<bool, ChannelError> {
    Ok(mac_over(key, who, t)?.verify_slice(tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DigestKind, EntryKind, ExecPoint};

    fn all_messages() -> Vec<Msg> {
        vec![
            Msg::Hello {
                backend: ExecBackend::Pmu,
                image_digest: [1; 32],
                generation: 7,
                join: true,
                nonce: [2; 32],
            },
            Msg::Challenge { nonce: [3; 32] },
            Msg::Auth { mac: [4; 32] },
            Msg::Welcome { mac: [5; 32] },
            Msg::Refuse(Refusal::Version {
                primary: 2,
                backup: 1,
            }),
            Msg::Header(LogHeader {
                backend: ExecBackend::Exits,
                image_digest: [6; 32],
                mem_mib: 64,
                cmdline: "console=ttyS0".into(),
                state_digest: DigestKind::Blake3RegsRam,
                digest_interval_ms: None,
                net_mac: Some([1, 2, 3, 4, 5, 6]),
                cpuid: Vec::new(),
                initrd_digest: None,
            }),
            Msg::Entry(LogEntry {
                seq: 9,
                point: ExecPoint {
                    count: 1,
                    rip: 2,
                    rcx: 3,
                },
                kind: EntryKind::SerialInput {
                    bytes: b"hi".to_vec(),
                },
            }),
            Msg::Keepalive,
            Msg::Ack {
                received: Some(300),
                executed: None,
            },
            Msg::Close,
            Msg::Abort {
                reason: "checksum".into(),
            },
            Msg::Released { through: 41 },
            Msg::Pages {
                first: 16,
                data: vec![7; 8192],
            },
            Msg::JoinState {
                state: vec![1, 2, 3],
            },
        ]
    }

    #[test]
    fn every_message_round_trips_through_the_framing() {
        let mut w = FrameWriter::new();
        let msgs = all_messages();
        for m in &msgs {
            w.push(m).unwrap();
        }
        let mut r = FrameReader::new();
        // Pages are larger than a stranger may send.
        r.authenticated();
        // Feed one byte at a time: partial frames are never decoded early.
        let mut got = Vec::new();
        for b in &w.buf {
            r.buf.push(*b);
            while let Some(m) = r.next_buffered().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(r.pos().index, msgs.len() as u64);
        assert_eq!(r.pos().offset, (CHANNEL_PREAMBLE_LEN + w.buf.len()) as u64);
    }

    /// Pins the wire format of the two most frequent small messages.
    #[test]
    fn keepalive_and_ack_bytes_are_stable() {
        let mut out = Vec::new();
        encode_msg(&Msg::Keepalive, &mut out, FramePos::default()).unwrap();
        let crc = crc32fast::hash(&[7]).to_le_bytes();
        assert_eq!(out, [&[1, 0, 0, 0][..], &crc, &[7]].concat());
        out.clear();
        let ack = Msg::Ack {
            received: Some(1),
            executed: None,
        };
        encode_msg(&ack, &mut out, FramePos::default()).unwrap();
        assert_eq!(&out[..4], &[4, 0, 0, 0]);
        assert_eq!(&out[8..], &[8, 1, 1, 0]);
    }

    #[test]
    fn a_damaged_payload_is_a_checksum_error_naming_the_frame() {
        let mut w = FrameWriter::new();
        w.push(&Msg::Keepalive).unwrap();
        w.push(&Msg::Close).unwrap();
        let last = w.buf.len() - 1;
        w.buf[last] ^= 1;
        let mut r = FrameReader::new();
        r.buf = w.buf.clone();
        assert_eq!(r.next_buffered().unwrap(), Some(Msg::Keepalive));
        let e = r.next_buffered().unwrap_err();
        assert!(
            matches!(e.log_error(), Some(LogError::Checksum { at, .. }) if at.index == 1 && at.offset == 21),
            "{e:?}"
        );
    }

    #[test]
    fn an_oversized_length_is_refused_before_waiting_for_it() {
        let mut r = FrameReader::new();
        r.authenticated();
        r.buf = [&u32::MAX.to_le_bytes()[..], &[0; 4]].concat();
        let e = r.next_buffered().unwrap_err();
        assert!(
            matches!(e.log_error(), Some(LogError::FrameTooLarge { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn before_authentication_frames_are_limited_to_a_few_kib() {
        let big = 1u32 << 20;
        let mut r = FrameReader::new();
        r.buf = [&big.to_le_bytes()[..], &[0; 4]].concat();
        let e = r.next_buffered().unwrap_err();
        assert!(
            matches!(e.log_error(), Some(LogError::FrameTooLarge { len, max, .. })
                if *len == u64::from(big) && *max == PRE_AUTH_FRAME_LEN),
            "{e:?}"
        );
        // The same length is fine once the peer proved the key.
        r.authenticated();
        assert_eq!(r.next_buffered().unwrap(), None, "waits for the payload");
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_the_peers_death() {
        let mut w = FrameWriter::new();
        w.push(&Msg::Keepalive).unwrap();
        w.push(&Msg::Released { through: 3 }).unwrap();
        let cut = w.buf.len() - 2;
        let mut stream = &w.buf[..cut];
        let mut r = FrameReader::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let e = rt.block_on(async {
            assert_eq!(
                r.next(&mut stream, "test").await.unwrap(),
                Some(Msg::Keepalive)
            );
            r.next(&mut stream, "test").await.unwrap_err()
        });
        assert!(e.is_peer_death(), "{e:?}");
        assert!(e.to_string().contains("inside frame 1"), "{e}");
    }

    #[test]
    fn macs_verify_only_with_the_same_key_side_and_transcript() {
        let t = Transcript {
            version: 1,
            backend: ExecBackend::Exits,
            image_digest: [1; 32],
            generation: 4,
            join: false,
            primary_nonce: [2; 32],
            backup_nonce: [3; 32],
        };
        let mac = prove(b"key", Prover::Primary, &t).unwrap();
        assert!(verify(b"key", Prover::Primary, &t, &mac).unwrap());
        assert!(!verify(b"other", Prover::Primary, &t, &mac).unwrap());
        assert!(
            !verify(b"key", Prover::Backup, &t, &mac).unwrap(),
            "a primary's proof cannot be reflected as the backup's"
        );
        let mut t2 = t;
        t2.backup_nonce[0] ^= 1;
        assert!(!verify(b"key", Prover::Primary, &t2, &mac).unwrap());
        let mut t3 = t;
        t3.backend = ExecBackend::Pmu;
        assert!(!verify(b"key", Prover::Primary, &t3, &mac).unwrap());
        let mut t4 = t;
        t4.generation = 5;
        assert!(
            !verify(b"key", Prover::Primary, &t4, &mac).unwrap(),
            "the generation is bound by the MAC"
        );
        let mut t5 = t;
        t5.join = true;
        assert!(
            !verify(b"key", Prover::Primary, &t5, &mac).unwrap(),
            "whether the primary joins is bound by the MAC"
        );
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
