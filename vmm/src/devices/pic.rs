//! The PC's pair of 8259A interrupt controllers: a master at ports 0x20-0x21
//! and a slave at 0xa0-0xa1 whose INT output drives the master's IRQ2.
//!
//! Modelled: the ICW1-ICW4 initialisation sequence (vector base, single or
//! cascade, ICW4 present, auto-EOI), OCW1 (interrupt mask), every OCW2 command
//! (non-specific and specific EOI, and the rotation commands, which change
//! which IRQ has the lowest priority), OCW3 (IRR/ISR read select, poll
//! command, special mask mode), fully nested priority with rotation, and the
//! INTA cycle including spurious IRQ7/IRQ15.
//!
//! Not modelled: level-triggered mode (ICW1.LTIM is ignored, inputs are always
//! edge-triggered), 8080/8085 mode (ICW4.uPM=0 behaves as 8086 mode), buffered
//! mode and special fully nested mode (ICW4 bits 2-4 are stored but ignored),
//! and the ELCR. The cascade is wired fixed: slave INT goes to master IRQ2
//! whatever ICW3 says, and the master's IRQ2 input follows the slave's INT
//! level (so a slave request can never be lost between the two chips).
//!
//! A chip asserts nothing until its first ICW sequence completes. All reads are
//! deterministic (no host value enters the PIC): they only depend on what was
//! written and which IRQ lines were raised.

use serde::{Deserialize, Serialize};

/// Which 8259A of the pair an access targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chip {
    /// Ports 0x20-0x21, IRQ 0-7.
    Master,
    /// Ports 0xa0-0xa1, IRQ 8-15.
    Slave,
}

impl Chip {
    /// Maps an absolute I/O port to its chip and register offset.
    pub fn from_port(port: u16) -> Option<(Chip, u64)> {
        match port {
            0x20 | 0x21 => Some((Chip::Master, u64::from(port - 0x20))),
            0xa0 | 0xa1 => Some((Chip::Slave, u64::from(port - 0xa0))),
            _ => None,
        }
    }
}

/// The master input the slave's INT is wired to.
const CASCADE_IRQ: u8 = 2;
/// The IRQ whose vector a chip returns when the request vanished before INTA.
const SPURIOUS_IRQ: u8 = 7;

/// The initialisation word a chip expects next on its data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum InitStep {
    Icw2,
    Icw3,
    Icw4,
}

/// Registers of one 8259A.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Chip8259 {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Current level of each input line, for edge detection.
    lines: u8,
    /// ICW2 with the low three bits cleared (8086 mode).
    base: u8,
    /// `Some` while an ICW sequence is in progress.
    init: Option<InitStep>,
    /// An ICW sequence has completed: only then does the chip assert INT.
    ready: bool,
    single: bool,
    needs_icw4: bool,
    icw3: u8,
    icw4: u8,
    auto_eoi: bool,
    rotate_on_aeoi: bool,
    /// The IRQ with the lowest priority; the next one up has the highest.
    lowest: u8,
    read_isr: bool,
    /// A poll command is armed: the next command-port read is an INTA.
    poll: bool,
    special_mask: bool,
}

impl Chip8259 {
    fn new() -> Self {
        Chip8259 {
            irr: 0,
            isr: 0,
            imr: 0,
            lines: 0,
            base: 0,
            init: None,
            ready: false,
            single: false,
            needs_icw4: false,
            icw3: 0,
            icw4: 0,
            auto_eoi: false,
            rotate_on_aeoi: false,
            lowest: 7,
            read_isr: false,
            poll: false,
            special_mask: false,
        }
    }

    /// Restores invariants a hand-made snapshot could break.
    fn sanitized(mut self) -> Self {
        self.lowest &= 7;
        self.base &= 0xf8;
        self
    }

