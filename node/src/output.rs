//! What a successful operation reports: the one value every front end renders (the CLI
//! prints `human` or `json`; the control socket carries both back to the client). Below
//! the CLI and the mount host alike, so neither imports the other for it.

/// What a successful command prints: a human text and a JSON value.
#[derive(Debug)]
pub struct Output {
    /// For a terminal or a log.
    pub human: String,
    /// For `--json`.
    pub json: serde_json::Value,
}
