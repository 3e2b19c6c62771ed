//! End-to-end tests of the real `forge` binary: init, node id, global flags, exit codes and
//! error output, on fresh temporary data directories.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Tests and benches fail loudly by design.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use assert_cmd::Command;
use serde_json::Value;

fn forge(data_dir: &Path) -> Command {
    let mut command = Command::cargo_bin("forge").expect("forge binary is built");
    command
        .env_remove("FORGE_DATA_DIR")
        .env_remove("FORGE_PASSPHRASE")
        .env_remove("RUST_LOG");
    command.arg("--data-dir").arg(data_dir);
    command
}

fn stdout_json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "stdout is not JSON ({error}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn is_node_id(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_then_node_id_as_a_new_user_would() {
    let temp = tempfile::tempdir().unwrap();
    let vault = temp.path().join("vault");
    let init = forge(&vault).arg("init").output().unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let init_text = String::from_utf8(init.stdout).unwrap();

    let id = forge(&vault).args(["node", "id"]).output().unwrap();
    assert!(id.status.success());
    let node_id = String::from_utf8(id.stdout).unwrap().trim().to_owned();
    assert!(is_node_id(&node_id), "{node_id:?}");
    assert!(init_text.contains(&node_id), "init printed {init_text:?}");

    // Secrets are private, the directories too; the format marker is there.
    assert_eq!(mode(&vault.join("node/secret.key")), 0o600);
    assert_eq!(mode(&vault.join("node")), 0o700);
    assert_eq!(mode(&vault), 0o700);
    assert_eq!(
        fs::read_to_string(vault.join("FORMAT")).unwrap(),
        "forge-vault-data-dir 1\n"
    );
}

#[test]
fn node_id_json_carries_the_public_keys_and_matches_blake3_of_ml_dsa_key() {
    let temp = tempfile::tempdir().unwrap();
    forge(temp.path()).arg("init").assert().success();
    // --json accepted after the subcommand, and before it.
    let after = stdout_json(
        &forge(temp.path())
            .args(["node", "id", "--json"])
            .output()
            .unwrap(),
    );
    let mut before_command = Command::cargo_bin("forge").unwrap();
    let before = stdout_json(
        &before_command
            .env_remove("FORGE_DATA_DIR")
            .arg("--json")
            .arg("--data-dir")
            .arg(temp.path())
            .args(["node", "id"])
            .output()
            .unwrap(),
    );
    assert_eq!(after, before);
    let node_id = after["node_id"].as_str().unwrap();
    let ml_dsa = data_encoding::HEXLOWER
        .decode(after["ml_dsa_65_public_key"].as_str().unwrap().as_bytes())
        .unwrap();
    assert_eq!(ml_dsa.len(), 1952);
    assert_eq!(blake3::hash(&ml_dsa).to_hex().as_str(), node_id);
    assert_eq!(
        after["ml_kem_768_public_key"].as_str().unwrap().len(),
        2 * 1184
    );
    assert_eq!(after["x25519_public_key"].as_str().unwrap().len(), 64);
    assert_eq!(after["passphrase_protected"], false);
}

