//! Guest RAM and the fixed guest-physical layout the boot code uses.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::{Error, Result};

/// Guest RAM: one region from guest-physical 0. Every write the VMM makes
/// through vm-memory's `Bytes` API sets the page's bit in the region's
/// bitmap, which is how [`crate::dirty`] sees the VMM's own writes (KVM's
/// dirty log only sees the vCPU's).
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// The page size of dirty tracking and of the incremental digest (x86's and
/// the host's, which KVM's dirty log and vm-memory's bitmap both use).
pub const PAGE_SIZE: u64 = 4096;

/// GDT written by the VMM for the boot state.
pub const BOOT_GDT: u64 = 0x500;
/// An empty IDT for the boot state (the guest installs its own).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH memory map.
pub const PVH_MEMMAP: u64 = 0x6040;
/// PVH module list (one `hvm_modlist_entry`: the initrd).
pub const PVH_MODLIST: u64 = 0x6800;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Page-table pages for the identity map of the first 1 GiB.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT: u64 = 0xa000;
/// Page directory (512 × 2 MiB).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Room for the command line.
pub const CMDLINE_MAX: usize = 4096;
/// End of low usable memory (the EBDA and BIOS area follow on a PC).
pub const LOW_MEM_END: u64 = 0x9fc00;
/// Where kernels are loaded ("high memory").
pub const HIMEM_START: u64 = 0x10_0000;

/// Smallest guest we accept, in MiB.
pub const MIN_MEM_MIB: u64 = 4;
/// Largest guest we accept, in MiB: below the 32-bit PCI hole, so RAM is one region.
pub const MAX_MEM_MIB: u64 = 3 * 1024;

/// Allocate `mib` MiB of zeroed guest RAM.
pub fn create_ram(mib: u64) -> Result<GuestRam> {
    if mib < MIN_MEM_MIB {
        return Err(Error::MemoryTooSmall {
            got_mib: mib,
            min_mib: MIN_MEM_MIB,
        });
    }
    if mib > MAX_MEM_MIB {
        return Err(Error::MemoryTooLarge {
            got_mib: mib,
            max_mib: MAX_MEM_MIB,
        });
    }
    let bytes = usize::try_from(mib << 20).map_err(|e| Error::Memory(e.to_string()))?;
    GuestRam::from_ranges(&[(GuestAddress(0), bytes)]).map_err(|e| Error::Memory(e.to_string()))
}

/// Size of guest RAM in bytes.
pub fn ram_size(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}
