//! An x86-64 instruction decoder for the few instructions the VMM emulates:
//! legacy prefixes, REX, the 0F / 0F38 / 0F3A maps, ModRM, SIB,
//! displacement, RIP-relative addressing and immediates. 64-bit mode only.

use std::fmt;

/// Longest legal x86 instruction.
pub const MAX_LEN: usize = 15;

/// Instruction bytes, shown as hex in errors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InsnBytes(pub Vec<u8>);

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A segment register named by an override prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// ES (26).
    Es,
    /// CS (2E).
    Cs,
    /// SS (36).
    Ss,
    /// DS (3E).
    Ds,
    /// FS (64).
    Fs,
    /// GS (65).
    Gs,
}

/// The opcode map an instruction's opcode byte belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    /// One-byte opcodes.
    Primary,
    /// 0F xx.
    Secondary,
    /// 0F 38 xx.
    Map0f38,
    /// 0F 3A xx.
    Map0f3a,
}

/// The ModRM byte with REX extensions applied to `reg` and `rm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModRm {
    /// Bits 7:6.
    pub md: u8,
    /// Bits 5:3, plus REX.R as bit 3.
    pub reg: u8,
    /// Bits 2:0, plus REX.B as bit 3 (meaningful as a register when `md == 3`).
    pub rm: u8,
    /// Bits 5:3 alone (the opcode extension of group instructions).
    pub ext: u8,
    /// Bits 2:0 alone (the second byte of 0F 01 forms).
    pub raw_rm: u8,
}

/// A memory operand: `seg:[base + index*scale + disp]`, or RIP-relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// Base register number (0 = RAX .. 15 = R15).
    pub base: Option<u8>,
    /// Index register number and scale (1, 2, 4, 8).
    pub index: Option<(u8, u8)>,
    /// Sign-extended displacement.
    pub disp: i64,
    /// Relative to the next instruction's RIP.
    pub rip_relative: bool,
    /// Segment override, if any.
    pub seg: Option<Seg>,
    /// 32-bit addressing (67 prefix).
    pub addr32: bool,
}

impl MemOperand {
    /// Whether the default segment is SS (a base of RSP or RBP): faults on
    /// such an operand are #SS rather than #GP.
    pub fn stack_based(&self) -> bool {
        self.seg.is_none() && matches!(self.base, Some(4) | Some(5))
    }
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Length in bytes.
    pub len: usize,
    /// 66 prefix.
    pub opsize: bool,
    /// F3 prefix (the last of F2/F3 wins).
    pub rep: bool,
    /// F2 prefix (the last of F2/F3 wins).
    pub repne: bool,
    /// F0 prefix.
    pub lock: bool,
    /// REX byte, 0 when absent.
    pub rex: u8,
    /// Opcode map.
    pub map: Map,
    /// Opcode byte within the map.
    pub opcode: u8,
    /// ModRM, when the opcode has one.
    pub modrm: Option<ModRm>,
    /// The memory operand, when ModRM names memory.
    pub mem: Option<MemOperand>,
    /// Immediate, zero-extended.
    pub imm: u64,
}

impl Decoded {
    /// REX.W.
    pub fn rex_w(&self) -> bool {
        self.rex & 0x08 != 0
    }
}

/// Why bytes did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// More than 15 bytes.
    TooLong,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn le(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

fn sign_extend(v: u64, bytes: usize) -> i64 {
    let shift = 64 - 8 * bytes as u32;
    ((v << shift) as i64) >> shift
}

/// Decode one instruction in 64-bit mode from `bytes` (which may hold more).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };
    let (mut opsize, mut rep, mut repne, mut lock, mut addr32) =
        (false, false, false, false, false);
    let mut seg = None;
    // A REX byte counts only right before the opcode: one followed by a
    // legacy prefix is ignored.
    let mut rex = 0;
    let mut b = c.next()?;
    loop {
        match b {
            0x66 => opsize = true,
            0x67 => addr32 = true,
            0xf0 => lock = true,
            0xf2 => (repne, rep) = (true, false),
            0xf3 => (rep, repne) = (true, false),
            0x26 => seg = Some(Seg::Es),
            0x2e => seg = Some(Seg::Cs),
            0x36 => seg = Some(Seg::Ss),
            0x3e => seg = Some(Seg::Ds),
            0x64 => seg = Some(Seg::Fs),
            0x65 => seg = Some(Seg::Gs),
            0x40..=0x4f => {
                rex = b;
                b = c.next()?;
                continue;
            }
            _ => break,
        }
        rex = 0;
        b = c.next()?;
    }
    let (map, opcode) = if b == 0x0f {
        match c.next()? {
            0x38 => (Map::Map0f38, c.next()?),
            0x3a => (Map::Map0f3a, c.next()?),
            o => (Map::Secondary, o),
        }
    } else {
        (Map::Primary, b)
    };
    let shape = shape(map, opcode, opsize);
    let mut modrm = None;
    let mut mem = None;
    if shape.modrm {
        let m = c.next()?;
        let md = m >> 6;
        let ext = (m >> 3) & 7;
        let raw_rm = m & 7;
        let r = ModRm {
            md,
            reg: ext | ((rex & 0x04) << 1),
            rm: raw_rm | ((rex & 0x01) << 3),
            ext,
            raw_rm,
        };
        if md != 3 {
            mem = Some(mem_operand(&mut c, r, rex, seg, addr32)?);
        }
        modrm = Some(r);
    }
    let imm = if shape.imm > 0 { c.le(shape.imm)? } else { 0 };
    Ok(Decoded {
        len: c.pos,
        opsize,
        rep,
        repne,
        lock,
        rex,
        map,
        opcode,
        modrm,
        mem,
        imm,
    })
}

