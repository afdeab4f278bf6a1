//! The XSAVE area: component sizes, offsets and alignment from CPUID leaf
//! 0xD of the guest's CPUID table, the standard and compacted layouts, and
//! the vCPU's extended state as KVM_GET_XSAVE hands it to userspace (always
//! the standard layout, with XSTATE_BV telling which components are in use).

use kvm_bindings::kvm_cpuid_entry2;

/// Size of the legacy (FXSAVE) region.
pub const LEGACY: usize = 512;
/// The XSAVE header: XSTATE_BV at +0, XCOMP_BV at +8, 48 reserved bytes.
pub const HEADER: usize = 512;
/// Where the extended region starts.
pub const EXTENDED: usize = 576;
/// XCOMP_BV bit 63: the compacted form.
pub const COMPACTED: u64 = 1 << 63;

/// x87 state (component 0).
pub const X87: u64 = 1 << 0;
/// SSE state (component 1: XMM registers and MXCSR).
pub const SSE: u64 = 1 << 1;
/// AVX state (component 2: upper halves of YMM).
pub const AVX: u64 = 1 << 2;

/// MXCSR after reset and in the SSE component's initial configuration.
pub const MXCSR_INIT: u32 = 0x1f80;
/// x87 control word after FNINIT.
pub const FCW_INIT: u16 = 0x037f;
/// MXCSR_MASK to assume when the saved area holds none.
pub const MXCSR_MASK_DEFAULT: u32 = 0xffbf;

/// Byte ranges of the legacy region that hold x87 state (not MXCSR).
pub const X87_RANGES: [(usize, usize); 2] = [(0, 24), (32, 160)];
/// MXCSR and MXCSR_MASK.
pub const MXCSR_RANGE: (usize, usize) = (24, 32);
/// XMM0..XMM15.
pub const XMM_RANGE: (usize, usize) = (160, 416);

/// One state component of the extended region (i >= 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Component {
    /// Size in bytes (CPUID.(0xD, i).EAX).
    pub size: usize,
    /// Offset in the standard layout (CPUID.(0xD, i).EBX).
    pub offset: usize,
    /// Aligned to 64 bytes in the compacted layout (CPUID.(0xD, i).ECX[1]).
    pub align64: bool,
}

/// What CPUID says about XSAVE on this guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct XstateLayout {
    comps: Vec<Option<Component>>,
    /// XCR0 bits the guest may set (CPUID.(0xD, 0).EDX:EAX).
    pub supported: u64,
    /// XSAVEOPT (CPUID.(0xD, 1).EAX[0]).
    pub xsaveopt: bool,
    /// XSAVEC and the compacted form of XRSTOR (CPUID.(0xD, 1).EAX[1]).
    pub xsavec: bool,
    /// XSAVES/XRSTORS (CPUID.(0xD, 1).EAX[3]).
    pub xsaves: bool,
}

impl XstateLayout {
    /// From the guest's CPUID entries.
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut l = XstateLayout {
            comps: vec![None; 64],
            ..Default::default()
        };
        for e in entries.iter().filter(|e| e.function == 0xd) {
            match e.index {
                0 => l.supported = u64::from(e.eax) | (u64::from(e.edx) << 32),
                1 => {
                    l.xsaveopt = e.eax & 1 != 0;
                    l.xsavec = e.eax & 2 != 0;
                    l.xsaves = e.eax & 8 != 0;
                }
                i @ 2..=63 if e.eax != 0 => {
                    l.comps[i as usize] = Some(Component {
                        size: e.eax as usize,
                        offset: e.ebx as usize,
                        align64: e.ecx & 2 != 0,
                    });
                }
                _ => {}
            }
        }
        l
    }

    /// Component `i` (>= 2), if CPUID describes it.
    pub fn component(&self, i: usize) -> Option<Component> {
        self.comps.get(i).copied().flatten()
    }

    /// The extended components set in `mask`, in order, with their offsets
    /// in the compacted layout whose XCOMP_BV is `mask`.
    pub fn compacted(&self, mask: u64) -> Vec<(usize, Component, usize)> {
        let mut out = Vec::new();
        let mut next = EXTENDED;
        for i in 2..63 {
            if mask & (1 << i) == 0 {
                continue;
            }
            let Some(c) = self.component(i) else { continue };
            if c.align64 {
                next = next.next_multiple_of(64);
            }
            out.push((i, c, next));
            next += c.size;
        }
        out
    }

    /// The extended components set in `mask` with their standard offsets.
    pub fn standard(&self, mask: u64) -> Vec<(usize, Component, usize)> {
        (2..63)
            .filter(|i| mask & (1 << i) != 0)
            .filter_map(|i| self.component(i).map(|c| (i, c, c.offset)))
            .collect()
    }

    /// Bytes of the standard layout covering every component in `mask`.
    pub fn standard_size(&self, mask: u64) -> usize {
        self.standard(mask)
            .iter()
            .map(|(_, c, off)| off + c.size)
            .max()
            .unwrap_or(EXTENDED)
            .max(EXTENDED)
    }
}

