//! A simulated CPU and branch counter, and a driver that executes
//! [`Lander::plan`] the way the VMM's run loop does. Test-only.
//!
//! The instruction set is tiny but has what matters: plain instructions,
//! conditional branches (taken or not), counted loops that revisit the same
//! RIP, REP iterations that keep RIP and the count and change RCX, and
//! unconditional jumps that the counter does not count.

use super::{Action, BranchCounter, Lander, Landing, PmuError, Position};

/// A seeded xorshift64* generator: reproducible without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..=max`.
    pub fn upto(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            self.next()
        } else {
            self.next() % (max + 1)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Nop,
    SetRcx(u64),
    SetRbx(u64),
    /// One REP string iteration per step while RCX != 0.
    Rep,
    /// Conditional branch with a fixed outcome.
    Jcc {
        to: usize,
        taken: bool,
    },
    /// `dec rbx; jnz to`, one conditional branch.
    DecJnz {
        to: usize,
    },
    /// Unconditional: not counted.
    Jmp {
        to: usize,
    },
    Halt,
}

#[derive(Debug, Clone)]
pub struct Program(pub Vec<Op>);

impl Program {
    fn rip(&self, pc: usize) -> u64 {
        0x1000 + 3 * pc as u64
    }

    /// A random terminating program of `blocks` blocks.
    pub fn random(rng: &mut Rng, blocks: usize) -> Self {
        let mut ops = vec![];
        for _ in 0..blocks {
            match rng.upto(4) {
                0 => nops(&mut ops, 1 + rng.upto(3)),
                1 => rep(&mut ops, rng),
                2 => counted_loop(&mut ops, rng),
                3 => forward_jcc(&mut ops, rng),
                _ => forward_jmp(&mut ops),
            }
        }
        ops.push(Op::Halt);
        Program(ops)
    }

    /// `mov rbx, n; 1: dec rbx; jnz 1b; hlt`: n conditional branches.
    pub fn calibration(n: u64) -> Self {
        Program(vec![Op::SetRbx(n), Op::DecJnz { to: 1 }, Op::Halt])
    }
}

fn nops(ops: &mut Vec<Op>, n: u64) {
    ops.extend((0..n).map(|_| Op::Nop));
}

fn rep(ops: &mut Vec<Op>, rng: &mut Rng) {
    ops.push(Op::SetRcx(rng.upto(6)));
    ops.push(Op::Rep);
}

fn forward_jcc(ops: &mut Vec<Op>, rng: &mut Rng) {
    let at = ops.len();
    ops.push(Op::Nop);
    nops(ops, 1 + rng.upto(2));
    ops[at] = Op::Jcc {
        to: ops.len(),
        taken: rng.upto(1) == 1,
    };
}

fn forward_jmp(ops: &mut Vec<Op>) {
    let at = ops.len();
    ops.push(Op::Nop);
    ops.push(Op::Nop);
    ops[at] = Op::Jmp { to: ops.len() };
}

fn counted_loop(ops: &mut Vec<Op>, rng: &mut Rng) {
    ops.push(Op::SetRbx(1 + rng.upto(4)));
    let top = ops.len();
    nops(ops, rng.upto(2));
    if rng.upto(1) == 1 {
        rep(ops, rng);
    }
    if rng.upto(1) == 1 {
        forward_jcc(ops, rng);
    }
    ops.push(Op::DecJnz { to: top });
}

/// The CPU: program counter and the two registers the program uses.
#[derive(Debug, Clone)]
pub struct SimCpu {
    prog: Program,
    pc: usize,
    rcx: u64,
    rbx: u64,
    /// Steps executed: the index into the reference trace.
    pub steps: usize,
}

impl SimCpu {
    pub fn new(prog: Program) -> Self {
        SimCpu {
            prog,
            pc: 0,
            rcx: 0,
            rbx: 0,
            steps: 0,
        }
    }

    fn op(&self) -> Op {
        self.prog.0.get(self.pc).copied().unwrap_or(Op::Halt)
    }

    pub fn halted(&self) -> bool {
        self.op() == Op::Halt
    }

    pub fn rip(&self) -> u64 {
        self.prog.rip(self.pc)
    }

    pub fn rcx(&self) -> u64 {
        self.rcx
    }

    /// Whether the next instruction retires a conditional branch.
    fn next_is_branch(&self) -> bool {
        matches!(self.op(), Op::Jcc { .. } | Op::DecJnz { .. })
    }