fn mem_operand(
    c: &mut Cursor<'_>,
    m: ModRm,
    rex: u8,
    seg: Option<Seg>,
    addr32: bool,
) -> Result<MemOperand, DecodeError> {
    let mut op = MemOperand {
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        seg,
        addr32,
    };
    let disp_len;
    if m.raw_rm == 4 {
        let sib = c.next()?;
        let scale = 1u8 << (sib >> 6);
        let index = ((sib >> 3) & 7) | ((rex & 0x02) << 2);
        let base = (sib & 7) | ((rex & 0x01) << 3);
        // Index 4 (RSP) without REX.X means "no index".
        if index != 4 {
            op.index = Some((index, scale));
        }
        if sib & 7 == 5 && m.md == 0 {
            disp_len = 4;
        } else {
            op.base = Some(base);
            disp_len = [0, 1, 4][m.md as usize];
        }
    } else if m.raw_rm == 5 && m.md == 0 {
        op.rip_relative = true;
        disp_len = 4;
    } else {
        op.base = Some(m.rm);
        disp_len = [0, 1, 4][m.md as usize];
    }
    if disp_len > 0 {
        op.disp = sign_extend(c.le(disp_len)?, disp_len);
    }
    Ok(op)
}

/// Whether an opcode has ModRM and how many immediate bytes follow.
struct Shape {
    modrm: bool,
    imm: usize,
}

fn shape(map: Map, op: u8, opsize: bool) -> Shape {
    let s = |modrm, imm| Shape { modrm, imm };
    match map {
        Map::Map0f38 => s(true, 0),
        Map::Map0f3a => s(true, 1),
        Map::Secondary => match op {
            0x05..=0x09 | 0x0b | 0x0e | 0x30..=0x37 | 0x77 | 0xa0..=0xa2 | 0xa8..=0xaa => {
                s(false, 0)
            }
            0xc8..=0xcf => s(false, 0),
            0x80..=0x8f => s(false, 4),
            0x0f | 0x70..=0x73 | 0xa4 | 0xac | 0xba | 0xc2 | 0xc4..=0xc6 => s(true, 1),
            _ => s(true, 0),
        },
        Map::Primary => primary_shape(op, opsize),
    }
}

