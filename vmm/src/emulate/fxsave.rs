//! FXSAVE/FXRSTOR (the 512-byte legacy image of x87 and SSE state) and
//! LDMXCSR/STMXCSR.

use super::cpu::{Cpu, Step};
use super::fault::Exception;
use super::xsave::{legacy_image, load_x87};
use super::xstate::{MXCSR_RANGE, SSE, X87, XMM_RANGE};

/// Bytes FXSAVE writes: x87, MXCSR, MXCSR_MASK and XMM0-15. Bytes 416..511
/// are reserved or left to software and not written.
const IMAGE: usize = XMM_RANGE.1;

/// FXSAVE to linear `la` (16-byte aligned).
pub fn fxsave(cpu: &mut Cpu<'_>, la: u64, w64: bool) -> Step<()> {
    if la % 16 != 0 {
        return Err(Exception::gp0().into());
    }
    let img = legacy_image(cpu.fpu()?, w64);
    cpu.write_pieces(la, &[(0, img[..IMAGE].to_vec())])
}

/// FXRSTOR from linear `la`.
pub fn fxrstor(cpu: &mut Cpu<'_>, la: u64, w64: bool) -> Step<()> {
    if la % 16 != 0 {
        return Err(Exception::gp0().into());
    }
    let mut img = vec![0u8; IMAGE];
    cpu.read(la, &mut img)?;
    let mut f = cpu.fpu()?.clone();
    let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
    if mxcsr & !f.mxcsr_mask() != 0 {
        return Err(Exception::gp0().into());
    }
    load_x87(&mut f, &img, w64);
    f.area[XMM_RANGE.0..XMM_RANGE.1].copy_from_slice(&img[XMM_RANGE.0..XMM_RANGE.1]);
    f.area[MXCSR_RANGE.0..MXCSR_RANGE.0 + 4].copy_from_slice(&img[24..28]);
    f.set_xinuse(f.xinuse() | X87 | SSE);
    cpu.fpu = Some(f);
    cpu.fpu_dirty = true;
    Ok(())
}

/// LDMXCSR m32.
pub fn ldmxcsr(cpu: &mut Cpu<'_>, la: u64) -> Step<()> {
    let v = cpu.read_uint(la, 4)? as u32;
    let f = cpu.fpu()?;
    if v & !f.mxcsr_mask() != 0 {
        return Err(Exception::gp0().into());
    }
    f.set_mxcsr(v);
    cpu.fpu_dirty = true;
    Ok(())
}

/// STMXCSR m32.
pub fn stmxcsr(cpu: &mut Cpu<'_>, la: u64) -> Step<()> {
    let v = cpu.fpu()?.mxcsr();
    cpu.write_pieces(la, &[(0, v.to_le_bytes().to_vec())])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::cpu::Stop;
    use crate::emulate::features::Features;
    use crate::emulate::paging::tests::Tables;
    use crate::emulate::xstate::FpuState;
    use vm_memory::{Bytes, GuestAddress};

    fn state() -> FpuState {
        let mut area: Vec<u8> = (0..4096).map(|k| (k * 13 % 251) as u8).collect();
        area[512..576].fill(0);
        area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        FpuState { area, xcr0: 3 }
    }

    fn cpu<'a>(t: &'a Tables, f: &'a Features) -> Cpu<'a> {
        t.map4k(16, 16 * 4096, 0x3);
        let mut c = Cpu::new(Default::default(), t.sregs(), &t.mem, f);
        c.fpu = Some(state());
        c
    }

    const AT: u64 = 16 * 4096 + 0x100;

    #[test]
    fn fxsave_layout_is_the_legacy_region() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        t.mem.write_slice(&[0xee; 512], GuestAddress(AT)).unwrap();
        fxsave(&mut c, AT, true).unwrap();
        let mut m = vec![0u8; 512];
        t.mem.read_slice(&mut m, GuestAddress(AT)).unwrap();
        assert_eq!(&m[..416], &state().area[..416]);
        assert_eq!(&m[416..], &[0xee; 96][..]);
        assert_eq!(
            fxsave(&mut c, AT + 8, true),
            Err(Stop::Fault(Exception::gp0()))
        );
    }

    #[test]
    fn fxrstor_loads_and_checks_mxcsr() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        let img: Vec<u8> = (0..512).map(|k| (k % 200) as u8).collect();
        t.mem.write_slice(&img, GuestAddress(AT)).unwrap();
        t.mem
            .write_obj(0x1f80u32 | 0x8000, GuestAddress(AT + 24))
            .unwrap();
        fxrstor(&mut c, AT, true).unwrap();
        let got = c.fpu.as_ref().unwrap();
        assert_eq!(&got.area[32..160], &img[32..160]);
        assert_eq!(&got.area[160..416], &img[160..416]);
        assert_eq!(got.mxcsr(), 0x9f80);
        assert_eq!(
            &got.area[28..32],
            &0xffffu32.to_le_bytes(),
            "MXCSR_MASK is not loaded"
        );
        assert_eq!(got.xinuse() & 3, 3);
        t.mem.write_obj(0x1_0000u32, GuestAddress(AT + 24)).unwrap();
        assert_eq!(
            fxrstor(&mut c, AT, true),
            Err(Stop::Fault(Exception::gp0()))
        );
    }

    #[test]
    fn ldmxcsr_and_stmxcsr() {
        let t = Tables::new();
        let f = Features::for_tests();
        let mut c = cpu(&t, &f);
        t.mem.write_obj(0x1fa0u32, GuestAddress(AT)).unwrap();
        ldmxcsr(&mut c, AT).unwrap();
        assert_eq!(c.fpu.as_ref().unwrap().mxcsr(), 0x1fa0);
        stmxcsr(&mut c, AT + 4).unwrap();
        assert_eq!(t.mem.read_obj::<u32>(GuestAddress(AT + 4)).unwrap(), 0x1fa0);
        t.mem.write_obj(0x4_0000u32, GuestAddress(AT)).unwrap();
        assert_eq!(ldmxcsr(&mut c, AT), Err(Stop::Fault(Exception::gp0())));
    }
}
