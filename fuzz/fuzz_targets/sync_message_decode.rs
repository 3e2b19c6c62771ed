//! Fuzzes the sync protocol's message decoder (bytes from any peer): arbitrary bytes give
//! an error or a message that encodes back to exactly them. Never a panic, and no
//! allocation beyond what the input can justify.
#![no_main]
use forge_mesh::sync::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.encode(), data, "a decoded message re-encodes to its bytes");
    }
});
