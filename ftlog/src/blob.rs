//! Self-contained binary files other than logs (VM snapshots): a magic, a
//! format version, the payload length and CRC-32, then the postcard payload.
//! The payload encoding itself lives in [`crate::codec`].

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a blob could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The file does not start with the expected magic.
    #[error("not a {kind} file: it starts with {found:02x?}")]
    BadMagic {
        /// What was expected ("ftvmm snapshot").
        kind: &'static str,
        /// The first bytes found.
        found: Vec<u8>,
    },
    /// Another format version.
    #[error(
        "{kind} format version {found} is not supported: this build reads version {supported}"
    )]
    Version {
        /// What was read.
        kind: &'static str,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// Shorter than its header says.
    #[error("{kind} is truncated: expected {expected} bytes, {present} present")]
    Truncated {
        /// What was read.
        kind: &'static str,
        /// Bytes the header announces.
        expected: u64,
        /// Bytes there.
        present: u64,
    },
    /// The payload's checksum does not match.
    #[error(
        "{kind} is corrupt: checksum {computed:#010x} does not match the stored {stored:#010x}"
    )]
    Checksum {
        /// What was read.
        kind: &'static str,
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// The payload does not decode.
    #[error("{kind} payload does not decode: {reason}")]
    Decode {
        /// What was read.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// The value does not encode.
    #[error("cannot encode {kind}: {reason}")]
    Encode {
        /// What was written.
        kind: &'static str,
        /// Why.
        reason: String,
    },
}

/// Describes one blob format.
#[derive(Debug, Clone, Copy)]
pub struct BlobFormat {
    /// Human name for messages.
    pub kind: &'static str,
    /// First eight bytes.
    pub magic: [u8; 8],
    /// Current version.
    pub version: u32,
}

const HEAD: usize = 8 + 4 + 8 + 4;

impl BlobFormat {
    /// Encode `value`.
    pub fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>, BlobError> {
        let payload = crate::codec::encode_value(value).map_err(|reason| BlobError::Encode {
            kind: self.kind,
            reason,
        })?;
        let mut out = Vec::with_capacity(HEAD + payload.len());
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decode a value, checking magic, version, length and checksum.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, BlobError> {
        let kind = self.kind;
        if bytes.len() < HEAD || bytes[..8] != self.magic {
            if bytes.len() >= 8 && bytes[..8] != self.magic {
                return Err(BlobError::BadMagic {
                    kind,
                    found: bytes[..8].to_vec(),
                });
            }
            return Err(BlobError::Truncated {
                kind,
                expected: HEAD as u64,
                present: bytes.len() as u64,
            });
        }
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let version = word(8);
        if version != self.version {
            return Err(BlobError::Version {
                kind,
                found: version,
                supported: self.version,
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[12..20]);
        let len = u64::from_le_bytes(len);
        let stored = word(20);
        let payload = &bytes[HEAD..];
        if payload.len() as u64 != len {
            return Err(BlobError::Truncated {
                kind,
                expected: HEAD as u64 + len,
                present: bytes.len() as u64,
            });
        }
        let computed = crc32fast::hash(payload);
        if computed != stored {
            return Err(BlobError::Checksum {
                kind,
                stored,
                computed,
            });
        }
        crate::codec::decode_value(payload).map_err(|reason| BlobError::Decode { kind, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: BlobFormat = BlobFormat {
        kind: "test blob",
        magic: *b"TESTBLOB",
        version: 3,
    };

    #[test]
    fn round_trip() {
        let v = (1u32, "two".to_string(), vec![3u8; 100]);
        let b = F.encode(&v).unwrap();
        assert_eq!(F.decode::<(u32, String, Vec<u8>)>(&b).unwrap(), v);
    }

    #[test]
    fn every_corruption_is_named() {
        let b = F.encode(&vec![7u8; 64]).unwrap();
        let err = |bytes: &[u8]| F.decode::<Vec<u8>>(bytes).unwrap_err().to_string();
        assert!(err(&b[..10]).contains("truncated"));
        assert!(err(&b[..b.len() - 1]).contains("truncated"));
        let mut c = b.clone();
        c[0] = b'X';
        assert!(err(&c).contains("not a test blob file"));
        let mut c = b.clone();
        c[8] = 9;
        assert!(err(&c).contains("version 9 is not supported"));
        let mut c = b.clone();
        let last = c.len() - 1;
        c[last] ^= 1;
        assert!(err(&c).contains("checksum"));
    }
}