fn primary_shape(op: u8, opsize: bool) -> Shape {
    let s = |modrm, imm| Shape { modrm, imm };
    let z = if opsize { 2 } else { 4 };
    match op {
        // ALU r/m forms.
        0x00..=0x3f if op & 7 < 4 => s(true, 0),
        0x00..=0x3f if op & 7 == 4 => s(false, 1),
        0x00..=0x3f if op & 7 == 5 => s(false, z),
        0x63 | 0x69 | 0x6b | 0x84..=0x8f | 0xc0 | 0xc1 | 0xc4..=0xc7 | 0xd0..=0xd3 => {
            let imm = match op {
                0x69 | 0xc7 => z,
                0x6b | 0xc0 | 0xc1 | 0xc6 => 1,
                _ => 0,
            };
            s(true, imm)
        }
        0xd8..=0xdf | 0xf6 | 0xf7 | 0xfe | 0xff | 0x80..=0x83 => {
            let imm = match op {
                0x80 | 0x82 | 0x83 => 1,
                0x81 => z,
                _ => 0,
            };
            s(true, imm)
        }
        0x68 => s(false, z),
        0x6a | 0x70..=0x7f | 0xa8 | 0xb0..=0xb7 | 0xcd | 0xe0..=0xe7 | 0xeb => s(false, 1),
        0xa9 | 0xe8 | 0xe9 => s(false, z),
        0xb8..=0xbf => s(false, z),
        0xc2 | 0xca => s(false, 2),
        0xc8 => s(false, 3),
        _ => s(false, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clac_stac_and_int3() {
        let d = decode(&[0x0f, 0x01, 0xca, 0x90]).unwrap();
        assert_eq!((d.len, d.map, d.opcode), (3, Map::Secondary, 0x01));
        let m = d.modrm.unwrap();
        assert_eq!((m.md, m.ext, m.raw_rm), (3, 1, 2));
        assert!(d.mem.is_none());
        assert_eq!(decode(&[0xcc]).unwrap().len, 1);
        let int = decode(&[0xcd, 0x80]).unwrap();
        assert_eq!((int.len, int.imm), (2, 0x80));
    }

    #[test]
    fn xsave64_with_base_and_disp8() {
        // xsave64 [rdi + 0x40] = 48 0f ae 67 40
        let d = decode(&[0x48, 0x0f, 0xae, 0x67, 0x40]).unwrap();
        assert_eq!(d.len, 5);
        assert!(d.rex_w());
        assert_eq!(d.modrm.unwrap().ext, 4);
        let m = d.mem.unwrap();
        assert_eq!((m.base, m.index, m.disp), (Some(7), None, 0x40));
    }

    #[test]
    fn sib_with_rex_x_and_b_and_disp32() {
        // xrstor64 [r12 + r13*8 - 0x100] = 4b 0f ae ac ec 00 ff ff ff
        let d = decode(&[0x4b, 0x0f, 0xae, 0xac, 0xec, 0x00, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!(d.len, 9);
        assert_eq!(d.modrm.unwrap().ext, 5);
        let m = d.mem.unwrap();
        assert_eq!(m.base, Some(12));
        assert_eq!(m.index, Some((13, 8)));
        assert_eq!(m.disp, -0x100);
    }

    #[test]
    fn sib_without_index_and_rsp_base_is_stack_based() {
        // fxsave64 [rsp] = 48 0f ae 04 24
        let d = decode(&[0x48, 0x0f, 0xae, 0x04, 0x24]).unwrap();
        let m = d.mem.unwrap();
        assert_eq!((m.base, m.index, m.disp), (Some(4), None, 0));
        assert!(m.stack_based());
        // With REX.X, index 4 is R12.
        let d = decode(&[0x4a, 0x0f, 0xae, 0x04, 0x24]).unwrap();
        assert_eq!(d.mem.unwrap().index, Some((12, 1)));
    }

    #[test]
    fn sib_no_base_disp32() {
        // xsavec [rcx*4 + 0x1000] = 0f c7 24 8d 00 10 00 00
        let d = decode(&[0x0f, 0xc7, 0x24, 0x8d, 0x00, 0x10, 0x00, 0x00]).unwrap();
        let m = d.mem.unwrap();
        assert_eq!((m.base, m.index, m.disp), (None, Some((1, 4)), 0x1000));
        assert_eq!(d.modrm.unwrap().ext, 4);
        assert_eq!(d.len, 8);
    }

    #[test]
    fn rip_relative_and_gs_override() {
        // xsaveopt gs:[rip + 0x10] = 65 0f ae 35 10 00 00 00
        let d = decode(&[0x65, 0x0f, 0xae, 0x35, 0x10, 0, 0, 0]).unwrap();
        assert_eq!(d.len, 8);
        let m = d.mem.unwrap();
        assert!(m.rip_relative);
        assert_eq!((m.disp, m.seg), (0x10, Some(Seg::Gs)));
        assert_eq!(d.modrm.unwrap().ext, 6);
    }

    #[test]
    fn popcnt_prefixes_and_operand_sizes() {
        // popcnt rax, qword fs:[rbx] = 64 f3 48 0f b8 03
        let d = decode(&[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x03]).unwrap();
        assert!(d.rep && d.rex_w());
        assert_eq!(d.mem.unwrap().seg, Some(Seg::Fs));
        assert_eq!(d.len, 6);
        // popcnt r9w, r10w = 66 f3 45 0f b8 ca
        let d = decode(&[0x66, 0xf3, 0x45, 0x0f, 0xb8, 0xca]).unwrap();
        let m = d.modrm.unwrap();
        assert!(d.opsize);
        assert_eq!((m.md, m.reg, m.rm), (3, 9, 10));
        // A REX before a legacy prefix is dropped: 48 f3 0f b8 c1 is 32-bit.
        let d = decode(&[0x48, 0xf3, 0x0f, 0xb8, 0xc1]).unwrap();
        assert!(!d.rex_w() && d.rep);
        assert_eq!((d.opcode, d.len), (0xb8, 5));
    }

    #[test]
    fn address_size_prefix_and_disp8_negative() {
        // xsave [ebp - 8] = 67 0f ae 65 f8
        let d = decode(&[0x67, 0x0f, 0xae, 0x65, 0xf8]).unwrap();
        let m = d.mem.unwrap();
        assert!(m.addr32);
        assert_eq!((m.base, m.disp), (Some(5), -8));
        assert!(m.stack_based());
    }

    #[test]
    fn truncated_and_too_long() {
        assert_eq!(decode(&[0x0f, 0xae]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x66; 16]), Err(DecodeError::TooLong));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn bytes_display_as_hex() {
        assert_eq!(InsnBytes(vec![0x0f, 0x01, 0xca]).to_string(), "0f 01 ca");
        assert_eq!(InsnBytes(vec![]).to_string(), "(none)");
    }
}