    /// Execute one instruction (one REP iteration); true if it retired a
    /// conditional branch.
    pub fn step(&mut self) -> bool {
        let (next, branch) = match self.op() {
            Op::Halt => return false,
            Op::Nop => (self.pc + 1, false),
            Op::SetRcx(v) => {
                self.rcx = v;
                (self.pc + 1, false)
            }
            Op::SetRbx(v) => {
                self.rbx = v;
                (self.pc + 1, false)
            }
            Op::Rep => (self.rep_iteration(), false),
            Op::Jcc { to, taken } => (if taken { to } else { self.pc + 1 }, true),
            Op::DecJnz { to } => {
                self.rbx = self.rbx.wrapping_sub(1);
                (if self.rbx != 0 { to } else { self.pc + 1 }, true)
            }
            Op::Jmp { to } => (to, false),
        };
        self.pc = next;
        self.steps += 1;
        branch
    }

    fn rep_iteration(&mut self) -> usize {
        if self.rcx == 0 {
            return self.pc + 1;
        }
        self.rcx -= 1;
        if self.rcx == 0 {
            self.pc + 1
        } else {
            self.pc
        }
    }
}

/// How the simulated counter misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Exact,
    /// One extra event every `n` branches.
    Overcount(u64),
    /// One lost event every `n` branches.
    Drop(u64),
}

/// How late the overflow stop comes, in branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skid {
    /// Uniform in `0..=max`.
    Random(u64),
    /// Always exactly this many.
    Fixed(u64),
}

/// A counter with an overflow that the machine checks as it runs.
#[derive(Debug)]
pub struct SimCounter {
    true_count: u64,
    observed: u64,
    fault: Fault,
    armed_at: Option<u64>,
}

impl SimCounter {
    pub fn new(fault: Fault) -> Self {
        SimCounter {
            true_count: 0,
            observed: 0,
            fault,
            armed_at: None,
        }
    }

    fn on_branch(&mut self) {
        self.true_count += 1;
        let hit = |n: u64| n > 0 && self.true_count % n == 0;
        self.observed += match self.fault {
            Fault::Exact => 1,
            Fault::Overcount(n) => 1 + u64::from(hit(n)),
            Fault::Drop(n) => u64::from(!hit(n)),
        };
    }

    /// True once, when the armed overflow is reached (then it disarms, like
    /// a REFRESH(1) counter).
    fn take_overflow(&mut self) -> bool {
        match self.armed_at {
            Some(at) if self.observed >= at => {
                self.armed_at = None;
                true
            }
            _ => false,
        }
    }
}

impl BranchCounter for SimCounter {
    fn read(&mut self) -> Result<u64, PmuError> {
        Ok(self.observed)
    }

    fn arm_overflow(&mut self, after: u64) -> Result<(), PmuError> {
        if after == 0 {
            return Err(PmuError::Invalid("period 0".to_owned()));
        }
        self.armed_at = Some(self.observed + after);
        Ok(())
    }

    fn disarm(&mut self) -> Result<(), PmuError> {
        self.armed_at = None;
        Ok(())
    }
}

/// Why a simulated KVM_RUN returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The overflow signal (after the skid).
    Overflow,
    /// One single step done.
    Stepped,
    /// The hardware breakpoint hit.
    Breakpoint,
    /// An unrelated exit (I/O, a kick).
    Other,
    Halted,
}

/// CPU + counter + skid: what the VMM sees of a vCPU.
pub struct SimMachine {
    pub cpu: SimCpu,
    pub counter: SimCounter,
    pub skid: Skid,
    /// Chance per instruction, in 1/10000, of an unrelated exit.
    pub other_exit_rate: u64,
    pub rng: Rng,
}

impl SimMachine {
    pub fn new(prog: Program, fault: Fault, skid: Skid, seed: u64) -> Self {
        SimMachine {
            cpu: SimCpu::new(prog),
            counter: SimCounter::new(fault),
            skid,
            other_exit_rate: 0,
            rng: Rng::new(seed),
        }
    }

    pub fn position(&mut self) -> Result<Position, PmuError> {
        Ok(Position {
            count: self.counter.read()?,
            rip: self.cpu.rip(),
            rcx: self.cpu.rcx(),
        })
    }

    fn exec(&mut self) {
        if self.cpu.step() {
            self.counter.on_branch();
        }
    }

    /// KVM_RUN without single-stepping.
    pub fn run(&mut self) -> Stop {
        loop {
            if self.cpu.halted() {
                return Stop::Halted;
            }
            self.exec();
            if self.counter.take_overflow() {
                return self.skid_then_stop();
            }
            if self.rng.upto(9999) < self.other_exit_rate {
                return Stop::Other;
            }
        }
    }

