//! RESP2: request parsing (arrays of bulk strings and inline commands) and
//! the command set of the server.

use super::store::{SetError, Store};

/// Most arguments in one command (including the name).
pub const MAX_ARGS: usize = 32;
/// Longest bulk string accepted.
const MAX_BULK: usize = 1024;
/// Room a single reply may need in the output buffer (a bulk of MAX_BULK
/// plus framing; every other reply is shorter).
pub const MAX_REPLY: usize = MAX_BULK + 32;

pub enum Parsed {
    /// Not a whole command yet.
    Incomplete,
    /// A command of `argc` arguments (`argc` may be 0: an empty line or
    /// `*0`), `consumed` bytes long.
    Command { consumed: usize, argc: usize },
    /// A protocol error: reply with it and close the connection.
    Error(&'static str),
}

/// (start, len) of each argument in the input.
pub type Args = [(usize, usize); MAX_ARGS];

/// `<integer>\r\n` from `pos`: Some(Ok((value, position after the line))),
/// Some(Err) if malformed, None if incomplete.
fn int_line(buf: &[u8], pos: usize) -> Option<Result<(i64, usize), ()>> {
    let rest = &buf[pos.min(buf.len())..];
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return if rest.len() > 20 { Some(Err(())) } else { None };
    };
    if cr + 1 >= rest.len() {
        return None;
    }
    if rest[cr + 1] != b'\n' {
        return Some(Err(()));
    }
    let digits = &rest[..cr];
    let (neg, digits) = match digits.first() {
        Some(b'-') => (true, &digits[1..]),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Some(Err(()));
    }
    let v = digits
        .iter()
        .fold(0i64, |a, &d| a * 10 + i64::from(d - b'0'));
    Some(Ok((if neg { -v } else { v }, pos + cr + 2)))
}

/// Parses the first command in `buf`. `full` says the input buffer cannot
/// take more bytes (so an incomplete command is too big).
pub fn parse(buf: &[u8], args: &mut Args, full: bool) -> Parsed {
    let r = parse_inner(buf, args);
    match r {
        Parsed::Incomplete if full => Parsed::Error("Protocol error: request too big"),
        r => r,
    }
}

fn parse_inner(buf: &[u8], args: &mut Args) -> Parsed {
    let Some(&first) = buf.first() else {
        return Parsed::Incomplete;
    };
    if first != b'*' {
        // Inline command: one line of space-separated words.
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            return Parsed::Incomplete;
        };
        let line = &buf[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut argc = 0;
        let mut i = 0;
        while i < line.len() {
            if line[i] == b' ' || line[i] == b'\t' {
                i += 1;
                continue;
            }
            let start = i;
            while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
                i += 1;
            }
            if argc == MAX_ARGS {
                return Parsed::Error("Protocol error: too many arguments");
            }
            args[argc] = (start, i - start);
            argc += 1;
        }
        return Parsed::Command {
            consumed: nl + 1,
            argc,
        };
    }
    let (n, mut pos) = match int_line(buf, 1) {
        None => return Parsed::Incomplete,
        Some(Err(())) => return Parsed::Error("Protocol error: invalid multibulk length"),
        Some(Ok(v)) => v,
    };
    if n <= 0 {
        return Parsed::Command {
            consumed: pos,
            argc: 0,
        };
    }
    if n as usize > MAX_ARGS {
        return Parsed::Error("Protocol error: invalid multibulk length");
    }
    for arg in args.iter_mut().take(n as usize) {
        let Some(&b) = buf.get(pos) else {
            return Parsed::Incomplete;
        };
        if b != b'$' {
            return Parsed::Error("Protocol error: expected '$'");
        }
        let (len, p) = match int_line(buf, pos + 1) {
            None => return Parsed::Incomplete,
            Some(Ok((len, p))) if (0..=MAX_BULK as i64).contains(&len) => (len as usize, p),
            Some(_) => return Parsed::Error("Protocol error: invalid bulk length"),
        };
        if buf.len() < p + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[p + len..p + len + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not followed by CRLF");
        }
        *arg = (p, len);
        pos = p + len + 2;
    }
    Parsed::Command {
        consumed: pos,
        argc: n as usize,
    }
}

/// Appends replies to a byte buffer; the caller guarantees MAX_REPLY bytes
/// of room before each command.
pub struct Out<'a> {
    pub buf: &'a mut [u8],
    pub end: usize,
}

