//! Kernel loading (linux-loader) and the boot information a kernel finds in
//! memory: the zero page, the command line, the e820 / PVH memory map.

use std::io::Cursor;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{self, load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::arch::boot::{write_boot_tables, EntryMode};
use crate::memory::{
    ram_size, GuestRam, CMDLINE, CMDLINE_MAX, HIMEM_START, LOW_MEM_END, PAGE_SIZE, PVH_INFO,
    PVH_MEMMAP, PVH_MODLIST, ZERO_PAGE,
};
use crate::{Error, Result};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The highest initrd address a kernel whose setup header says 0 accepts
/// (Documentation/x86/boot.rst, protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Where an initrd may end: below the 32-bit boundary, which both the PVH
/// module list and `boot_params.hdr.ramdisk_image` (u32) can address.
const INITRD_LIMIT: u64 = 1 << 32;

/// What kind of image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// 64-bit ELF entered in long mode.
    Elf,
    /// 64-bit ELF with a PVH entry note, entered in 32-bit mode.
    ElfPvh,
    /// bzImage entered at its 64-bit entry.
    BzImage,
}

/// Where and how the vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    /// Image kind.
    pub kind: KernelKind,
    /// Entry state.
    pub entry: EntryMode,
    /// First byte after the kernel.
    pub kernel_end: u64,
    /// Where the initrd was placed, if one was given.
    pub initrd: Option<Placed>,
}

/// An initrd's place in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Guest-physical address (page aligned).
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

/// Load `image` (and `initrd`, if given) into `mem`, write the boot
/// structures, and return the entry.
pub fn load_kernel(
    mem: &GuestRam,
    image: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
) -> Result<Loaded> {
    let cmdline = build_cmdline(cmdline)?;
    write_boot_tables(mem)?;
    let himem = Some(GuestAddress(HIMEM_START));
    let is_elf = image.starts_with(b"\x7fELF");
    let is_bzimage = image.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if !is_elf && !is_bzimage {
        return Err(Error::KernelFormat(
            "not an ELF file, and not a bzImage either (no ELF magic, no \"HdrS\" setup header); \
             ftvmm boots 64-bit ELF (plain or PVH) and bzImage kernels"
                .into(),
        ));
    }
    let elf = if is_elf {
        Elf::load(mem, None, &mut Cursor::new(image), himem)
    } else {
        Err(loader::Error::Elf(ElfError::InvalidElfMagicNumber))
    };
    let loaded = match elf {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            let elf_entry = elf_entry(image)?;
            load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(kernel_err)?;
            match entry {
                Some(pvh) => {
                    let placed = load_initrd(mem, initrd, r.kernel_end, INITRD_LIMIT - 1)?;
                    write_pvh_info(mem, &cmdline, placed)?;
                    Loaded {
                        kind: KernelKind::ElfPvh,
                        entry: EntryMode::Pvh32 {
                            entry: pvh,
                            start_info: PVH_INFO,
                        },
                        kernel_end: r.kernel_end,
                        initrd: placed,
                    }
                }
                None => {
                    let placed = load_initrd(mem, initrd, r.kernel_end, DEFAULT_INITRD_ADDR_MAX)?;
                    write_zero_page(mem, None, &cmdline, placed)?;
                    Loaded {
                        kind: KernelKind::Elf,
                        entry: EntryMode::Long64 {
                            entry: elf_entry,
                            zero_page: ZERO_PAGE,
                        },
                        kernel_end: r.kernel_end,
                        initrd: placed,
                    }
                }
            }
        }
        Err(loader::Error::Elf(ElfError::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut Cursor::new(image), himem).map_err(|e| {
                Error::KernelFormat(format!(
                    "not an ELF file, and not a bzImage either ({e}); \
                     ftvmm boots 64-bit ELF (plain or PVH) and bzImage kernels"
                ))
            })?;
            load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(kernel_err)?;
            let max = match r.setup_header.map_or(0, |h| h.initrd_addr_max) {
                0 => DEFAULT_INITRD_ADDR_MAX,
                m => u64::from(m),
            };
            let placed = load_initrd(mem, initrd, r.kernel_end, max)?;
            write_zero_page(mem, r.setup_header, &cmdline, placed)?;
            Loaded {
                kind: KernelKind::BzImage,
                // The 64-bit entry sits 0x200 bytes into the protected-mode code.
                entry: EntryMode::Long64 {
                    entry: r.kernel_load.0 + 0x200,
                    zero_page: ZERO_PAGE,
                },
                kernel_end: r.kernel_end,
                initrd: placed,
            }
        }
        Err(e) => return Err(kernel_err(e)),
    };
    if loaded.kernel_end > ram_size(mem) {
        return Err(Error::KernelFormat(format!(
            "kernel ends at {:#x}, beyond guest memory ({} MiB)",
            loaded.kernel_end,
            ram_size(mem) >> 20
        )));
    }
    Ok(loaded)
}