    /// Drives input `irq` (0-7); a rising edge latches the request in IRR.
    fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << irq;
        if level {
            if self.lines & bit == 0 {
                self.irr |= bit;
            }
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Priority rank of `irq`: 0 is the highest.
    fn rank(&self, irq: u8) -> u8 {
        irq.wrapping_sub(self.lowest).wrapping_sub(1) & 7
    }

    /// The highest-priority IRQ among the bits of `mask`.
    fn highest(&self, mask: u8) -> Option<u8> {
        (0..8)
            .map(|r| self.lowest.wrapping_add(1).wrapping_add(r) & 7)
            .find(|irq| mask & (1 << irq) != 0)
    }

    /// The IRQ this chip's INT output is requesting service for, if any.
    fn int_irq(&self) -> Option<u8> {
        if !self.ready {
            return None;
        }
        let candidate = self.highest(self.irr & !self.imr)?;
        // In special mask mode, masked in-service levels do not block.
        let in_service = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(in_service) {
            Some(busy) if self.rank(busy) <= self.rank(candidate) => None,
            _ => Some(candidate),
        }
    }

    /// INTA for `irq`: consume the request and mark it in service.
    fn ack(&mut self, irq: u8) {
        let bit = 1u8 << irq;
        self.irr &= !bit;
        if !self.auto_eoi {
            self.isr |= bit;
        } else if self.rotate_on_aeoi {
            self.lowest = irq;
        }
    }

    fn vector(&self, irq: u8) -> u8 {
        self.base | (irq & 7)
    }

    fn write(&mut self, offset: u64, value: u8) {
        match offset {
            0 if value & 0x10 != 0 => self.icw1(value),
            0 if value & 0x08 != 0 => self.ocw3(value),
            0 => self.ocw2(value),
            1 => self.write_data(value),
            _ => tracing::debug!(offset, value, "pic: write outside the chip ignored"),
        }
    }

    fn read(&mut self, offset: u64) -> u8 {
        match offset {
            0 if self.poll => self.poll_read(),
            0 if self.read_isr => self.isr,
            0 => self.irr,
            1 => self.imr,
            _ => {
                tracing::debug!(offset, "pic: read outside the chip");
                0xff
            }
        }
    }

    /// ICW1 resets the chip as the datasheet says and starts the sequence.
    /// The input levels are kept: a line already high must fall and rise
    /// again to request an interrupt.
    fn icw1(&mut self, value: u8) {
        if value & 0x08 != 0 {
            tracing::debug!(value, "pic: level-triggered mode not modelled, using edge");
        }
        let lines = self.lines;
        *self = Chip8259::new();
        self.lines = lines;
        self.single = value & 0x02 != 0;
        self.needs_icw4 = value & 0x01 != 0;
        self.init = Some(InitStep::Icw2);
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            None => self.imr = value,
            Some(InitStep::Icw2) => {
                self.base = value & 0xf8;
                self.init = if !self.single {
                    Some(InitStep::Icw3)
                } else {
                    self.after_icw3()
                };
            }
            Some(InitStep::Icw3) => {
                self.icw3 = value;
                self.init = self.after_icw3();
            }
            Some(InitStep::Icw4) => {
                if value & 0x01 == 0 {
                    tracing::debug!(value, "pic: 8080 mode not modelled, using 8086");
                }
                self.icw4 = value;
                self.auto_eoi = value & 0x02 != 0;
                self.init = None;
            }
        }
        if self.init.is_none() {
            self.ready = true;
        }
    }

    fn after_icw3(&self) -> Option<InitStep> {
        self.needs_icw4.then_some(InitStep::Icw4)
    }

    /// OCW2: the R, SL and EOI bits select the command, L2-L0 the level.
    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            0b001 => {
                self.non_specific_eoi();
            }
            0b011 => self.isr &= !(1 << level),
            0b101 => {
                if let Some(irq) = self.non_specific_eoi() {
                    self.lowest = irq;
                }
            }
            0b111 => {
                self.isr &= !(1 << level);
                self.lowest = level;
            }
            0b110 => self.lowest = level,
            0b100 => self.rotate_on_aeoi = true,
            0b000 => self.rotate_on_aeoi = false,
            _ => {} // 0b010: no operation
        }
    }

    /// Clears the highest-priority in-service bit and returns its IRQ.
    fn non_specific_eoi(&mut self) -> Option<u8> {
        let irq = self.highest(self.isr)?;
        self.isr &= !(1 << irq);
        Some(irq)
    }

    fn ocw3(&mut self, value: u8) {
        if value & 0x40 != 0 {
            self.special_mask = value & 0x20 != 0;
        }
        if value & 0x04 != 0 {
            self.poll = true;
        }
        if value & 0x02 != 0 {
            self.read_isr = value & 0x01 != 0;
        }
    }

    /// The poll command's read: an INTA without a vector. Bit 7 says whether
    /// an interrupt was pending, bits 2-0 which one.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.int_irq() {
            Some(irq) => {
                self.ack(irq);
                0x80 | irq
            }
            None => 0,
        }
    }
}

