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
