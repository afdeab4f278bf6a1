//! Test tools for benches and tests: tiny hand-assembled guests that do
//! exactly one thing (the bundled guest does many), and the
//! failure-injection [`relay`] between a primary and a backup.

pub mod relay;

use vmm::loader::{minimal_elf, MINIMAL_ELF_LOAD as LOAD};

const EHDR: usize = 64;
const PHDR: usize = 56;

/// A minimal 64-bit ELF with one loadable segment at 1 MiB holding `code`,
/// entered at the first byte of `code`.
pub fn elf(code: &[u8]) -> Vec<u8> {
    minimal_elf(code, None)
}

/// Power off with 42 if the boot information is right, 1 otherwise.
const CHECK_OK: u8 = 42;

/// A PVH kernel: 32-bit code that checks EBX points at `hvm_start_info`
/// (its magic) and powers off with 42, or 1 on a mismatch.
pub fn pvh_elf() -> Vec<u8> {
    let code = [
        0x66, 0xba, 0x00, 0xf0, // mov dx, 0xf000
        0x8b, 0x03, // mov eax, [ebx]
        0x3d, 0x78, 0xc5, 0x6e, 0x33, // cmp eax, XEN_HVM_START_MAGIC
        0x75, 0x03, // jne fail
        0xb0, CHECK_OK, 0xee, // mov al, 42; out dx, al
        0xb0, 0x01, 0xee, 0xf4, // fail: mov al, 1; out dx, al; hlt
    ];
    let entry = (LOAD + (EHDR + 2 * PHDR) as u64) as u32;
    // Elf64_Nhdr: namesz, descsz, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    minimal_elf(&code, Some(&note))
}

/// A bzImage whose 64-bit entry checks that RSI points at a zero page with
/// the boot flag (0xaa55) and powers off with 42, or 1 on a mismatch.
pub fn bzimage() -> Vec<u8> {
    let setup_sects = 1u8;
    let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&(LOAD as u32).to_le_bytes()); // code32_start
    let mut kernel = vec![0x90u8; 0x200]; // 32-bit entry area, unused
    kernel.extend_from_slice(&[
        0x66, 0xba, 0x00, 0xf0, // mov dx, 0xf000
        0x66, 0x8b, 0x86, 0xfe, 0x01, 0x00, 0x00, // mov ax, [rsi + 0x1fe]
        0x66, 0x3d, 0x55, 0xaa, // cmp ax, 0xaa55
        0x75, 0x03, // jne fail
        0xb0, CHECK_OK, 0xee, // mov al, 42; out dx, al
        0xb0, 0x01, 0xee, 0xf4, // fail
    ]);
    img.extend_from_slice(&kernel);
    img
}

/// The exit code the loader test kernels use for "boot information correct".
pub const BOOT_CHECK_OK: u8 = CHECK_OK;

/// `n` port accesses to an unclaimed port (0x80), then power off with 0:
/// each access is one VM exit and nothing else.
pub fn pio_loop(n: u32, read: bool) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&n.to_le_bytes()); // mov ecx, n
    c.extend_from_slice(if read {
        &[0xe4, 0x80] // in al, 0x80
    } else {
        &[0xe6, 0x80] // out 0x80, al
    });
    c.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfa]); // dec ecx; jnz loop
    c.extend_from_slice(&[0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4]); // power off
    elf(&c)
}

/// A guest that breaks the rules: it stores RDTSC (which KVM cannot
/// intercept) in memory at 2 MiB, then powers off. Its replay must diverge.
pub fn rdtsc_guest() -> Vec<u8> {
    elf(&[
        0x0f, 0x31, // rdtsc
        0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], eax
        0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4, // power off
    ])
}

/// A guest that reads the TSC through RDMSR (IA32_TSC), stores it at 2 MiB
/// and powers off. The MSR filter sends the read to the VMM, which logs it.
pub fn rdmsr_tsc_guest() -> Vec<u8> {
    elf(&[
        0xb9, 0x10, 0x00, 0x00, 0x00, // mov ecx, IA32_TSC
        0x0f, 0x32, // rdmsr
        0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], eax
        0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4, // power off
    ])
}

/// Where [`page_writer`] writes: the 2 MiB from 2 MiB (a guest of 4 MiB or
/// more has it).
pub const PAGE_WRITER_AREA: std::ops::Range<u64> = 0x20_0000..0x40_0000;

