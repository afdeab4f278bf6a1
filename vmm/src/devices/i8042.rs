//! Just enough of the PC keyboard controller (i8042) for a reset: the
//! command 0xfe written to port 0x64 pulses the CPU's reset line, which is
//! how Linux reboots a PC without ACPI (`reboot=k`, its first fallback).
//! The VM then ends as after a triple fault ([`crate::RunEnd::Shutdown`]).
//! There is no keyboard: the status register reads 0 (nothing to read,
//! room to write), so Linux's wait for the controller does not spin.

use super::{BusDevice, DeviceCtx};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The command that pulses the reset line.
const CMD_RESET: u8 = 0xfe;

/// The controller's command port; the data port reads 0 and ignores writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8], _ctx: &mut DeviceCtx) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8], ctx: &mut DeviceCtx) {
        if data.first() == Some(&CMD_RESET) {
            ctx.reset = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_fe_resets_and_status_is_idle() {
        let mut k = I8042;
        let mut ctx = DeviceCtx::default();
        let mut b = [0xffu8];
        k.read(0, &mut b, &mut ctx);
        assert_eq!(b, [0]);
        k.write(0, &[0xad], &mut ctx);
        assert!(!ctx.reset);
        k.write(0, &[CMD_RESET], &mut ctx);
        assert!(ctx.reset);
    }
}
