//! Criterion benchmarks of forge-crypto's primitives: BLAKE3 ids, sealing and opening a
//! 64 KiB chunk, ML-DSA-65 signing and verification, hybrid key-envelope wrap and unwrap.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests and benches fail loudly by design.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forge_crypto::seal::{self, Compression};
use forge_crypto::{
    Cid, DomainKey, EnvelopeContents, NodeIdentity, NodeSecrets, SignatureDomain, VolumeKey,
    envelope,
};

const CHUNK_BYTES: usize = 64 * 1024;

fn incompressible_chunk() -> Vec<u8> {
    let mut bytes = vec![0u8; CHUNK_BYTES];
    blake3::Hasher::new()
        .update(b"bench")
        .finalize_xof()
        .fill(&mut bytes);
    bytes
}

fn hashing(criterion: &mut Criterion) {
    let chunk = incompressible_chunk();
    let domain = DomainKey::from_bytes([1; 32]);
    let mut group = criterion.benchmark_group("blake3_64KiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    group.bench_function("cid", |bench| bench.iter(|| Cid::of(&chunk)));
    group.bench_function("keyed_plaintext_hash", |bench| {
        bench.iter(|| domain.plaintext_hash(&chunk))
    });
    group.finish();
}

fn sealing(criterion: &mut Criterion) {
    let random = incompressible_chunk();
    let text: Vec<u8> = b"def handler(request):\n    return respond(request)\n"
        .iter()
        .copied()
        .cycle()
        .take(CHUNK_BYTES)
        .collect();
    let key = [7u8; 32];
    let mut group = criterion.benchmark_group("seal_64KiB");
    group.throughput(Throughput::Bytes(CHUNK_BYTES as u64));
    group.bench_function("seal_incompressible", |bench| {
        bench.iter(|| seal::seal(&key, &random, b"chunk", Compression::WhenSmaller))
    });
    group.bench_function("seal_text_zstd", |bench| {
        bench.iter(|| seal::seal(&key, &text, b"chunk", Compression::WhenSmaller))
    });
    let sealed_random = seal::seal(&key, &random, b"chunk", Compression::WhenSmaller);
    let sealed_text = seal::seal(&key, &text, b"chunk", Compression::WhenSmaller);
    group.bench_function("open_incompressible", |bench| {
        bench.iter(|| seal::open(&key, &sealed_random, b"chunk", CHUNK_BYTES))
    });
    group.bench_function("open_text_zstd", |bench| {
        bench.iter(|| seal::open(&key, &sealed_text, b"chunk", CHUNK_BYTES))
    });
    group.finish();
}

fn post_quantum(criterion: &mut Criterion) {
    let node = NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([3; 128]));
    let message = [0x5a_u8; 256];
    let signature = node.sign(SignatureDomain::Receipt, &message).expect("sign");
    let contents = EnvelopeContents::Writer {
        volume_key: VolumeKey::from_bytes([1; 32]),
        domain_key: DomainKey::from_bytes([2; 32]),
    };
    let wrapped = envelope::wrap(node.public_keys(), &contents, b"volume").expect("wrap");

    let mut group = criterion.benchmark_group("post_quantum");
    group.bench_function("ml_dsa_65_sign_256B", |bench| {
        bench.iter(|| node.sign(SignatureDomain::Receipt, &message))
    });
    group.bench_function("ml_dsa_65_verify_256B", |bench| {
        bench.iter(|| {
            node.public_keys()
                .verify(SignatureDomain::Receipt, &message, &signature)
        });
    });
    group.bench_function("envelope_wrap_mlkem768_x25519", |bench| {
        bench.iter(|| envelope::wrap(node.public_keys(), &contents, b"volume"))
    });
    group.bench_function("envelope_unwrap_mlkem768_x25519", |bench| {
        bench.iter(|| envelope::unwrap(&node, &wrapped, b"volume"))
    });
    group.bench_function("identity_from_seeds", |bench| {
        bench.iter(|| NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([3; 128])))
    });
    group.finish();
}

criterion_group!(benches, hashing, sealing, post_quantum);
criterion_main!(benches);
