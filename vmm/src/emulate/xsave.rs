//! XSAVE, XSAVEOPT, XSAVEC and XRSTOR (standard and compacted forms), after
//! the operation sections of the SDM (vol. 1, 13.7 to 13.10).

use super::cpu::{Cpu, Step};
use super::fault::Exception;
use super::xstate::{
    FpuState, AVX, COMPACTED, HEADER, MXCSR_INIT, MXCSR_RANGE, SSE, X87, X87_RANGES, XMM_RANGE,
};

/// Which save instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveForm {
    /// XSAVE (and XSAVEOPT, whose optimisations are optional: saving every
    /// requested component is a correct XSAVEOPT).
    Standard,
    /// XSAVEC: compacted, init optimisation.
    Compacted,
}

/// The legacy region as the instruction stores it: the 64-bit form
/// (REX.W) keeps 64-bit FIP/FDP; the default form stores their low 32 bits
/// with FCS/FDS zero (deprecated on current processors).
pub(crate) fn legacy_image(f: &FpuState, w64: bool) -> Vec<u8> {
    let mut l = f.area[..512].to_vec();
    if !w64 {
        l[12..16].fill(0);
        l[20..24].fill(0);
    }
    l
}

/// Load the x87 part of a legacy image into `f`.
pub(crate) fn load_x87(f: &mut FpuState, img: &[u8], w64: bool) {
    for (a, b) in X87_RANGES {
        f.area[a..b].copy_from_slice(&img[a..b]);
    }
    if !w64 {
        f.area[12..16].fill(0);
        f.area[20..24].fill(0);
    }
}

fn slice(img: &[u8], r: (usize, usize)) -> Vec<u8> {
    img[r.0..r.1].to_vec()
}

fn check_aligned(la: u64, to: u64) -> Step<()> {
    if la % to != 0 {
        return Err(Exception::gp0().into());
    }
    Ok(())
}

/// XSAVE/XSAVEOPT/XSAVEC to linear `la`.
pub fn save(cpu: &mut Cpu<'_>, la: u64, form: SaveForm, w64: bool) -> Step<()> {
    check_aligned(la, 64)?;
    let layout = &cpu.features.xstate;
    let rfbm_in = cpu.edx_eax();
    let f = cpu.fpu()?.clone();
    let rfbm = f.xcr0 & rfbm_in;
    let xinuse = f.in_use(layout);
    let img = legacy_image(&f, w64);
    let mut pieces: Vec<(usize, Vec<u8>)> = Vec::new();
    let saved = match form {
        SaveForm::Standard => rfbm,
        SaveForm::Compacted => rfbm & xinuse,
    };
    if saved & X87 != 0 {
        for r in X87_RANGES {
            pieces.push((r.0, slice(&img, r)));
        }
    }
    let mxcsr = match form {
        SaveForm::Standard => rfbm & (SSE | AVX) != 0,
        SaveForm::Compacted => saved & SSE != 0,
    };
    if mxcsr {
        pieces.push((MXCSR_RANGE.0, slice(&img, MXCSR_RANGE)));
    }
    if saved & SSE != 0 {
        pieces.push((XMM_RANGE.0, slice(&img, XMM_RANGE)));
    }
    let comps = match form {
        SaveForm::Standard => layout.standard(rfbm),
        SaveForm::Compacted => layout.compacted(rfbm),
    };
    for (i, c, off) in comps {
        if saved & (1 << i) != 0 {
            pieces.push((off, f.area[c.offset..c.offset + c.size].to_vec()));
        }
    }
    match form {
        SaveForm::Standard => {
            // XSTATE_BV bits outside RFBM keep their value.
            let old = cpu.read_uint(la + HEADER as u64, 8)?;
            let bv = (old & !rfbm) | (xinuse & rfbm);
            pieces.push((HEADER, bv.to_le_bytes().to_vec()));
        }
        SaveForm::Compacted => {
            let mut h = saved.to_le_bytes().to_vec();
            h.extend_from_slice(&(rfbm | COMPACTED).to_le_bytes());
            pieces.push((HEADER, h));
        }
    }
    cpu.write_pieces(la, &pieces)
}

