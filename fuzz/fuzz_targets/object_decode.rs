//! Fuzzes the object decoders: the plaintext codec (`Object::decode`, `SnapshotCommit::decode`)
//! and opening a sealed object under a fixed volume key. Decoded objects re-encode and
//! decode to themselves. Never a panic.
#![no_main]
use forge_crypto::{Cid, VolumeKey};
use forge_store::object::{Object, SnapshotCommit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(object) = Object::decode(data) {
        let again = Object::decode(&object.encode()).expect("own encoding decodes");
        assert_eq!(again.encode(), object.encode());
    }
    if let Ok(commit) = SnapshotCommit::decode(data) {
        assert_eq!(SnapshotCommit::decode(&commit.encode()).expect("own encoding decodes"), commit);
    }
    let key = VolumeKey::from_bytes([7; 32]);
    let _ = Object::open(&key, &Cid::of(data), data);
});
