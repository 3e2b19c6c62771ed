//! Fuzzes the volume protocol's decoders (bytes from any peer): a sync offer (the history,
//! authors' keys and envelopes a sender claims) and the framed volume messages. Arbitrary
//! bytes give an error or a value that encodes back to exactly them; never a panic.
#![no_main]
use forge_mesh::sync::{Offer, VolumeMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(offer) = Offer::decode(data) {
        assert_eq!(offer.encode(), data, "a decoded offer re-encodes to its bytes");
    }
    if let Ok(message) = VolumeMessage::decode(data) {
        assert_eq!(message.encode(), data, "a decoded message re-encodes to its bytes");
    }
});
