//! Fuzzes the passphrase-protected format. Parameters are forced to the minimum when the
//! header parses, so the fuzzer explores the decoder, not Argon2's cost.
#![no_main]
use forge_crypto::passphrase;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(params) = passphrase::read_params(data) else { return };
    if params.memory_kib <= 64 && params.iterations <= 2 && params.parallelism <= 2 {
        let _ = passphrase::unprotect(b"fuzz", data);
    }
});