/// Copy `initrd` as high in RAM as the kernel accepts (its last byte at or
/// below `max_addr`), page aligned, above the kernel: where boot loaders put
/// it, so the kernel's early allocations below it are not in its way.
fn load_initrd(
    mem: &GuestRam,
    initrd: Option<&[u8]>,
    kernel_end: u64,
    max_addr: u64,
) -> Result<Option<Placed>> {
    let Some(data) = initrd else {
        return Ok(None);
    };
    let size = data.len() as u64;
    let top = ram_size(mem).min(max_addr.saturating_add(1));
    let floor = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if size > 0 && a >= floor => a,
        _ => {
            return Err(Error::Initrd(format!(
                "{size} bytes do not fit between the kernel's end ({floor:#x}) and {top:#x}; \
                 give the guest more memory (--mem) or a smaller initrd"
            )))
        }
    };
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| Error::Initrd(format!("cannot write it at {addr:#x}: {e}")))?;
    tracing::debug!(addr, size, "initrd loaded");
    Ok(Some(Placed { addr, size }))
}

fn kernel_err(e: impl std::fmt::Display) -> Error {
    Error::KernelFormat(e.to_string())
}

/// The ELF entry point (linux-loader returns the load address instead).
fn elf_entry(image: &[u8]) -> Result<u64> {
    let bytes = image
        .get(24..32)
        .ok_or_else(|| Error::KernelFormat("ELF header is truncated".into()))?;
    let mut e = [0u8; 8];
    e.copy_from_slice(bytes);
    Ok(u64::from_le_bytes(e))
}

fn build_cmdline(s: &str) -> Result<Cmdline> {
    let mut c = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Cmdline(e.to_string()))?;
    if !s.is_empty() {
        c.insert_str(s)
            .map_err(|e| Error::Cmdline(format!("{e} (at most {} bytes)", CMDLINE_MAX - 1)))?;
    }
    Ok(c)
}

fn cmdline_len(c: &Cmdline) -> Result<u32> {
    let s = c.as_cstring().map_err(|e| Error::Cmdline(e.to_string()))?;
    Ok(s.as_bytes_with_nul().len() as u32)
}

/// RAM ranges as (start, length): low memory, then everything above 1 MiB.
fn ram_ranges(mem: &GuestRam) -> [(u64, u64); 2] {
    let size = ram_size(mem);
    [(0, LOW_MEM_END), (HIMEM_START, size - HIMEM_START)]
}

fn write_zero_page(
    mem: &GuestRam,
    header: Option<loader::bootparam::setup_header>,
    cmdline: &Cmdline,
    initrd: Option<Placed>,
) -> Result<()> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    if let Some(p) = initrd {
        // Both below 4 GiB (load_initrd's limits).
        params.hdr.ramdisk_image = p.addr as u32;
        params.hdr.ramdisk_size = p.size as u32;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len(cmdline)?;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    for (i, (addr, size)) in ram_ranges(mem).iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = 2;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE)), mem)
        .map_err(kernel_err)
}

