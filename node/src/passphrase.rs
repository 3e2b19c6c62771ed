//! Obtaining a passphrase from the user: `FORGE_PASSPHRASE`, else a prompt on the terminal.

use std::io::IsTerminal;

use zeroize::Zeroizing;

use crate::error::{NodeError, Result};

/// The environment variable that supplies a passphrase non-interactively.
pub const PASSPHRASE_ENV: &str = "FORGE_PASSPHRASE";

/// Reads the passphrase from `FORGE_PASSPHRASE`, or prompts on the controlling terminal
/// (twice when `confirm`, for a new passphrase).
///
/// # Errors
/// [`NodeError::PassphraseUnavailable`] with no variable and no terminal;
/// [`NodeError::PassphraseMismatch`] when the confirmation differs.
pub fn obtain(prompt: &str, confirm: bool) -> Result<Zeroizing<String>> {
    if let Some(value) = std::env::var_os(PASSPHRASE_ENV) {
        return Ok(Zeroizing::new(value.to_string_lossy().into_owned()));
    }
    // Prompt only when a person can answer: a script with no terminal on stdin gets a clear
    // error instead of a hang.
    if !std::io::stdin().is_terminal() {
        return Err(NodeError::PassphraseUnavailable);
    }
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("{prompt}: "))
            .map_err(|_| NodeError::PassphraseUnavailable)?,
    );
    if confirm {
        let second = Zeroizing::new(
            rpassword::prompt_password("Repeat it: ")
                .map_err(|_| NodeError::PassphraseUnavailable)?,
        );
        if *first != *second {
            return Err(NodeError::PassphraseMismatch);
        }
    }
    Ok(first)
}