#[test]
fn init_on_an_existing_vault_changes_nothing_and_fails() {
    let temp = tempfile::tempdir().unwrap();
    forge(temp.path()).arg("init").assert().success();
    let secret_before = fs::read(temp.path().join("node/secret.key")).unwrap();
    let public_before = fs::read(temp.path().join("node/public.key")).unwrap();

    let again = forge(temp.path()).arg("init").output().unwrap();
    assert_eq!(again.status.code(), Some(4), "conflict exit code");
    let stderr = String::from_utf8(again.stderr).unwrap();
    assert!(stderr.contains("already holds a Forge vault"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(again.stdout.is_empty());
    assert_eq!(
        fs::read(temp.path().join("node/secret.key")).unwrap(),
        secret_before
    );
    assert_eq!(
        fs::read(temp.path().join("node/public.key")).unwrap(),
        public_before
    );
}

#[test]
fn errors_are_one_line_and_json_under_json() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("nothing-here");
    let plain = forge(&missing).args(["node", "id"]).output().unwrap();
    assert_eq!(plain.status.code(), Some(1));
    let stderr = String::from_utf8(plain.stderr).unwrap();
    assert!(
        stderr.contains("forge init"),
        "tells the user what to do: {stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1);

    let json = forge(&missing)
        .args(["node", "id", "--json"])
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(1));
    assert!(json.stdout.is_empty());
    let error: Value = serde_json::from_slice(&json.stderr).unwrap();
    assert_eq!(error["exit_code"], 1);
    assert!(error["error"].as_str().unwrap().contains("no Forge vault"));
}

#[test]
fn usage_errors_exit_2() {
    let temp = tempfile::tempdir().unwrap();
    let output = forge(temp.path()).arg("frobnicate").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = forge(temp.path())
        .args(["node", "id", "--bogus", "--json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let error: Value = serde_json::from_slice(&output.stderr).unwrap();
    assert_eq!(error["exit_code"], 2);
    forge(temp.path()).arg("--help").assert().success();
    let version = forge(temp.path())
        .args(["version", "--json"])
        .output()
        .unwrap();
    assert!(version.status.success());
    assert_eq!(stdout_json(&version)["data_format_version"], 1);
}

#[test]
fn data_dir_comes_from_the_environment_when_no_flag_is_given() {
    let temp = tempfile::tempdir().unwrap();
    let vault = temp.path().join("from-env");
    let mut command = Command::cargo_bin("forge").unwrap();
    command
        .env("FORGE_DATA_DIR", &vault)
        .arg("init")
        .assert()
        .success();
    assert!(vault.join("FORMAT").exists());
    // HOME is the last resort: ~/.local/share/forge.
    let home = temp.path().join("home");
    let mut command = Command::cargo_bin("forge").unwrap();
    command
        .env_remove("FORGE_DATA_DIR")
        .env("HOME", &home)
        .arg("init")
        .assert()
        .success();
    assert!(home.join(".local/share/forge/FORMAT").exists());
}

#[test]
fn refuses_to_write_into_a_foreign_directory_or_a_newer_format() {
    let temp = tempfile::tempdir().unwrap();
    fs::write(temp.path().join("precious.txt"), b"user data").unwrap();
    let output = forge(temp.path()).arg("init").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a Forge vault"));
    assert_eq!(
        fs::read_dir(temp.path()).unwrap().count(),
        1,
        "nothing was written"
    );

    let vault = tempfile::tempdir().unwrap();
    forge(vault.path()).arg("init").assert().success();
    fs::write(vault.path().join("FORMAT"), "forge-vault-data-dir 9\n").unwrap();
    let output = forge(vault.path()).args(["node", "id"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("format version 1"));
}

#[test]
fn a_corrupted_public_key_is_an_integrity_failure() {
    let temp = tempfile::tempdir().unwrap();
    forge(temp.path()).arg("init").assert().success();
    let path = temp.path().join("node/public.key");
    let mut bytes = fs::read(&path).unwrap();
    bytes.truncate(100);
    fs::write(&path, bytes).unwrap();
    let output = forge(temp.path()).args(["node", "id"]).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("corrupt"));
}

#[test]
fn passphrase_protected_secrets_open_only_with_the_passphrase() {
    use forge_node::NodeError;
    use forge_node::datadir::{DataDir, SecretProtection};
    use zeroize::Zeroizing;

    let temp = tempfile::tempdir().unwrap();
    let protection = SecretProtection::Passphrase {
        passphrase: Zeroizing::new("hunter2 but longer".into()),
        params: forge_crypto::KdfParams::MINIMUM_FOR_TESTS,
    };
    let data_dir = DataDir::new(temp.path());
    let report = data_dir.init(&protection).unwrap();
    assert!(report.passphrase_protected);
    assert!(!temp.path().join("node/secret.key").exists());
    assert_eq!(mode(&temp.path().join("node/secret.key.protected")), 0o600);

    let identity = data_dir
        .load_identity(|| Ok(Zeroizing::new("hunter2 but longer".into())))
        .unwrap();
    assert_eq!(identity.node_id(), report.public_keys.node_id());
    let wrong = data_dir
        .load_identity(|| Ok(Zeroizing::new("hunter3".into())))
        .unwrap_err();
    assert!(
        matches!(
            wrong,
            NodeError::Crypto(forge_crypto::CryptoError::WrongPassphrase)
        ),
        "{wrong:?}"
    );

    // The CLI path: the passphrase comes from FORGE_PASSPHRASE; node id needs none.
    let cli_vault = temp.path().join("cli");
    let init = forge(&cli_vault)
        .args(["init", "--passphrase", "--json"])
        .env("FORGE_PASSPHRASE", "pw")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    assert_eq!(stdout_json(&init)["passphrase_protected"], true);
    let id = stdout_json(
        &forge(&cli_vault)
            .args(["node", "id", "--json"])
            .output()
            .unwrap(),
    );
    assert_eq!(id["passphrase_protected"], true);
    let without = forge(&temp.path().join("no-pass"))
        .args(["init", "--passphrase"])
        .output()
        .unwrap();
    assert_eq!(
        without.status.code(),
        Some(1),
        "no variable and no terminal: a clear error"
    );
    assert!(
        !temp.path().join("no-pass").exists()
            || fs::read_dir(temp.path().join("no-pass")).unwrap().count() == 0
    );
}

#[test]
fn secrets_mismatching_the_public_key_are_detected() {
    use forge_node::datadir::{DataDir, SecretProtection};
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    DataDir::new(first.path())
        .init(&SecretProtection::FileMode)
        .unwrap();
    DataDir::new(second.path())
        .init(&SecretProtection::FileMode)
        .unwrap();
    fs::copy(
        second.path().join("node/secret.key"),
        first.path().join("node/secret.key"),
    )
    .unwrap();
    let error = DataDir::new(first.path())
        .load_identity(|| unreachable!())
        .unwrap_err();
    assert_eq!(
        error.exit_code(),
        forge_node::ExitCode::Integrity,
        "{error}"
    );
}

/// `forge proof verify FILE` checks a transfer proof offline, with no vault: a proof both
/// nodes signed is "valid" and names what was transferred; the same file with one byte
/// changed, or a file that is no proof, fails with exit 3 naming what is wrong.
#[test]
fn proof_verify_accepts_a_signed_proof_and_refuses_a_tampered_one() {
    use forge_crypto::{Cid, NodeIdentity, NodeSecrets};
    use forge_mesh::{Receipt, TransferProof};

    let sender = NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([1; 128]));
    let receiver = NodeIdentity::from_secrets(&NodeSecrets::from_seed_bytes([2; 128]));
    let receipt = Receipt {
        volume: [5; 16],
        snapshot: Cid::of(b"a snapshot"),
        index_root: Cid::of(b"its index"),
        chunks: 42,
        bytes: 4_200_000,
        sender: sender.node_id(),
        receiver: receiver.node_id(),
        time_ns: 1_780_000_000_000_000_000,
        nonce: [3; 32],
    };
    let receiver_signature = receipt.sign_as_receiver(&receiver).unwrap();
    let sender_signature = receipt
        .countersign(&sender, receiver.public_keys(), &receiver_signature)
        .unwrap();
    let proof = TransferProof {
        receipt,
        receiver_signature,
        sender_signature,
        receiver_keys: receiver.public_keys().clone(),
        sender_keys: sender.public_keys().clone(),
    }
    .encode();
    let temp = tempfile::tempdir().unwrap();
    let file = temp.path().join("transfer.proof");
    fs::write(&file, &proof).unwrap();
    // No vault anywhere: the data directory does not exist.
    let nowhere = temp.path().join("no vault");
    let valid = forge(&nowhere)
        .args(["proof", "verify", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
    let line = String::from_utf8_lossy(&valid.stdout);
    assert!(line.starts_with("valid: "), "{line}");
    assert!(line.contains("42 chunks"), "{line}");
    assert!(line.contains(&sender.node_id().to_hex()), "{line}");
    let json = stdout_json(
        &forge(&nowhere)
            .args(["--json", "proof", "verify", file.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(json["valid"], true);
    assert_eq!(json["receiver"], receiver.node_id().to_hex());
    assert_eq!(json["bytes"], 4_200_000);
    let mut tampered = proof.clone();
    tampered[40] ^= 0x01; // inside the receipt
    fs::write(&file, &tampered).unwrap();
    let refused = forge(&nowhere)
        .args(["proof", "verify", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("invalid transfer proof"), "{stderr}");
    fs::write(&file, b"not a proof").unwrap();
    let garbage = forge(&nowhere)
        .args(["proof", "verify", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(garbage.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("not a forge transfer proof"));
}