/// CPL0 code that enters CPL3 at its own end, with port I/O allowed: sets
/// the U/S bit on the boot page tables (all of the first 1 GiB), loads a GDT
/// with user segments and a TSS whose I/O bitmap (at 0xc068, zero memory)
/// allows every port, and `iretq`s to CPL3 with RSP 0x1ff000 and IF clear.
/// RFLAGS.IOPL 3 alone would do on hardware, but kvm_pvm runs guest CPL3
/// with IOPL 0 and checks the TSS bitmap.
const USER_PROLOGUE: [u8; 174] = [
    0x48, 0x83, 0x0c, 0x25, 0x00, 0x90, 0x00, 0x00, 0x04, // or qword [0x9000], 4
    0x48, 0x83, 0x0c, 0x25, 0x00, 0xa0, 0x00, 0x00, 0x04, // or qword [0xa000], 4
    0xbf, 0x00, 0xb0, 0x00, 0x00, 0xb9, 0x00, 0x02, 0x00,
    0x00, // mov edi, 0xb000; mov ecx, 512
    0x48, 0x83, 0x0f, 0x04, 0x48, 0x83, 0xc7, 0x08, // pd: or qword [rdi], 4; add rdi, 8
    0xff, 0xc9, 0x75, 0xf4, // dec ecx; jnz pd
    0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8, // mov rax, cr3; mov cr3, rax
    0x48, 0x8d, 0x05, 0x37, 0x00, 0x00, 0x00, // lea rax, [rip + gdt]
    0x48, 0x89, 0x05, 0x6a, 0x00, 0x00, 0x00, // mov [rip + gdtr + 2], rax
    0x0f, 0x01, 0x15, 0x61, 0x00, 0x00, 0x00, // lgdt [rip + gdtr]
    0x66, 0xc7, 0x04, 0x25, 0x66, 0xc0, 0x00, 0x00, 0x68, 0x00, // mov word [0xc066], 0x68
    0x66, 0xb8, 0x28, 0x00, 0x0f, 0x00, 0xd8, // mov ax, 0x28; ltr ax
    0x6a, 0x23, // push 0x23 (SS)
    0x68, 0x00, 0xf0, 0x1f, 0x00, // push 0x1ff000 (RSP)
    0x68, 0x02, 0x30, 0x00, 0x00, // push 0x3002 (RFLAGS: IOPL 3, IF 0)
    0x6a, 0x1b, // push 0x1b (CS)
    0x48, 0x8d, 0x05, 0x45, 0x00, 0x00, 0x00, // lea rax, [rip + to_user]
    0x50, 0x48, 0xcf, // push rax; iretq
    // gdt: null, kernel code64, kernel data, user code64, user data,
    // 64-bit TSS (16 bytes) at 0xc000 with limit 0x2068
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xaf, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0xfb, 0xaf, 0x00, //
    0xff, 0xff, 0x00, 0x00, 0x00, 0xf3, 0xcf, 0x00, //
    0x68, 0x20, 0x00, 0xc0, 0x00, 0x89, 0x00, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x37, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // gdtr
];

/// A guest that dirties pseudo-random pages between exits: `exits` rounds of
/// 1-32 eight-byte writes at pseudo-random places in [`PAGE_WRITER_AREA`]
/// (an LCG) and one 32-byte `rep stosb` across a page boundary, each round
/// ending in an exit (`out 0x80, al`); then power off with 0. With `user`
/// the writes run at CPL3 (natively on kvm_pvm, after [`USER_PROLOGUE`]);
/// without, at CPL0 (emulated on kvm_pvm).
pub fn page_writer(exits: u32, user: bool) -> Vec<u8> {
    let mut c = Vec::new();
    if user {
        c.extend_from_slice(&USER_PROLOGUE);
    }
    c.extend_from_slice(&[
        0x49, 0xb8, 0xf1, 0xde, 0xbc, 0x9a, 0x78, 0x56, 0x34, 0x12, // mov r8, seed
        0x49, 0xb9, 0x2d, 0x7f, 0x95, 0x4c, 0x2d, 0xf4, 0x51, 0x58, // mov r9, LCG a
        0x49, 0xba, 0x4f, 0x81, 0x67, 0xf7, 0x7e, 0x7b, 0x05, 0x14, // mov r10, LCG c
        0x41, 0xbc, // mov r12d, exits
    ]);
    c.extend_from_slice(&exits.to_le_bytes());
    c.extend_from_slice(&[
        // outer: r13 = 1 + (next >> 59) writes this round
        0x4d, 0x0f, 0xaf, 0xc1, 0x4d, 0x01, 0xd0, // imul r8, r9; add r8, r10
        0x4d, 0x89, 0xc5, 0x49, 0xc1, 0xed, 0x3b, 0x49, 0xff,
        0xc5, // mov r13, r8; shr 59; inc
        // inner: mov [0x200000 + ((next >> 32) & 0x1ffff8)], r8
        0x4d, 0x0f, 0xaf, 0xc1, 0x4d, 0x01, 0xd0, // imul r8, r9; add r8, r10
        0x4c, 0x89, 0xc0, 0x48, 0xc1, 0xe8, 0x20, // mov rax, r8; shr rax, 32
        0x25, 0xf8, 0xff, 0x1f, 0x00, // and eax, 0x1ffff8
        0x4c, 0x89, 0x80, 0x00, 0x00, 0x20, 0x00, // mov [rax + 0x200000], r8
        0x49, 0xff, 0xcd, 0x75, 0xe1, // dec r13; jnz inner
        // rep stosb of 32 bytes from 0x200ff0 + ((next >> 32) & 0x1fe000)
        0x4d, 0x0f, 0xaf, 0xc1, 0x4d, 0x01, 0xd0, // imul r8, r9; add r8, r10
        0x4c, 0x89, 0xc7, 0x48, 0xc1, 0xef, 0x20, // mov rdi, r8; shr rdi, 32
        0x81, 0xe7, 0x00, 0xe0, 0x1f, 0x00, // and edi, 0x1fe000
        0x48, 0x81, 0xc7, 0xf0, 0x0f, 0x20, 0x00, // add rdi, 0x200ff0
        0xb9, 0x20, 0x00, 0x00, 0x00, // mov ecx, 32
        0x4c, 0x89, 0xc0, 0x48, 0xc1, 0xe8, 0x18, // mov rax, r8; shr rax, 24
        0xf3, 0xaa, // rep stosb
        0xe6, 0x80, // out 0x80, al
        0x41, 0xff, 0xcc, 0x75, 0xa0, // dec r12d; jnz outer
        0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4, // power off
    ]);
    elf(&c)
}