/// The vCPU's x87/SSE/extended state in the standard layout (what
/// KVM_GET_XSAVE returns), and XCR0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FpuState {
    /// The area, at least as large as the standard layout of XCR0.
    pub area: Vec<u8>,
    /// XCR0.
    pub xcr0: u64,
}

impl FpuState {
    fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.area[off], self.area[off + 1]])
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.area[off..off + 4]);
        u32::from_le_bytes(b)
    }

    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.area[off..off + 8]);
        u64::from_le_bytes(b)
    }

    /// XSTATE_BV: the components not in their initial configuration (the
    /// processor's XINUSE as the host saved it).
    pub fn xinuse(&self) -> u64 {
        self.u64_at(HEADER)
    }

    /// The components of XCR0 not in their initial configuration, judged
    /// from their contents. The XSAVE family reports this as XINUSE rather
    /// than the XSTATE_BV KVM hands out: that one is the processor's
    /// tracking as the host last saved it, which varies from run to run on
    /// kvm_pvm (SSE is sometimes "in use" with every XMM register zero and
    /// MXCSR at 0x1F80), and a replay must see the same bytes. A
    /// processor may always report a component in its initial
    /// configuration as not in use, so this is architecturally exact.
    pub fn in_use(&self, layout: &XstateLayout) -> u64 {
        let nonzero = |a: usize, b: usize| self.area[a..b].iter().any(|&x| x != 0);
        let mut m = 0;
        if self.u16_at(0) != FCW_INIT || nonzero(2, 24) || nonzero(32, 160) {
            m |= X87;
        }
        if self.mxcsr() != MXCSR_INIT || nonzero(XMM_RANGE.0, XMM_RANGE.1) {
            m |= SSE;
        }
        for (i, c, _) in layout.standard(self.xcr0) {
            if nonzero(c.offset, c.offset + c.size) {
                m |= 1 << i;
            }
        }
        m & self.xcr0
    }

    /// Set XSTATE_BV.
    pub fn set_xinuse(&mut self, v: u64) {
        self.area[HEADER..HEADER + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// MXCSR.
    pub fn mxcsr(&self) -> u32 {
        self.u32_at(MXCSR_RANGE.0)
    }

    /// Set MXCSR. A value other than the initial one puts SSE state in use
    /// (an area whose XSTATE_BV[1] is clear restores MXCSR to 0x1F80).
    pub fn set_mxcsr(&mut self, v: u32) {
        self.area[24..28].copy_from_slice(&v.to_le_bytes());
        if v != MXCSR_INIT {
            self.set_xinuse(self.xinuse() | SSE);
        }
    }

    /// The MXCSR bits software may set.
    pub fn mxcsr_mask(&self) -> u32 {
        match self.u32_at(28) {
            0 => MXCSR_MASK_DEFAULT,
            m => m,
        }
    }

    /// x87 status word.
    pub fn fsw(&self) -> u16 {
        self.u16_at(2)
    }

    /// Put component 0 (x87) in its initial configuration.
    pub fn init_x87(&mut self) {
        for (a, b) in X87_RANGES {
            self.area[a..b].fill(0);
        }
        self.area[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
    }

    /// Zero XMM0..XMM15 (SSE initial configuration, MXCSR aside).
    pub fn init_xmm(&mut self) {
        self.area[XMM_RANGE.0..XMM_RANGE.1].fill(0);
    }

    /// Make sure the area covers `len` bytes.
    pub fn ensure(&mut self, len: usize) {
        if self.area.len() < len {
            self.area.resize(len, 0);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// CPUID leaf 0xD of a CPU with AVX and AVX-512 (the layout of this
    /// project's development host).
    pub(crate) fn avx512_cpuid() -> Vec<kvm_cpuid_entry2> {
        let e = |index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function: 0xd,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        vec![
            e(0, 0xe7, 2688, 2688, 0),
            e(1, 0xf, 0, 0, 0),
            e(2, 256, 576, 0, 0),
            e(5, 64, 1088, 0, 0),
            e(6, 512, 1152, 0, 0),
            e(7, 1024, 1664, 0, 0),
        ]
    }

    #[test]
    fn layout_from_cpuid() {
        let l = XstateLayout::from_cpuid(&avx512_cpuid());
        assert_eq!(l.supported, 0xe7);
        assert!(l.xsaveopt && l.xsavec && l.xsaves);
        assert_eq!(l.component(2).unwrap().offset, 576);
        assert_eq!(l.component(3), None);
        assert_eq!(l.standard_size(0xe7), 2688);
        assert_eq!(l.standard_size(0x3), 576);
    }

    #[test]
    fn compacted_offsets_pack_components_in_order() {
        let l = XstateLayout::from_cpuid(&avx512_cpuid());
        let c = l.compacted(0xe7);
        let offs: Vec<(usize, usize)> = c.iter().map(|(i, _, o)| (*i, *o)).collect();
        assert_eq!(offs, vec![(2, 576), (5, 832), (6, 896), (7, 1408)]);
        // Without AVX the opmask moves down to 576.
        let c = l.compacted(0xe3);
        assert_eq!((c[0].0, c[0].2), (5, 576));
    }

    #[test]
    fn compacted_offsets_honour_64_byte_alignment() {
        let mut cpuid = avx512_cpuid();
        // A 8-byte component 9 (PKRU-like) then an aligned component 10.
        cpuid.push(kvm_cpuid_entry2 {
            function: 0xd,
            index: 9,
            eax: 8,
            ebx: 2688,
            ..Default::default()
        });
        cpuid.push(kvm_cpuid_entry2 {
            function: 0xd,
            index: 10,
            eax: 16,
            ebx: 2752,
            ecx: 2,
            ..Default::default()
        });
        let l = XstateLayout::from_cpuid(&cpuid);
        let c = l.compacted((1 << 9) | (1 << 10) | 3);
        assert_eq!((c[0].0, c[0].2), (9, 576));
        assert_eq!((c[1].0, c[1].2), (10, 640), "584 rounded up to 64");
    }

    #[test]
    fn in_use_is_judged_from_contents() {
        let l = XstateLayout::from_cpuid(&avx512_cpuid());
        let mut f = FpuState {
            area: vec![0; 4096],
            xcr0: 0xe7,
        };
        f.init_x87();
        f.area[24..28].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        f.area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        f.set_xinuse(0xe7); // what the host claims does not matter
        assert_eq!(f.in_use(&l), 0);
        f.area[160 + 15] = 1; // XMM0
        f.area[1088] = 1; // k0
        assert_eq!(f.in_use(&l), SSE | (1 << 5));
        f.area[2] = 0x80; // FSW
        f.area[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
        f.area[160 + 15] = 0;
        assert_eq!(f.in_use(&l), X87 | SSE | (1 << 5));
        f.xcr0 = 3;
        assert_eq!(f.in_use(&l), X87 | SSE, "only XCR0's components");
    }

    #[test]
    fn mxcsr_other_than_init_marks_sse_in_use() {
        let mut f = FpuState {
            area: vec![0; 4096],
            xcr0: 7,
        };
        f.set_mxcsr(MXCSR_INIT);
        assert_eq!(f.xinuse() & SSE, 0);
        f.set_mxcsr(0x1f80 | 0x40);
        assert_eq!(f.mxcsr(), 0x1fc0);
        assert_ne!(f.xinuse() & SSE, 0);
        assert_eq!(f.mxcsr_mask(), MXCSR_MASK_DEFAULT);
        f.init_x87();
        assert_eq!(&f.area[0..2], &[0x7f, 0x03]);
    }
}