    /// The interrupt lands `k` branches late, plus a few straight-line
    /// instructions (never crossing one more branch).
    fn skid_then_stop(&mut self) -> Stop {
        let k = match self.skid {
            Skid::Random(max) => self.rng.upto(max),
            Skid::Fixed(k) => k,
        };
        let mut late = 0;
        while late < k && !self.cpu.halted() {
            if self.cpu.next_is_branch() {
                late += 1;
            }
            self.exec();
        }
        for _ in 0..self.rng.upto(3) {
            if self.cpu.halted() || self.cpu.next_is_branch() {
                break;
            }
            self.exec();
        }
        Stop::Overflow
    }

    /// KVM_RUN with a hardware instruction breakpoint at `rip`: it stops
    /// before executing `rip`, never on the instruction it starts from.
    pub fn run_to_breakpoint(&mut self, rip: u64) -> Stop {
        loop {
            if self.cpu.halted() {
                return Stop::Halted;
            }
            self.exec();
            if self.cpu.rip() == rip {
                return Stop::Breakpoint;
            }
            if self.rng.upto(9999) < self.other_exit_rate {
                return Stop::Other;
            }
        }
    }

    /// KVM_RUN with KVM_GUESTDBG_SINGLESTEP.
    pub fn single_step(&mut self) -> Stop {
        if self.cpu.halted() {
            return Stop::Halted;
        }
        self.exec();
        Stop::Stepped
    }
}

/// The VMM's landing loop, on the simulated machine.
pub fn land(m: &mut SimMachine, lander: &Lander, target: Position) -> Result<Position, PmuError> {
    let mut landing = Landing::new(*lander, target);
    loop {
        let now = m.position()?;
        let stop = match landing.next(now)? {
            Action::Arrived => return Ok(now),
            Action::Step => {
                m.counter.disarm()?;
                m.single_step()
            }
            Action::RunToBreakpoint { rip } => {
                m.counter.disarm()?;
                m.run_to_breakpoint(rip)
            }
            Action::ArmAndRun { overflow_after } => {
                m.counter.arm_overflow(overflow_after)?;
                m.run()
            }
            Action::RunFree | Action::Overshot { .. } => {
                m.counter.disarm()?;
                m.run()
            }
        };
        if stop == Stop::Halted {
            return Err(PmuError::Invalid(format!(
                "guest halted before reaching {target:?}"
            )));
        }
    }
}

