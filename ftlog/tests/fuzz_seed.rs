//! The fuzzer's seed is a valid log of the current format, so fuzzing
//! starts from deep inside the decoder. `FTLOG_BLESS=1` rewrites it.

// Test and bench code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

mod common;

#[test]
fn fuzz_seed_is_a_current_log() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/decode/small.log");
    let (_, bytes) = common::small_log();
    if std::env::var_os("FTLOG_BLESS").is_some() {
        std::fs::write(path, &bytes).unwrap();
    }
    let seed = std::fs::read(path).unwrap();
    assert!(
        seed == bytes,
        "{path} is stale: rerun this test with FTLOG_BLESS=1"
    );
}