/// XRSTOR from linear `la`, standard or compacted as XCOMP_BV[63] says.
pub fn restore(cpu: &mut Cpu<'_>, la: u64, w64: bool) -> Step<()> {
    check_aligned(la, 64)?;
    let rfbm_in = cpu.edx_eax();
    let mut hdr = [0u8; 64];
    cpu.read(la + HEADER as u64, &mut hdr)?;
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&hdr[8 * i..8 * i + 8]);
        u64::from_le_bytes(b)
    };
    let (xstate_bv, xcomp_bv) = (word(0), word(1));
    let layout = cpu.features.xstate.clone();
    let mut f = cpu.fpu()?.clone();
    let xcr0 = f.xcr0;
    let rfbm = xcr0 & rfbm_in;
    let gp = || Err(Exception::gp0().into());
    let compacted = xcomp_bv & COMPACTED != 0;
    let (restore, init) = if !compacted {
        if xstate_bv & !xcr0 != 0 || hdr[8..24].iter().any(|&b| b != 0) {
            return gp();
        }
        (rfbm & xstate_bv, rfbm & !xstate_bv)
    } else {
        let format = xcomp_bv & !COMPACTED;
        if !layout.xsavec
            || format & !xcr0 != 0
            || xstate_bv & !xcomp_bv != 0
            || hdr[16..64].iter().any(|&b| b != 0)
        {
            return gp();
        }
        (
            format & rfbm & xstate_bv,
            (rfbm & !xstate_bv) | (rfbm & !format),
        )
    };
    let mut img = vec![0u8; 512];
    let need = |r: (usize, usize), img: &mut Vec<u8>| cpu.read(la + r.0 as u64, &mut img[r.0..r.1]);
    if restore & X87 != 0 {
        for r in X87_RANGES {
            need(r, &mut img)?;
        }
    }
    // The standard form loads MXCSR whenever SSE or AVX is requested; the
    // compacted form only with the SSE component.
    let load_mxcsr = if compacted {
        restore & SSE != 0
    } else {
        rfbm & (SSE | AVX) != 0
    };
    let mut mxcsr = None;
    if load_mxcsr {
        need(MXCSR_RANGE, &mut img)?;
        let v = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
        if v & !f.mxcsr_mask() != 0 {
            return gp();
        }
        mxcsr = Some(v);
    }
    if restore & SSE != 0 {
        need(XMM_RANGE, &mut img)?;
    }
    let comps = if compacted {
        layout.compacted(xcomp_bv & !COMPACTED)
    } else {
        layout.standard(rfbm)
    };
    let mut loaded = Vec::new();
    for (i, c, off) in comps {
        if restore & (1 << i) != 0 {
            let mut b = vec![0u8; c.size];
            cpu.read(la + off as u64, &mut b)?;
            loaded.push((c, b));
        }
    }
    // Every read succeeded: commit.
    f.ensure(layout.standard_size(xcr0));
    if restore & X87 != 0 {
        load_x87(&mut f, &img, w64);
    } else if init & X87 != 0 {
        f.init_x87();
    }
    if restore & SSE != 0 {
        f.area[XMM_RANGE.0..XMM_RANGE.1].copy_from_slice(&img[XMM_RANGE.0..XMM_RANGE.1]);
    } else if init & SSE != 0 {
        f.init_xmm();
        if compacted {
            mxcsr = Some(MXCSR_INIT);
        }
    }
    for i in 2..63 {
        if init & (1 << i) != 0 {
            if let Some(c) = layout.component(i) {
                f.area[c.offset..c.offset + c.size].fill(0);
            }
        }
    }
    for (c, b) in loaded {
        f.area[c.offset..c.offset + c.size].copy_from_slice(&b);
    }
    f.set_xinuse((f.xinuse() & !(restore | init)) | restore);
    if let Some(v) = mxcsr {
        f.set_mxcsr(v);
    }
    cpu.fpu = Some(f);
    cpu.fpu_dirty = true;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::emulate::cpu::Stop;
    use crate::emulate::features::Features;
    use crate::emulate::paging::tests::{Tables, PT};
    use vm_memory::{Bytes, GuestAddress};

    /// A state with every AVX-512-host component in use and recognisable
    /// bytes: byte k of the area is (k * 7) mod 251, except the header.
    pub(crate) fn busy_state() -> FpuState {
        let mut area: Vec<u8> = (0..4096).map(|k| (k * 7 % 251) as u8).collect();
        area[512..576].fill(0);
        let mut f = FpuState { area, xcr0: 0xe7 };
        f.set_xinuse(0xe7);
        f.area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        f.area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        f
    }

    /// A CPU over identity-mapped pages 0..64 KiB (4 KiB pages at 0x10000 +).
    fn setup<'a>(t: &'a Tables, f: &'a Features) -> Cpu<'a> {
        for p in 16..48 {
            t.map4k(p, p * 4096, 0x3);
        }
        let mut c = Cpu::new(Default::default(), t.sregs(), &t.mem, f);
        c.fpu = Some(busy_state());
        c.regs.rax = 0xffff_ffff;
        c.regs.rdx = 0xffff_ffff;
        c
    }

    /// The first index where two byte strings differ (short failure messages).
    fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
        (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
    }

    macro_rules! same {
        ($a:expr, $b:expr $(, $msg:expr)?) => {
            assert_eq!(first_diff(&$a, &$b), None $(, "{}", $msg)?)
        };
    }

    fn mem(t: &Tables, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        t.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    }

    const AREA: u64 = 0x10_000 + 0x40 * 50; // 64-byte aligned, crosses a page

    #[test]
    fn xsave_standard_writes_every_requested_component_at_its_offset() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        t.mem
            .write_slice(&[0xee; 3000], GuestAddress(AREA))
            .unwrap();
        // Old XSTATE_BV bit 9 survives (outside RFBM).
        t.mem
            .write_obj(1u64 << 9, GuestAddress(AREA + 512))
            .unwrap();
        save(&mut c, AREA, SaveForm::Standard, true).unwrap();
        let m = mem(&t, AREA, 3000);
        let s = busy_state();
        same!(m[0..416], s.area[0..416]);
        assert_eq!(&m[416..512], &[0xee; 96][..], "bytes 416..511 untouched");
        same!(m[576..832], s.area[576..832]);
        assert_eq!(
            &m[832..1088],
            &[0xee; 256][..],
            "no components 3 and 4 here"
        );
        same!(m[1088..2688], s.area[1088..2688]);
        let bv = u64::from_le_bytes(m[512..520].try_into().unwrap());
        assert_eq!(bv, 0xe7 | (1 << 9));
        assert_eq!(
            &m[520..576],
            &[0xee; 56][..],
            "XCOMP_BV and the rest untouched"
        );
    }

    #[test]
    fn xsave_with_partial_mask_writes_only_those_parts() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        t.mem
            .write_slice(&[0xee; 3000], GuestAddress(AREA))
            .unwrap();
        c.regs.rax = AVX; // only AVX: MXCSR goes with it, XMM does not
        c.regs.rdx = 0;
        save(&mut c, AREA, SaveForm::Standard, true).unwrap();
        let m = mem(&t, AREA, 3000);
        assert_eq!(&m[0..24], &[0xee; 24][..]);
        same!(m[24..32], busy_state().area[24..32]);
        assert_eq!(&m[160..416], &[0xee; 256][..]);
        same!(m[576..832], busy_state().area[576..832]);
        assert_eq!(&m[1088..1100], &[0xee; 12][..]);
    }

    #[test]
    fn xsavec_compacts_and_skips_components_in_init_state() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        // Opmask (5) in its initial state (zero), whatever XSTATE_BV says.
        let mut st = busy_state();
        st.area[1088..1152].fill(0);
        c.fpu = Some(st.clone());
        t.mem
            .write_slice(&[0xee; 3000], GuestAddress(AREA))
            .unwrap();
        save(&mut c, AREA, SaveForm::Compacted, true).unwrap();
        let m = mem(&t, AREA, 3000);
        let bv = u64::from_le_bytes(m[512..520].try_into().unwrap());
        let comp = u64::from_le_bytes(m[520..528].try_into().unwrap());
        assert_eq!(bv, 0xe7 & !(1 << 5));
        assert_eq!(comp, 0xe7 | COMPACTED);
        assert_eq!(&m[528..576], &[0xee; 48][..]);
        same!(m[576..832], st.area[576..832], "YMM_Hi128 first");
        assert_eq!(&m[832..896], &[0xee; 64][..], "opmask slot left alone");
        same!(m[896..1408], st.area[1152..1664], "ZMM_Hi256 packed");
        same!(m[1408..2432], st.area[1664..2688], "Hi16_ZMM packed");
    }

    #[test]
    fn misaligned_area_is_gp_and_writes_nothing() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        assert_eq!(
            save(&mut c, AREA + 16, SaveForm::Standard, true),
            Err(Stop::Fault(Exception::gp0()))
        );
        assert_eq!(
            restore(&mut c, AREA + 8, true),
            Err(Stop::Fault(Exception::gp0()))
        );
    }

    #[test]
    fn a_missing_page_faults_before_anything_is_written() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        t.map4k(17, 0, 0); // the area's second page is not present
        t.mem.write_slice(&[0xee; 512], GuestAddress(AREA)).unwrap();
        let e = save(&mut c, AREA, SaveForm::Standard, true).unwrap_err();
        assert_eq!(
            e,
            Stop::Fault(Exception::PageFault {
                addr: AREA + 1088, // the first byte written in that page (opmask)
                code: crate::emulate::fault::PF_WRITE
            })
        );
        assert_eq!(mem(&t, AREA, 512), vec![0xee; 512]);
        // The XSTATE_BV read succeeded (A set); nothing was written (no D).
        assert_eq!(t.get(PT + 16 * 8) & 0x60, 0x20);
    }

    #[test]
    fn round_trip_standard_and_compacted() {
        for form in [SaveForm::Standard, SaveForm::Compacted] {
            let t = Tables::new();
            let f = Features::for_tests();
            let mut c = setup(&t, &f);
            t.mem.write_slice(&[0; 3000], GuestAddress(AREA)).unwrap();
            save(&mut c, AREA, form, true).unwrap();
            // Scramble the live state, then restore it.
            let mut other = busy_state();
            other.area[..2688].iter_mut().for_each(|b| *b = !*b);
            other.area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
            other.area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
            other.area[512..576].fill(0);
            other.set_xinuse(0xe7);
            c.fpu = Some(other);
            restore(&mut c, AREA, true).unwrap();
            assert!(c.fpu_dirty);
            let got = c.fpu.as_ref().unwrap();
            let want = busy_state();
            same!(got.area[..416], want.area[..416], format!("{form:?}"));
            same!(got.area[576..832], want.area[576..832], format!("{form:?}"));
            same!(
                got.area[1088..2688],
                want.area[1088..2688],
                format!("{form:?}")
            );
            assert_eq!(got.xinuse(), 0xe7);
        }
    }

    #[test]
    fn restore_initialises_components_clear_in_xstate_bv() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        // Compacted area: XSTATE_BV = x87 only, XCOMP_BV = all.
        let mut hdr = [0u8; 64];
        hdr[0..8].copy_from_slice(&X87.to_le_bytes());
        hdr[8..16].copy_from_slice(&(0xe7 | COMPACTED).to_le_bytes());
        t.mem.write_slice(&[0x11; 512], GuestAddress(AREA)).unwrap();
        t.mem.write_slice(&hdr, GuestAddress(AREA + 512)).unwrap();
        restore(&mut c, AREA, true).unwrap();
        let got = c.fpu.as_ref().unwrap();
        assert_eq!(got.xinuse(), X87);
        assert_eq!(&got.area[0..24], &[0x11; 24][..]);
        assert_eq!(got.mxcsr(), MXCSR_INIT, "compacted SSE init resets MXCSR");
        assert!(got.area[160..416].iter().all(|&b| b == 0));
        assert!(got.area[576..832].iter().all(|&b| b == 0));
        assert!(got.area[1088..2688].iter().all(|&b| b == 0));
    }

    #[test]
    fn restore_rejects_bad_headers_and_mxcsr() {
        let cases: [(u64, u64, u32, &str); 5] = [
            (1 << 9, 0, 0x1f80, "XSTATE_BV bit outside XCR0"),
            (X87, 1, 0x1f80, "standard form with XCOMP_BV set"),
            (
                X87 | SSE,
                X87 | COMPACTED,
                0x1f80,
                "XSTATE_BV outside XCOMP_BV",
            ),
            (X87, (1 << 9) | COMPACTED, 0x1f80, "XCOMP_BV outside XCR0"),
            (SSE, 0, 0x1_0000, "reserved MXCSR bit"),
        ];
        for (bv, comp, mxcsr, what) in cases {
            let t = Tables::new();
            let f = Features::for_tests();
            let mut c = setup(&t, &f);
            c.fpu.as_mut().unwrap().area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
            let before = c.fpu.clone();
            t.mem.write_slice(&[0; 600], GuestAddress(AREA)).unwrap();
            t.mem.write_obj(mxcsr, GuestAddress(AREA + 24)).unwrap();
            t.mem.write_obj(bv, GuestAddress(AREA + 512)).unwrap();
            t.mem.write_obj(comp, GuestAddress(AREA + 520)).unwrap();
            assert_eq!(
                restore(&mut c, AREA, true),
                Err(Stop::Fault(Exception::gp0())),
                "{what}"
            );
            assert_eq!(c.fpu, before, "{what}: state unchanged");
        }
        // Reserved header bytes 16..63 in the compacted form.
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        t.mem.write_slice(&[0; 600], GuestAddress(AREA)).unwrap();
        t.mem
            .write_obj(COMPACTED | 3, GuestAddress(AREA + 520))
            .unwrap();
        t.mem.write_obj(1u8, GuestAddress(AREA + 540)).unwrap();
        assert!(restore(&mut c, AREA, true).is_err());
    }

    #[test]
    fn standard_restore_loads_mxcsr_with_avx_only_and_marks_sse_in_use() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        let mut st = busy_state();
        st.set_xinuse(X87);
        c.fpu = Some(st);
        t.mem.write_slice(&[0; 1000], GuestAddress(AREA)).unwrap();
        t.mem.write_obj(0x1fc0u32, GuestAddress(AREA + 24)).unwrap();
        c.regs.rax = AVX;
        c.regs.rdx = 0;
        restore(&mut c, AREA, true).unwrap();
        let got = c.fpu.as_ref().unwrap();
        assert_eq!(got.mxcsr(), 0x1fc0);
        assert_eq!(
            got.xinuse() & (SSE | AVX),
            SSE,
            "AVX init, SSE kept for MXCSR"
        );
    }

    #[test]
    fn default_operand_size_form_stores_32_bit_pointers() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = setup(&t, &f);
        c.regs.rax = X87;
        c.regs.rdx = 0;
        t.mem.write_slice(&[0xee; 600], GuestAddress(AREA)).unwrap();
        save(&mut c, AREA, SaveForm::Standard, false).unwrap();
        let m = mem(&t, AREA, 24);
        let s = busy_state();
        same!(m[8..12], s.area[8..12]);
        assert_eq!(&m[12..16], &[0; 4]);
        same!(m[16..20], s.area[16..20]);
        assert_eq!(&m[20..24], &[0; 4]);
    }
}