/// The master and slave 8259A, cascaded on the master's IRQ2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pic {
    master: Chip8259,
    slave: Chip8259,
}

/// A snapshot of the [`Pic`] pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    master: Chip8259,
    slave: Chip8259,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair as after power-on: both chips wait for ICW1.
    pub fn new() -> Self {
        Pic {
            master: Chip8259::new(),
            slave: Chip8259::new(),
        }
    }

    /// Snapshot of both chips.
    pub fn state(&self) -> PicState {
        PicState {
            master: self.master.clone(),
            slave: self.slave.clone(),
        }
    }

    /// A pair that continues exactly where `state` was taken.
    pub fn from_state(state: &PicState) -> Self {
        let mut pic = Pic {
            master: state.master.clone().sanitized(),
            slave: state.slave.clone().sanitized(),
        };
        pic.sync_cascade();
        pic
    }

    /// Guest read of `chip`'s port at `offset` (0 = command/status,
    /// 1 = data/IMR). A wider access reads consecutive ports, as on ISA.
    pub fn read(&mut self, chip: Chip, offset: u64, data: &mut [u8]) {
        for (i, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = self.chip_mut(chip).read(offset.saturating_add(i));
        }
        self.sync_cascade();
    }

    /// Guest write of `chip`'s port at `offset`.
    pub fn write(&mut self, chip: Chip, offset: u64, data: &[u8]) {
        for (i, &byte) in (0u64..).zip(data.iter()) {
            self.chip_mut(chip).write(offset.saturating_add(i), byte);
        }
        self.sync_cascade();
    }

    /// Drives ISA line `irq` (0-15). A rising edge latches a request. IRQ2
    /// is the cascade input and out-of-range lines are ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => tracing::debug!("pic: IRQ2 is the cascade input, ignored"),
            0..=7 => self.master.set_line(irq, level),
            8..=15 => self.slave.set_line(irq - 8, level),
            _ => tracing::debug!(irq, "pic: no such IRQ line"),
        }
        self.sync_cascade();
    }

    /// An edge-triggered interrupt: raise then lower line `irq`.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// The INTR line to the CPU.
    pub fn has_pending(&self) -> bool {
        self.master.int_irq().is_some()
    }

    /// The INTA cycle. Returns the vector to inject, or `None` if the master
    /// has not been initialised. If no request is pending (it was masked or
    /// went away since [`Pic::has_pending`]), the chip answers as hardware
    /// does with its IRQ7 vector and marks nothing in service; so call this
    /// only when about to inject.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if !self.master.ready {
            return None;
        }
        let vector = match self.master.int_irq() {
            None => self.master.vector(SPURIOUS_IRQ),
            Some(CASCADE_IRQ) => {
                self.master.ack(CASCADE_IRQ);
                self.slave_ack()
            }
            Some(irq) => {
                self.master.ack(irq);
                self.master.vector(irq)
            }
        };
        self.sync_cascade();
        Some(vector)
    }

    /// The slave's half of an INTA cycle routed through the cascade.
    fn slave_ack(&mut self) -> u8 {
        match self.slave.int_irq() {
            Some(irq) => {
                self.slave.ack(irq);
                self.slave.vector(irq)
            }
            None => self.slave.vector(SPURIOUS_IRQ),
        }
    }

    fn chip_mut(&mut self, chip: Chip) -> &mut Chip8259 {
        match chip {
            Chip::Master => &mut self.master,
            Chip::Slave => &mut self.slave,
        }
    }

    /// The master's IRQ2 request follows the slave's INT output.
    fn sync_cascade(&mut self) {
        let bit = 1u8 << CASCADE_IRQ;
        if self.slave.int_irq().is_some() {
            self.master.irr |= bit;
        } else {
            self.master.irr &= !bit;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER_BASE: u8 = 0x20;
    const SLAVE_BASE: u8 = 0x28;

    /// Programs the pair as Linux does: edge, cascade, ICW4, 8086 mode.
    fn init_pair(pic: &mut Pic, icw4: u8) {
        pic.write(Chip::Master, 0, &[0x11]);
        pic.write(Chip::Master, 1, &[MASTER_BASE]);
        pic.write(Chip::Master, 1, &[0x04]);
        pic.write(Chip::Master, 1, &[icw4]);
        pic.write(Chip::Slave, 0, &[0x11]);
        pic.write(Chip::Slave, 1, &[SLAVE_BASE]);
        pic.write(Chip::Slave, 1, &[0x02]);
        pic.write(Chip::Slave, 1, &[icw4]);
    }

    fn ready_pic() -> Pic {
        let mut pic = Pic::new();
        init_pair(&mut pic, 0x01);
        pic
    }

    fn read_reg(pic: &mut Pic, chip: Chip, offset: u64) -> u8 {
        let mut b = [0u8];
        pic.read(chip, offset, &mut b);
        b[0]
    }

    fn eoi(pic: &mut Pic, chip: Chip) {
        pic.write(chip, 0, &[0x20]);
    }

    fn irr(pic: &mut Pic, chip: Chip) -> u8 {
        pic.write(chip, 0, &[0x0a]);
        read_reg(pic, chip, 0)
    }

    fn isr(pic: &mut Pic, chip: Chip) -> u8 {
        pic.write(chip, 0, &[0x0b]);
        read_reg(pic, chip, 0)
    }

    #[test]
    fn uninitialised_pic_asserts_nothing() {
        let mut pic = Pic::new();
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn init_sequence_sets_vector_bases() {
        let mut pic = ready_pic();
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        eoi(&mut pic, Chip::Master);
        pic.pulse_irq(9);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 1));
    }

    #[test]
    fn icw2_low_bits_are_ignored() {
        let mut pic = Pic::new();
        pic.write(Chip::Master, 0, &[0x13]); // single, ICW4 needed: no ICW3
        pic.write(Chip::Master, 1, &[0x45]);
        pic.write(Chip::Master, 1, &[0x01]);
        pic.pulse_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x43));
    }

    #[test]
    fn sequence_without_icw4_completes_after_icw3() {
        let mut pic = Pic::new();
        pic.write(Chip::Master, 0, &[0x10]);
        pic.write(Chip::Master, 1, &[0x30]);
        pic.write(Chip::Master, 1, &[0x04]);
        // The next data write is OCW1, not ICW4.
        pic.write(Chip::Master, 1, &[0xfe]);
        assert_eq!(read_reg(&mut pic, Chip::Master, 1), 0xfe);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn chip_is_quiet_during_init_sequence() {
        let mut pic = ready_pic();
        pic.write(Chip::Master, 0, &[0x11]);
        pic.write(Chip::Master, 1, &[MASTER_BASE]);
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        pic.write(Chip::Master, 1, &[0x04]);
        pic.write(Chip::Master, 1, &[0x01]);
        assert!(pic.has_pending());
    }

    #[test]
    fn masked_irq_is_not_pending_until_unmasked() {
        let mut pic = ready_pic();
        pic.write(Chip::Master, 1, &[0x01]);
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        assert_eq!(irr(&mut pic, Chip::Master), 0x01);
        pic.write(Chip::Master, 1, &[0x00]);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE));
    }

    #[test]
    fn only_rising_edges_latch() {
        let mut pic = ready_pic();
        pic.set_irq(4, true);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 4));
        eoi(&mut pic, Chip::Master);
        pic.set_irq(4, true); // still high: no new edge
        assert!(!pic.has_pending());
        pic.set_irq(4, false);
        pic.set_irq(4, true);
        assert!(pic.has_pending());
    }

    #[test]
    fn out_of_range_and_cascade_lines_are_ignored() {
        let mut pic = ready_pic();
        pic.pulse_irq(16);
        pic.pulse_irq(255);
        pic.pulse_irq(2);
        assert!(!pic.has_pending());
    }

    #[test]
    fn lowest_irq_wins() {
        let mut pic = ready_pic();
        pic.pulse_irq(5);
        pic.pulse_irq(3);
        pic.pulse_irq(7);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 3));
        eoi(&mut pic, Chip::Master);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 5));
        eoi(&mut pic, Chip::Master);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 7));
        eoi(&mut pic, Chip::Master);
        assert!(!pic.has_pending());
    }

    #[test]
    fn in_service_blocks_lower_until_eoi() {
        let mut pic = ready_pic();
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        pic.pulse_irq(4);
        assert!(!pic.has_pending());
        assert_eq!(isr(&mut pic, Chip::Master), 0x02);
        eoi(&mut pic, Chip::Master);
        assert_eq!(isr(&mut pic, Chip::Master), 0x00);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 4));
    }

    #[test]
    fn higher_priority_preempts_and_eoi_unwinds_nesting() {
        let mut pic = ready_pic();
        pic.pulse_irq(4);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 4));
        pic.pulse_irq(1);
        assert!(pic.has_pending());
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        assert_eq!(isr(&mut pic, Chip::Master), 0x12);
        // Non-specific EOI ends the innermost (highest-priority) level.
        eoi(&mut pic, Chip::Master);
        assert_eq!(isr(&mut pic, Chip::Master), 0x10);
        eoi(&mut pic, Chip::Master);
        assert_eq!(isr(&mut pic, Chip::Master), 0x00);
    }

    #[test]
    fn same_irq_waits_for_its_own_eoi() {
        let mut pic = ready_pic();
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE));
        pic.pulse_irq(0);
        assert!(!pic.has_pending());
        eoi(&mut pic, Chip::Master);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE));
    }

    #[test]
    fn specific_eoi_clears_named_level() {
        let mut pic = ready_pic();
        pic.pulse_irq(4);
        pic.acknowledge();
        pic.pulse_irq(1);
        pic.acknowledge();
        pic.write(Chip::Master, 0, &[0x64]); // specific EOI, level 4
        assert_eq!(isr(&mut pic, Chip::Master), 0x02);
    }

    #[test]
    fn slave_irq_goes_through_cascade_and_needs_both_eois() {
        let mut pic = ready_pic();
        pic.pulse_irq(12);
        assert!(pic.has_pending());
        assert_eq!(irr(&mut pic, Chip::Master), 0x04);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 4));
        assert_eq!(isr(&mut pic, Chip::Master), 0x04);
        assert_eq!(isr(&mut pic, Chip::Slave), 0x10);

        // While IRQ2 is in service on the master, the slave is blocked
        // even for a higher-priority slave line, and so are IRQ3-7.
        pic.pulse_irq(8);
        pic.pulse_irq(5);
        assert!(!pic.has_pending());

        eoi(&mut pic, Chip::Slave);
        assert!(!pic.has_pending());
        eoi(&mut pic, Chip::Master);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE));
        eoi(&mut pic, Chip::Slave);
        eoi(&mut pic, Chip::Master);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 5));
    }

    #[test]
    fn master_irq_above_cascade_preempts_slave_service() {
        let mut pic = ready_pic();
        pic.pulse_irq(14);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 6));
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
    }

    #[test]
    fn masking_cascade_line_hides_slave() {
        let mut pic = ready_pic();
        pic.write(Chip::Master, 1, &[0x04]);
        pic.pulse_irq(10);
        assert!(!pic.has_pending());
        pic.write(Chip::Master, 1, &[0x00]);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 2));
    }

    #[test]
    fn vanished_request_gives_spurious_vector() {
        let mut pic = ready_pic();
        pic.pulse_irq(3);
        assert!(pic.has_pending());
        pic.write(Chip::Master, 1, &[0x08]);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 7));
        // A spurious IRQ7 is not put in service.
        assert_eq!(isr(&mut pic, Chip::Master), 0x00);
        // The request is still latched and comes through when unmasked.
        pic.write(Chip::Master, 1, &[0x00]);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 3));
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut pic = Pic::new();
        init_pair(&mut pic, 0x03);
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        assert_eq!(isr(&mut pic, Chip::Master), 0x00);
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        pic.pulse_irq(11);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 3));
        assert_eq!(isr(&mut pic, Chip::Slave), 0x00);
        assert_eq!(isr(&mut pic, Chip::Master), 0x00);
    }

    #[test]
    fn rotate_on_eoi_makes_serviced_irq_lowest() {
        let mut pic = ready_pic();
        pic.pulse_irq(1);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 1));
        pic.write(Chip::Master, 0, &[0xa0]); // rotate on non-specific EOI
        pic.pulse_irq(0);
        pic.pulse_irq(3);
        // IRQ1 is now lowest, so IRQ2 is highest, then 3, ..., 7, 0.
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 3));
        pic.write(Chip::Master, 0, &[0xa0]);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE));
    }

    #[test]
    fn set_priority_command() {
        let mut pic = ready_pic();
        pic.write(Chip::Master, 0, &[0xc4]); // IRQ4 lowest
        pic.pulse_irq(0);
        pic.pulse_irq(6);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 6));
    }

    #[test]
    fn special_mask_lets_lower_priority_through() {
        let mut pic = ready_pic();
        pic.pulse_irq(1);
        pic.acknowledge();
        pic.write(Chip::Master, 1, &[0x02]);
        pic.write(Chip::Master, 0, &[0x68]); // set special mask mode
        pic.pulse_irq(5);
        assert_eq!(pic.acknowledge(), Some(MASTER_BASE + 5));
        pic.write(Chip::Master, 0, &[0x48]); // reset special mask mode
        pic.pulse_irq(6);
        assert!(!pic.has_pending());
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_sticks() {
        let mut pic = ready_pic();
        pic.pulse_irq(0);
        pic.pulse_irq(6);
        assert_eq!(read_reg(&mut pic, Chip::Master, 0), 0x41); // IRR by default
        pic.acknowledge();
        assert_eq!(isr(&mut pic, Chip::Master), 0x01);
        // The selection persists and OCW3 without RR leaves it.
        pic.write(Chip::Master, 0, &[0x08]);
        assert_eq!(read_reg(&mut pic, Chip::Master, 0), 0x01);
        assert_eq!(irr(&mut pic, Chip::Master), 0x40);
        assert_eq!(read_reg(&mut pic, Chip::Master, 1), 0x00);
    }

    #[test]
    fn poll_command_acknowledges() {
        let mut pic = ready_pic();
        pic.pulse_irq(5);
        pic.write(Chip::Master, 0, &[0x0c]);
        assert_eq!(read_reg(&mut pic, Chip::Master, 0), 0x85);
        assert_eq!(isr(&mut pic, Chip::Master), 0x20);
        pic.write(Chip::Master, 0, &[0x0c]);
        assert_eq!(read_reg(&mut pic, Chip::Master, 0), 0x00);
    }

    #[test]
    fn wide_access_touches_consecutive_ports() {
        let mut pic = ready_pic();
        pic.write(Chip::Master, 1, &[0xaa]);
        let mut buf = [0u8; 3];
        pic.read(Chip::Master, 0, &mut buf);
        assert_eq!(buf, [0x00, 0xaa, 0xff]);
    }

    #[test]
    fn stray_accesses_are_harmless() {
        let mut pic = ready_pic();
        let before = pic.clone();
        pic.write(Chip::Slave, u64::MAX, &[0x11, 0x11]);
        let mut buf = [0u8; 2];
        pic.read(Chip::Master, u64::MAX, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        pic.write(Chip::Master, 0, &[]);
        assert_eq!(pic, before);
    }

    #[test]
    fn port_mapping() {
        assert_eq!(Chip::from_port(0x21), Some((Chip::Master, 1)));
        assert_eq!(Chip::from_port(0xa0), Some((Chip::Slave, 0)));
        assert_eq!(Chip::from_port(0x22), None);
    }

    #[test]
    fn state_round_trip_mid_service() {
        let mut pic = ready_pic();
        pic.pulse_irq(12);
        assert_eq!(pic.acknowledge(), Some(SLAVE_BASE + 4));
        pic.pulse_irq(1);
        pic.pulse_irq(8);
        pic.write(Chip::Slave, 0, &[0x0b]);

        let mut restored = Pic::from_state(&pic.state());
        assert_eq!(restored, pic);
        for p in [&mut pic, &mut restored] {
            assert_eq!(read_reg(p, Chip::Slave, 0), 0x10);
            assert_eq!(p.acknowledge(), Some(MASTER_BASE + 1));
            eoi(p, Chip::Master); // ends IRQ1
            eoi(p, Chip::Slave);
            eoi(p, Chip::Master); // ends IRQ2
            assert_eq!(p.acknowledge(), Some(SLAVE_BASE));
        }
        assert_eq!(restored.state(), pic.state());
    }
}