/// Every position the program passes through, from a reference run with an
/// exact counter: `trace[i]` is the position before step `i`.
pub fn trace(prog: &Program) -> Vec<Position> {
    let mut m = SimMachine::new(prog.clone(), Fault::Exact, Skid::Fixed(0), 0);
    let mut out = vec![];
    loop {
        out.push(Position {
            count: m.counter.observed,
            rip: m.cpu.rip(),
            rcx: m.cpu.rcx(),
        });
        if m.single_step() == Stop::Halted {
            out.pop();
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    struct Case {
        prog: Program,
        trace: Vec<Position>,
    }

    fn case(seed: u64, blocks: usize) -> Case {
        let prog = Program::random(&mut Rng::new(seed), blocks);
        let trace = trace(&prog);
        Case { prog, trace }
    }

    /// Land on trace index `idx`; Ok(true) if the landing is exactly right.
    /// Odd seeds use breakpoints for the last stretch, even seeds stepping.
    fn land_on(c: &Case, idx: usize, margin: u64, skid: Skid, seed: u64) -> Result<bool, PmuError> {
        let mut m = SimMachine::new(c.prog.clone(), Fault::Exact, skid, seed);
        m.other_exit_rate = 20;
        let lander = Lander::new(margin)?.with_breakpoints(seed % 2 == 1);
        let got = land(&mut m, &lander, c.trace[idx])?;
        Ok(got == c.trace[idx] && m.cpu.steps == idx)
    }

    #[test]
    fn positions_are_unique_in_every_trace() {
        for seed in 0..200 {
            let c = case(seed, 60);
            let set: HashSet<_> = c.trace.iter().collect();
            assert_eq!(set.len(), c.trace.len(), "seed {seed}");
        }
    }

    #[test]
    fn lands_exactly_on_random_targets() {
        let mut rng = Rng::new(7);
        let mut landings = 0;
        for seed in 0..300 {
            let c = case(seed, 80);
            let margin = 1 + rng.upto(20);
            for _ in 0..20 {
                let idx = rng.upto(c.trace.len() as u64 - 1) as usize;
                let skid = Skid::Random(rng.upto(margin - 1));
                let ok = land_on(&c, idx, margin, skid, rng.next()).unwrap();
                assert!(ok, "seed {seed} idx {idx} margin {margin} {skid:?}");
                landings += 1;
            }
        }
        assert_eq!(landings, 6000);
    }

    /// Targets picked by the property of the position before them.
    fn targets_where(c: &Case, pred: impl Fn(&Position, &Position) -> bool) -> Vec<usize> {
        (1..c.trace.len())
            .filter(|&i| pred(&c.trace[i - 1], &c.trace[i]))
            .collect()
    }

    fn land_all(pick: impl Fn(&Case) -> Vec<usize>) -> usize {
        let mut rng = Rng::new(11);
        let mut n = 0;
        for seed in 0..100 {
            let c = case(seed, 60);
            for idx in pick(&c) {
                let margin = 1 + rng.upto(8);
                let skid = Skid::Random(margin - 1);
                assert!(
                    land_on(&c, idx, margin, skid, rng.next()).unwrap(),
                    "seed {seed} idx {idx}"
                );
                n += 1;
            }
        }
        n
    }

    #[test]
    fn lands_inside_loops_on_repeated_rips() {
        let n = land_all(|c| {
            (0..c.trace.len())
                .filter(|&i| c.trace[..i].iter().any(|p| p.rip == c.trace[i].rip))
                .collect()
        });
        assert!(n > 500, "only {n} loop targets");
    }

    #[test]
    fn lands_inside_rep_sequences() {
        let n = land_all(|c| {
            targets_where(c, |a, b| {
                a.rip == b.rip && a.count == b.count && a.rcx != b.rcx
            })
        });
        assert!(n > 200, "only {n} REP targets");
    }

    #[test]
    fn lands_right_after_a_branch() {
        let n = land_all(|c| targets_where(c, |a, b| b.count == a.count + 1));
        assert!(n > 500, "only {n} post-branch targets");
    }

    #[test]
    fn lands_at_the_very_first_instruction() {
        let c = case(3, 40);
        let mut m = SimMachine::new(c.prog.clone(), Fault::Exact, Skid::Fixed(0), 1);
        let got = land(&mut m, &Lander::new(5).unwrap(), c.trace[0]).unwrap();
        assert_eq!(got, c.trace[0]);
        assert_eq!(
            m.cpu.steps, 0,
            "no instruction may run before the first point"
        );
    }

    #[test]
    fn lands_at_the_last_instruction_before_halt() {
        let c = case(5, 40);
        let last = c.trace.len() - 1;
        assert!(land_on(&c, last, 4, Skid::Random(3), 9).unwrap());
    }

    #[test]
    fn worst_case_skid_of_margin_minus_one_always_lands() {
        let mut rng = Rng::new(3);
        for seed in 0..200 {
            let c = case(seed, 80);
            let margin = 1 + rng.upto(30);
            for _ in 0..10 {
                let idx = rng.upto(c.trace.len() as u64 - 1) as usize;
                assert!(land_on(&c, idx, margin, Skid::Fixed(margin - 1), rng.next()).unwrap());
            }
        }
    }

    #[test]
    fn skid_at_or_beyond_margin_is_overshoot_never_a_wrong_landing() {
        let mut rng = Rng::new(5);
        let (mut overshoots, mut lucky) = (0, 0);
        for seed in 0..200 {
            let c = case(seed, 80);
            let margin = 1 + rng.upto(10);
            for _ in 0..10 {
                let idx = rng.upto(c.trace.len() as u64 - 1) as usize;
                let skid = Skid::Fixed(margin + rng.upto(10));
                match land_on(&c, idx, margin, skid, rng.next()) {
                    Ok(right) => {
                        assert!(right, "wrong landing: seed {seed} idx {idx}");
                        lucky += 1;
                    }
                    Err(e @ PmuError::Overshoot { .. }) => {
                        let msg = e.to_string();
                        assert!(
                            msg.contains("overshot") && msg.contains("target count"),
                            "{msg}"
                        );
                        overshoots += 1;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
        assert!(
            overshoots > 500,
            "{overshoots} overshoots, {lucky} landings"
        );
    }

    #[test]
    fn breakpoints_cut_the_exits_of_a_long_approach() {
        // 2000 straight-line instructions between the last two branches.
        let mut ops = vec![Op::Jcc {
            to: 1,
            taken: false,
        }];
        ops.extend(std::iter::repeat_n(Op::Nop, 2000));
        ops.push(Op::Halt);
        let prog = Program(ops);
        let tr = trace(&prog);
        let exits = |breakpoints: bool| {
            let mut m = SimMachine::new(prog.clone(), Fault::Exact, Skid::Fixed(0), 1);
            let lander = Lander::new(4).unwrap().with_breakpoints(breakpoints);
            let mut landing = Landing::new(lander, tr[1990]);
            let mut exits = 0;
            loop {
                match landing.next(m.position().unwrap()).unwrap() {
                    Action::Arrived => break,
                    Action::Step => m.single_step(),
                    Action::RunToBreakpoint { rip } => m.run_to_breakpoint(rip),
                    other => panic!("unexpected {other:?}"),
                };
                exits += 1;
            }
            assert_eq!(m.cpu.steps, 1990);
            exits
        };
        assert_eq!(exits(false), 1990);
        assert_eq!(exits(true), 1);
    }

    #[test]
    fn overshoot_error_names_both_points() {
        // Branch every other instruction, so a skid of 3 branches past a
        // margin of 1 must pass the target.
        let prog = Program(vec![
            Op::SetRbx(50),
            Op::Nop,
            Op::DecJnz { to: 1 },
            Op::Halt,
        ]);
        let tr = trace(&prog);
        let target = tr[60];
        let mut m = SimMachine::new(prog, Fault::Exact, Skid::Fixed(3), 1);
        let err = land(&mut m, &Lander::new(1).unwrap(), target).unwrap_err();
        let PmuError::Overshoot { now, target: t } = err else {
            panic!("expected overshoot, got {err}");
        };
        assert_eq!(t, target);
        assert!(now.count > target.count);
    }

    #[test]
    fn long_distances_rearm_in_chunks() {
        let prog = Program::calibration(100_000);
        let tr = trace(&prog);
        let idx = tr.len() - 3;
        let mut m = SimMachine::new(prog, Fault::Exact, Skid::Random(5), 2);
        let lander = Lander::new(8).unwrap().with_max_arm(1000);
        assert_eq!(land(&mut m, &lander, tr[idx]).unwrap(), tr[idx]);
        assert_eq!(m.cpu.steps, idx);
    }

    /// The start-up check on the simulated counter: run the calibration
    /// loop several times and hand the deltas to `check_counter`.
    fn calibrate(fault: Fault, branches: u64, runs: usize) -> Result<(), PmuError> {
        let mut counter = SimCounter::new(fault);
        let mut measured = vec![];
        for _ in 0..runs {
            let mut cpu = SimCpu::new(Program::calibration(branches));
            let before = counter.read()?;
            while !cpu.halted() {
                if cpu.step() {
                    counter.on_branch();
                }
            }
            measured.push(counter.read()? - before);
        }
        super::super::check_counter(branches, &measured)
    }

    #[test]
    fn calibration_accepts_the_exact_counter() {
        calibrate(Fault::Exact, 10_000, 5).unwrap();
    }

    #[test]
    fn calibration_rejects_an_overcounting_counter() {
        let msg = calibrate(Fault::Overcount(1000), 10_000, 5)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("overcounts by 10"), "{msg}");
        assert!(msg.contains("--backend exits"), "{msg}");
    }

    #[test]
    fn calibration_rejects_a_dropping_counter() {
        let msg = calibrate(Fault::Drop(3000), 10_000, 5)
            .unwrap_err()
            .to_string();
        // 10_000 branches per run, one drop per 3000 overall: 3 or 4 per run.
        assert!(msg.contains("not exact"), "{msg}");
        assert!(msg.contains("--backend singlestep"), "{msg}");
    }

    #[test]
    fn a_miscounting_counter_can_land_wrong_which_is_why_it_is_checked() {
        // Recorded with an exact counter, replayed with a dropping one: the
        // numbers match somewhere else. The landing cannot tell; the
        // calibration must.
        let prog = Program(vec![
            Op::SetRbx(200),
            Op::Nop,
            Op::DecJnz { to: 1 },
            Op::Halt,
        ]);
        let tr = trace(&prog);
        let target = tr[300];
        let mut m = SimMachine::new(prog, Fault::Drop(7), Skid::Fixed(0), 1);
        let got = land(&mut m, &Lander::new(4).unwrap(), target).unwrap();
        assert_eq!(got, target);
        assert_ne!(m.cpu.steps, 300);
        assert!(calibrate(Fault::Drop(7), 200, 3).is_err());
    }
}
