//! Errors of the netdev crate.

/// What can go wrong setting up the network backend.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name is empty, too long (15 bytes at most) or has a NUL.
    #[error("invalid TAP interface name {0:?} (1 to 15 bytes, no NUL)")]
    TapName(String),
    /// Opening or attaching the TAP interface failed.
    #[error("TAP interface {name}: {op} failed: {source}")]
    Tap {
        /// Interface name.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A virtqueue could not be made (an invalid size).
    #[error("cannot create a virtqueue: {0}")]
    Queue(String),
    /// A MAC address that does not parse.
    #[error("invalid MAC address {0:?} (expected six hex bytes like 52:54:00:12:34:56)")]
    Mac(String),
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| NetError::Mac(s.to_string()))?;
        if p.len() != 2 {
            return Err(NetError::Mac(s.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| NetError::Mac(s.to_string()))?;
    }
    if parts.next().is_some() {
        return Err(NetError::Mac(s.to_string()));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