/// Where [`page_sweeper`] writes: from 4 MiB to 1 MiB below the end of a
/// guest of `mem_mib`.
pub fn page_sweeper_area(mem_mib: u64) -> std::ops::Range<u64> {
    0x40_0000..(mem_mib << 20) - 0x10_0000
}

/// A guest that, at CPL3, writes one quadword into every page of
/// [`page_sweeper_area`] `sweeps` times over (the sweep number, so every
/// write changes the page), exiting (`out 0x80`) after every 2 MiB, then
/// powers off with 0: the worst case for dirty logging, since every page's
/// first write after a harvest is a write-protection fault.
pub fn page_sweeper(mem_mib: u64, sweeps: u32) -> Vec<u8> {
    let end = page_sweeper_area(mem_mib).end as u32;
    let mut c = USER_PROLOGUE.to_vec();
    c.extend_from_slice(&[0x41, 0xbc]); // mov r12d, sweeps
    c.extend_from_slice(&sweeps.to_le_bytes());
    c.extend_from_slice(&[
        0xbf, 0x00, 0x00, 0x40, 0x00, // sweep: mov edi, 0x400000
        0x4c, 0x89, 0x27, // page: mov [rdi], r12
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0xf7, 0xc7, 0xff, 0xff, 0x1f, 0x00, // test edi, 0x1fffff
        0x75, 0x02, 0xe6, 0x80, // jnz skip; out 0x80, al
        0x48, 0x81, 0xff, // skip: cmp rdi, end
    ]);
    c.extend_from_slice(&end.to_le_bytes());
    c.extend_from_slice(&[
        0x72, 0xe3, // jb page
        0x41, 0xff, 0xcc, 0x75, 0xd9, // dec r12d; jnz sweep
        0x66, 0xba, 0x00, 0xf0, 0x31, 0xc0, 0xee, 0xf4, // power off
    ]);
    elf(&c)
}

/// An observer that calls `hook` at every point before `inner` sees it and
/// passes everything else straight to `inner`: for tests and benches that
/// watch or perturb a recorder or a replayer.
pub struct Hooked<O, F> {
    /// The observer doing the work.
    pub inner: O,
    /// Called first at every point.
    pub hook: F,
}

impl<O, F> vmm::Observer for Hooked<O, F>
where
    O: vmm::Observer,
    F: FnMut(&mut vmm::Machine) -> vmm::Result<()>,
{
    fn at_point(&mut self, m: &mut vmm::Machine) -> vmm::Result<vmm::Flow> {
        (self.hook)(m)?;
        self.inner.at_point(m)
    }

    fn logged_samples(
        &mut self,
        m: &mut vmm::Machine,
        at: vmm::Access,
    ) -> vmm::Result<Option<Vec<u64>>> {
        self.inner.logged_samples(m, at)
    }

    fn on_sample(
        &mut self,
        m: &mut vmm::Machine,
        at: vmm::Access,
        kind: Option<vmm::devices::SampleKind>,
        values: &[u64],
    ) -> vmm::Result<()> {
        self.inner.on_sample(m, at, kind, values)
    }

    fn on_output(
        &mut self,
        m: &mut vmm::Machine,
        out: &vmm::output::Output,
    ) -> vmm::Result<Option<u64>> {
        self.inner.on_output(m, out)
    }

    fn next_target(&mut self) -> vmm::Result<Option<vmm::points::ExecPoint>> {
        self.inner.next_target()
    }

    fn on_exit(&mut self, m: &mut vmm::Machine, kind: vmm::points::ExitKind) {
        self.inner.on_exit(m, kind)
    }

    fn on_inject(&mut self, m: &mut vmm::Machine, vector: u8) -> vmm::Result<()> {
        self.inner.on_inject(m, vector)
    }

    fn on_idle(&mut self, m: &mut vmm::Machine) -> vmm::Result<vmm::Flow> {
        self.inner.on_idle(m)
    }
}
