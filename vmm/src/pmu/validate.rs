//! Start-up checks: is the counter exact, and does the skid fit the margin?
//!
//! Virtual PMUs and some CPUs miscount: KVM once counted branches aborted
//! inside transactions (the IN_TXCP problem), Xen's PMI handling adds
//! events, AMD Zen's overflow interrupt can come very late. The counter is
//! trusted only after it counted a guest loop with a known number of
//! conditional branches exactly, several times in a row.
//!
//! The VMM runs [`calibration_loop`] in the guest [`CALIBRATION_RUNS`]
//! times, reading the counter before entry and at the loop's HLT exit, and
//! hands the differences to [`check_counter`]. For the skid it arms the
//! overflow inside a long loop and hands the branches counted at each stop
//! to [`check_skid`].

use super::PmuError;

/// How many calibration runs the VMM should measure.
pub const CALIBRATION_RUNS: usize = 5;

/// Branches the calibration loop should retire per run: enough that an
/// occasional drop or overcount shows, short enough to cost nothing.
pub const CALIBRATION_BRANCHES: u32 = 100_000;

/// Accept the counter only if every run measured exactly `expected_branches`.
pub fn check_counter(expected_branches: u64, measured: &[u64]) -> Result<(), PmuError> {
    if expected_branches == 0 || measured.is_empty() {
        return Err(PmuError::Invalid(format!(
            "calibration needs a loop with branches and at least one run (expected {expected_branches}, {} runs)",
            measured.len()
        )));
    }
    if measured.iter().all(|&m| m == expected_branches) {
        return Ok(());
    }
    Err(PmuError::Inexact {
        detail: format!(
            "the guest calibration loop retires {expected_branches} conditional branches per run; \
             the counter measured {measured:?} over {} runs: {}",
            measured.len(),
            verdict(expected_branches, measured)
        ),
    })
}

/// What is wrong, in words, for a set of runs not all exact.
fn verdict(expected: u64, measured: &[u64]) -> String {
    let min = measured.iter().copied().min().unwrap_or(0);
    let max = measured.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return "it counted nothing in guest mode (no virtual PMU for the guest-only filter, \
                or the perf MSRs are not switched at VM entry)"
            .to_owned();
    }
    if min != max {
        return format!("the runs disagree (from {min} to {max}): the count is not deterministic");
    }
    if min > expected {
        format!("it overcounts by {} per run", min - expected)
    } else {
        format!("it drops {} branches per run", expected - min)
    }
}

/// Check the overflow skid. `overflow_after` is the period armed; each of
/// `stopped_after` is the branches counted from arming to the stop the
/// overflow signal caused. Returns the largest skid seen, which must be
/// smaller than `margin` (with [`super::Lander::margin_for_skid`] headroom
/// advised). A stop before the period (a counter that fires early) only costs
/// extra single steps and is not an error.
pub fn check_skid(
    overflow_after: u64,
    stopped_after: &[u64],
    margin: u64,
) -> Result<u64, PmuError> {
    if stopped_after.is_empty() {
        return Err(PmuError::Invalid(
            "skid check needs at least one overflow stop".to_owned(),
        ));
    }
    let max_skid = stopped_after
        .iter()
        .map(|&s| s.saturating_sub(overflow_after))
        .max()
        .unwrap_or(0);
    if max_skid >= margin {
        return Err(PmuError::Skid {
            detail: format!(
                "armed {overflow_after} branches, stopped after {stopped_after:?}: a skid of {max_skid} branches \
                 does not fit the landing margin of {margin}; use a margin of at least {}, \
                 or choose `--backend exits` or `--backend singlestep`",
                super::Lander::margin_for_skid(max_skid)
            ),
        });
    }
    Ok(max_skid)
}

/// Guest code (32- or 64-bit mode) that retires exactly `branches`
/// conditional branches and halts:
///
/// ```text
///     mov ecx, branches   ; B9 imm32
/// 1:  dec ecx             ; FF C9
///     jnz 1b              ; 75 FC
///     hlt                 ; F4
/// ```
///
/// Nothing else in it branches, so the count from entry to the HLT exit is
/// `branches` (the JNZ retires taken `branches - 1` times and falls through
/// once). The guest must take no interrupt while it runs.
pub fn calibration_loop(branches: u32) -> Result<Vec<u8>, PmuError> {
    if branches == 0 {
        return Err(PmuError::Invalid(
            "the calibration loop needs at least one branch".to_owned(),
        ));
    }
    let mut code = vec![0xB9];
    code.extend_from_slice(&branches.to_le_bytes());
    code.extend_from_slice(&[0xFF, 0xC9, 0x75, 0xFC, 0xF4]);
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_advises_fallback(msg: &str) {
        assert!(
            msg.contains("--backend exits") && msg.contains("--backend singlestep"),
            "{msg}"
        );
    }

    #[test]
    fn exact_counter_is_accepted() {
        check_counter(1000, &[1000; CALIBRATION_RUNS]).unwrap();
        check_counter(1, &[1]).unwrap();
    }

    #[test]
    fn overcount_is_rejected_with_numbers() {
        let msg = check_counter(1000, &[1003, 1003, 1003])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("retires 1000"), "{msg}");
        assert!(msg.contains("[1003, 1003, 1003]"), "{msg}");
        assert!(msg.contains("overcounts by 3"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn undercount_is_rejected_with_numbers() {
        let msg = check_counter(1000, &[990, 990]).unwrap_err().to_string();
        assert!(msg.contains("drops 10 branches"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn inconsistent_runs_are_rejected() {
        let msg = check_counter(1000, &[1000, 1000, 1001, 1000])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("disagree (from 1000 to 1001)"), "{msg}");
        assert!(msg.contains("not deterministic"), "{msg}");
        assert_advises_fallback(&msg);
    }

    #[test]
    fn zero_counts_point_at_guest_filtering() {
        let msg = check_counter(1000, &[0, 0]).unwrap_err().to_string();
        assert!(msg.contains("counted nothing in guest mode"), "{msg}");
    }

    #[test]
    fn empty_or_trivial_calibration_is_invalid() {
        assert!(matches!(
            check_counter(1000, &[]),
            Err(PmuError::Invalid(_))
        ));
        assert!(matches!(check_counter(0, &[0]), Err(PmuError::Invalid(_))));
    }

    #[test]
    fn skid_within_margin_returns_the_worst() {
        assert_eq!(check_skid(1000, &[1000, 1003, 1001], 10).unwrap(), 3);
        // firing early is harmless
        assert_eq!(check_skid(1000, &[995], 10).unwrap(), 0);
    }

    #[test]
    fn skid_reaching_margin_is_rejected_with_advice() {
        let msg = check_skid(1000, &[1002, 1010], 10).unwrap_err().to_string();
        assert!(msg.contains("skid of 10 branches"), "{msg}");
        assert!(msg.contains("margin of at least 36"), "{msg}");
        assert_advises_fallback(&msg);
        assert!(matches!(check_skid(1, &[], 10), Err(PmuError::Invalid(_))));
    }

    #[test]
    fn calibration_loop_bytes() {
        assert_eq!(
            calibration_loop(0x0102_0304).unwrap(),
            vec![0xB9, 0x04, 0x03, 0x02, 0x01, 0xFF, 0xC9, 0x75, 0xFC, 0xF4]
        );
        // jnz rel8 lands on `dec`: next-ip (9) + (-4) = 5.
        let code = calibration_loop(7).unwrap();
        assert_eq!(9 + i64::from(code[8] as i8), 5);
        assert!(calibration_loop(0).is_err());
    }
}