impl Out<'_> {
    fn raw(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.end);
        self.buf[self.end..self.end + n].copy_from_slice(&s[..n]);
        self.end += n;
    }

    fn simple(&mut self, s: &[u8]) {
        self.raw(b"+");
        self.raw(s);
        self.raw(b"\r\n");
    }

    pub fn error_parts(&mut self, a: &[u8], b: &[u8]) {
        self.raw(b"-");
        self.raw(a);
        self.raw(b);
        self.raw(b"\r\n");
    }

    pub fn error(&mut self, s: &[u8]) {
        self.raw(b"-");
        self.raw(s);
        self.raw(b"\r\n");
    }

    fn int_body(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut n = 0;
        let mut u = v.unsigned_abs();
        loop {
            digits[n] = b'0' + (u % 10) as u8;
            n += 1;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            self.raw(b"-");
        }
        for i in (0..n).rev() {
            self.raw(&digits[i..i + 1]);
        }
    }

    fn integer(&mut self, v: i64) {
        self.raw(b":");
        self.int_body(v);
        self.raw(b"\r\n");
    }

    fn bulk(&mut self, s: &[u8]) {
        self.raw(b"$");
        self.int_body(s.len() as i64);
        self.raw(b"\r\n");
        self.raw(s);
        self.raw(b"\r\n");
    }

    fn nil(&mut self) {
        self.raw(b"$-1\r\n");
    }

    fn wrong_args(&mut self, name: &[u8]) {
        self.raw(b"-ERR wrong number of arguments for '");
        self.name(name, true);
        self.raw(b"' command\r\n");
    }

    /// A command name for an error message: printable, short.
    fn name(&mut self, name: &[u8], lower: bool) {
        for &b in name.iter().take(64) {
            let c = if b.is_ascii_graphic() || b == b' ' {
                if lower {
                    b.to_ascii_lowercase()
                } else {
                    b
                }
            } else {
                b'?'
            };
            self.raw(&[c]);
        }
    }
}

/// Redis' string2ll: optional '-', digits, no leading zeros, no overflow.
fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, d) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if d.is_empty() || d.len() > 19 || (d[0] == b'0' && (d.len() > 1 || neg)) {
        return None;
    }
    let mut v: i64 = 0;
    for &c in d {
        if !c.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(c - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(digit)?
        } else {
            v.checked_add(digit)?
        };
    }
    Some(v)
}

/// What the connection does after a command.
pub enum After {
    Continue,
    /// QUIT: send the reply, then close.
    Close,
}

/// Runs one command (`argc` >= 1) and appends its reply.
pub fn execute(input: &[u8], args: &Args, argc: usize, store: &mut Store, out: &mut Out) -> After {
    let arg = |i: usize| {
        let (s, l) = args[i];
        &input[s..s + l]
    };
    let name = arg(0);
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    if is("PING") {
        match argc {
            1 => out.simple(b"PONG"),
            2 => out.bulk(arg(1)),
            _ => out.wrong_args(name),
        }
    } else if is("ECHO") {
        if argc == 2 {
            out.bulk(arg(1));
        } else {
            out.wrong_args(name);
        }
    } else if is("SET") {
        // Options (EX, NX, ...) are accepted and ignored.
        if argc < 3 {
            out.wrong_args(name);
        } else {
            match store.set(arg(1), arg(2)) {
                Ok(()) => out.simple(b"OK"),
                Err(SetError::KeyTooLong) => out.error(b"ERR key too long"),
                Err(SetError::ValueTooLong) => out.error(b"ERR value too long"),
                Err(SetError::Full) => out.error(b"ERR store is full"),
            }
        }
    } else if is("GET") {
        if argc != 2 {
            out.wrong_args(name);
        } else {
            match store.get(arg(1)) {
                Some(v) => out.bulk(v),
                None => out.nil(),
            }
        }
    } else if is("INCR") {
        if argc != 2 {
            out.wrong_args(name);
        } else {
            let cur = match store.get(arg(1)) {
                None => Some(0),
                Some(v) => parse_i64(v),
            };
            match cur {
                None => out.error(b"ERR value is not an integer or out of range"),
                Some(v) => match v.checked_add(1) {
                    None => out.error(b"ERR increment or decrement would overflow"),
                    Some(n) => {
                        let mut tmp = [0u8; 24];
                        let mut o = Out {
                            buf: &mut tmp,
                            end: 0,
                        };
                        o.int_body(n);
                        let len = o.end;
                        match store.set(arg(1), &tmp[..len]) {
                            Ok(()) => out.integer(n),
                            Err(SetError::Full) => out.error(b"ERR store is full"),
                            Err(_) => out.error(b"ERR key too long"),
                        }
                    }
                },
            }
        }
    } else if is("DEL") {
        if argc < 2 {
            out.wrong_args(name);
        } else {
            let n = (1..argc).filter(|&i| store.del(arg(i))).count();
            out.integer(n as i64);
        }
    } else if is("EXISTS") {
        if argc < 2 {
            out.wrong_args(name);
        } else {
            let n = (1..argc).filter(|&i| store.get(arg(i)).is_some()).count();
            out.integer(n as i64);
        }
    } else if is("DBSIZE") {
        out.integer(store.len() as i64);
    } else if is("FLUSHALL") || is("FLUSHDB") {
        store.clear();
        out.simple(b"OK");
    } else if is("QUIT") {
        out.simple(b"OK");
        return After::Close;
    } else if is("CONFIG") || is("COMMAND") {
        out.raw(b"*0\r\n");
    } else {
        out.raw(b"-ERR unknown command '");
        out.name(name, false);
        out.raw(b"'\r\n");
    }
    After::Continue
}
