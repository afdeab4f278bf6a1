//! COM1: a 16550 UART from vm-superio, with its interrupt routed to the PIC
//! through a latch the VMM drains after each access (so the IRQ is raised
//! inside the exit that caused it). Transmitted bytes are the access's
//! output ([`DeviceCtx::emit`]); where they go is the run loop's business.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use super::{BusDevice, DeviceCtx};
use crate::output::Stream;

/// ISA IRQ of COM1.
pub const SERIAL_IRQ: u8 = 4;

/// Records that the UART wants an interrupt.
#[derive(Debug, Clone, Default)]
pub struct IrqLatch(Arc<AtomicBool>);

impl IrqLatch {
    /// Take the pending request, if any.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl Trigger for IrqLatch {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The UART's registers, for snapshots (vm-superio's state is not serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UartState {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

/// COM1.
pub struct Uart {
    /// Writes into a buffer that each access drains into its context.
    inner: Serial<IrqLatch, NoEvents, Vec<u8>>,
    latch: IrqLatch,
}

impl Uart {
    /// A UART in its reset state.
    pub fn new() -> Self {
        let latch = IrqLatch::default();
        Uart {
            inner: Serial::new(latch.clone(), Vec::new()),
            latch,
        }
    }

    /// Rebuild from a snapshot.
    pub fn from_state(state: &UartState) -> Result<Self, String> {
        let r = state.regs;
        let s = SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: state.in_buffer.clone(),
        };
        let latch = IrqLatch::default();
        let inner = Serial::from_state(&s, latch.clone(), NoEvents, Vec::new())
            .map_err(|e| format!("serial state: {e:?}"))?;
        // Restoring re-raises what was pending; the PIC state already holds it.
        latch.take();
        Ok(Uart { inner, latch })
    }

    /// Snapshot of the registers and receive FIFO.
    pub fn state(&self) -> UartState {
        let s = self.inner.state();
        UartState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Queue received bytes; returns how many fit in the FIFO.
    pub fn receive(&mut self, bytes: &[u8], ctx: &mut DeviceCtx) -> usize {
        let n = self.inner.enqueue_raw_bytes(bytes).unwrap_or(0);
        self.drain_irq(ctx);
        n
    }

    /// Free room in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    fn drain_irq(&self, ctx: &mut DeviceCtx) {
        if self.latch.take() {
            ctx.irq_pulses.push(SERIAL_IRQ);
        }
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8], ctx: &mut DeviceCtx) {
        if let Some(b) = data.first_mut() {
            *b = self.inner.read(offset as u8);
        }
        self.drain_irq(ctx);
    }

    fn write(&mut self, offset: u64, data: &[u8], ctx: &mut DeviceCtx) {
        if let Some(b) = data.first() {
            if let Err(e) = self.inner.write(offset as u8, *b) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
        let sent = std::mem::take(self.inner.writer_mut());
        if !sent.is_empty() {
            ctx.emit(Stream::Console, sent);
        }
        self.drain_irq(ctx);
    }
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_rx_interrupt() {
        let mut u = Uart::new();
        let mut ctx = DeviceCtx::default();
        u.write(0, b"h", &mut ctx);
        assert_eq!(ctx.outputs, vec![(Stream::Console, b"h".to_vec())]);
        u.write(1, &[1], &mut ctx); // IER: rx data interrupt
        ctx.irq_pulses.clear();
        assert_eq!(u.receive(b"ab", &mut ctx), 2);
        assert_eq!(ctx.irq_pulses, vec![SERIAL_IRQ]);
        let mut b = [0u8];
        u.read(0, &mut b, &mut ctx);
        assert_eq!(b[0], b'a');
        assert_eq!(ctx.outputs.len(), 1, "only the data register transmits");
    }

    #[test]
    fn state_round_trip_keeps_fifo() {
        let mut u = Uart::new();
        let mut ctx = DeviceCtx::default();
        u.write(3, &[0x03], &mut ctx);
        u.receive(b"xyz", &mut ctx);
        let s = u.state();
        let mut v = Uart::from_state(&s).unwrap();
        assert_eq!(v.state(), s);
        let mut b = [0u8];
        v.read(0, &mut b, &mut ctx);
        assert_eq!(b[0], b'x');
    }
}
