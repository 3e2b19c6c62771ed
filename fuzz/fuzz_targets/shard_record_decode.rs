//! Fuzzes the shard record decoder: arbitrary bytes give an error or a record that encodes
//! back to the same bytes. Never a panic.
#![no_main]
use forge_store::erasure::ShardRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = ShardRecord::decode(data) {
        // Version 1 records are read but never written: only v2 must round-trip exactly.
        if data.first() == Some(&forge_store::erasure::SHARD_FORMAT_VERSION) {
            assert_eq!(record.encode(), data, "a decoded v2 record re-encodes to its bytes");
        }
    }
});