fn write_pvh_info(mem: &GuestRam, cmdline: &Cmdline, initrd: Option<Placed>) -> Result<()> {
    let _ = cmdline_len(cmdline)?;
    let memmap: Vec<hvm_memmap_table_entry> = ram_ranges(mem)
        .iter()
        .map(|(addr, size)| hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    // Linux takes its initrd from the first module.
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|p| hvm_modlist_entry {
            paddr: p.addr,
            size: p.size,
            ..Default::default()
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST },
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(kernel_err)
}

/// Where [`minimal_elf`] loads its code.
pub const MINIMAL_ELF_LOAD: u64 = 0x10_0000;
const EHDR: usize = 64;
const PHDR: usize = 56;

/// A minimal 64-bit ELF with one loadable segment at 1 MiB holding `code`,
/// entered at its first byte, plus a PT_NOTE segment holding `note` (already
/// encoded) if given. For tiny test and calibration kernels.
pub fn minimal_elf(code: &[u8], note: Option<&[u8]>) -> Vec<u8> {
    let phnum = if note.is_some() { 2 } else { 1 };
    let off = (EHDR + PHDR * phnum) as u64;
    let total = off + code.len() as u64;
    let mut f = Vec::with_capacity(total as usize);
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&(MINIMAL_ELF_LOAD + off).to_le_bytes()); // entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // shoff
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&(phnum as u16).to_le_bytes());
    f.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&7u32.to_le_bytes()); // RWX
    f.extend_from_slice(&0u64.to_le_bytes()); // offset
    f.extend_from_slice(&MINIMAL_ELF_LOAD.to_le_bytes()); // vaddr
    f.extend_from_slice(&MINIMAL_ELF_LOAD.to_le_bytes()); // paddr
    f.extend_from_slice(&total.to_le_bytes()); // filesz
    f.extend_from_slice(&total.to_le_bytes()); // memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // align
    if let Some(n) = note {
        f.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&total.to_le_bytes()); // the note follows the code
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&(n.len() as u64).to_le_bytes());
        f.extend_from_slice(&(n.len() as u64).to_le_bytes());
        f.extend_from_slice(&4u64.to_le_bytes());
    }
    f.extend_from_slice(code);
    if let Some(n) = note {
        f.extend_from_slice(n);
    }
    f
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::memory::create_ram;

    /// A PVH ELF (the note names an entry; it is never run here).
    fn pvh_image() -> Vec<u8> {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(MINIMAL_ELF_LOAD as u32 + 0x100).to_le_bytes());
        minimal_elf(&[0xf4; 16], Some(&note))
    }

    fn read_u64(mem: &GuestRam, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn pvh_initrd_is_the_first_module_at_the_top_of_ram() {
        let mem = create_ram(16).unwrap();
        let initrd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let l = load_kernel(&mem, &pvh_image(), "console=ttyS0", Some(&initrd)).unwrap();
        let p = l.initrd.unwrap();
        assert_eq!(p.size, 10_000);
        assert_eq!(p.addr % PAGE_SIZE, 0);
        assert!(p.addr + p.size <= 16 << 20 && p.addr + p.size > (16 << 20) - PAGE_SIZE);
        // hvm_start_info: nr_modules at 12, modlist_paddr at 16.
        let nr: u32 = mem.read_obj(GuestAddress(PVH_INFO + 12)).unwrap();
        assert_eq!(nr, 1);
        assert_eq!(read_u64(&mem, PVH_INFO + 16), PVH_MODLIST);
        assert_eq!(read_u64(&mem, PVH_MODLIST), p.addr);
        assert_eq!(read_u64(&mem, PVH_MODLIST + 8), p.size);
        let mut back = vec![0u8; initrd.len()];
        mem.read_slice(&mut back, GuestAddress(p.addr)).unwrap();
        assert_eq!(back, initrd);
    }

    #[test]
    fn no_initrd_means_no_module() {
        let mem = create_ram(16).unwrap();
        let l = load_kernel(&mem, &pvh_image(), "", None).unwrap();
        assert_eq!(l.initrd, None);
        let nr: u32 = mem.read_obj(GuestAddress(PVH_INFO + 12)).unwrap();
        assert_eq!(nr, 0);
    }

    #[test]
    fn elf_initrd_is_in_the_zero_page() {
        let mem = create_ram(16).unwrap();
        let image = minimal_elf(&[0xf4; 16], None);
        let l = load_kernel(&mem, &image, "", Some(&[7u8; 5000])).unwrap();
        let p = l.initrd.unwrap();
        // boot_params.hdr.ramdisk_image at 0x218, ramdisk_size at 0x21c.
        let image_at: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x218)).unwrap();
        let size: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x21c)).unwrap();
        assert_eq!((u64::from(image_at), u64::from(size)), (p.addr, 5000));
    }

    /// A bzImage whose setup header accepts an initrd up to `max`.
    fn bzimage(initrd_addr_max: u32) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&initrd_addr_max.to_le_bytes());
        img.extend_from_slice(&[0xf4; 0x400]);
        img
    }

    #[test]
    fn bzimage_initrd_respects_initrd_addr_max() {
        let mem = create_ram(32).unwrap();
        let l = load_kernel(&mem, &bzimage(0x00ff_ffff), "", Some(&[9u8; 8192])).unwrap();
        assert_eq!(l.kind, KernelKind::BzImage);
        let p = l.initrd.unwrap();
        // The highest page-aligned place that ends at or below 16 MiB.
        assert_eq!(p.addr, (16 << 20) - 8192);
        let image_at: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x218)).unwrap();
        let size: u32 = mem.read_obj(GuestAddress(ZERO_PAGE + 0x21c)).unwrap();
        assert_eq!((u64::from(image_at), size), (p.addr, 8192));
    }

    #[test]
    fn an_initrd_that_does_not_fit_is_a_clear_error() {
        let mem = create_ram(4).unwrap();
        let e = load_kernel(&mem, &pvh_image(), "", Some(&vec![0u8; 4 << 20])).unwrap_err();
        assert!(matches!(e, Error::Initrd(_)), "{e}");
        assert!(e.to_string().contains("--mem"), "{e}");
    }
}
