//! The node's configuration: an optional `DATA_DIR/forge.toml`. Every key has a default,
//! so a data directory needs no file; a key this version does not know is an error that
//! names it (a misspelt key silently ignored is a setting the user believes in and does
//! not have). `forge node config` prints what is in effect.
//!
//! ```toml
//! log_level = "warn"        # a tracing filter: "info", "warn,forge_node=debug", ...
//! metrics_listen = "127.0.0.1:9464"   # where `forge node start` serves /metrics, or "off"
//! listen = "/ip4/0.0.0.0/udp/4710/quic-v1"  # where the daemon meets peers, or "off"
//! [mount]
//! cache_size = "256M"       # decrypted chunks kept in memory per mount
//! ```
//!
//! `RUST_LOG` (a tracing filter) overrides `log_level`; `--cache-size` overrides
//! `mount.cache_size`; `node start --metrics-listen` overrides `metrics_listen`; `node start --listen` overrides
//! `listen`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::datadir::DataDir;
use crate::error::{NodeError, Result};

/// The configuration file's name in the data directory.
pub const CONFIG_FILE: &str = "forge.toml";

/// The default tracing filter (fuser warns about every optional operation a file system
/// leaves out, so only its errors).
pub const DEFAULT_LOG_LEVEL: &str = "warn,fuser=error";

/// Where `forge node start` serves /metrics by default (9464: the port commonly used for
/// a Prometheus exporter beside an application's own ports).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Where the daemon listens for peers by default: QUIC on UDP 4710, every interface. When
/// that port is taken (a second vault on the host) and no address was configured, the
/// daemon takes another port and says so; `forge node addr` prints the one in use.
pub const DEFAULT_LISTEN: &str = "/ip4/0.0.0.0/udp/4710/quic-v1";

/// The default memory for decrypted chunks per mount.
pub const DEFAULT_MOUNT_CACHE: &str = "256M";

/// A peer listen address: a QUIC multiaddr (`/ip4/A/udp/PORT/quic-v1`, or `/ip6/...`),
/// or `off` (None).
///
/// # Errors
/// Anything else, saying what is expected.
pub fn parse_mesh_listen(text: &str) -> std::result::Result<Option<String>, String> {
    if text == "off" {
        return Ok(None);
    }
    let address: forge_mesh::quic::Multiaddr = text
        .parse()
        .map_err(|error| format!("{text:?} is not a multiaddr ({error}); e.g. {DEFAULT_LISTEN}"))?;
    if !text.contains("/udp/") || !text.ends_with("/quic-v1") {
        return Err(format!(
            "{address} is not a QUIC address: give /ip4/ADDR/udp/PORT/quic-v1 (or off)"
        ));
    }
    Ok(Some(text.to_owned()))
}

/// The configuration in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Where it was read from (`None`: no file, all defaults).
    pub source: Option<PathBuf>,
    /// The tracing filter for the log.
    pub log_level: String,
    /// Bytes of decrypted chunks a mount keeps in memory.
    pub mount_cache_bytes: usize,
    /// Where a started daemon serves /metrics (None: off).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where a started daemon listens for peers (a multiaddr; None: off).
    pub listen: Option<String>,
    /// Whether `listen` was configured (a configured address that is taken fails the
    /// start; the default one falls back to another port).
    pub listen_configured: bool,
}

/// The file as written (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    log_level: Option<String>,
    metrics_listen: Option<String>,
    listen: Option<String>,
    #[serde(default)]
    mount: MountSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountSection {
    cache_size: Option<String>,
}

impl NodeConfig {
    /// The configuration of `data_dir`: its `forge.toml` over the defaults.
    ///
    /// # Errors
    /// [`NodeError::Config`] for a file that cannot be read or parsed, an unknown key,
    /// or a value out of range, naming the file and the key.
    pub fn load(data_dir: &DataDir) -> Result<Self> {
        let path = data_dir.path().join(CONFIG_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Self::parse("", &path)
                .map(|config| Self {
                    source: None,
                    ..config
                }),
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(NodeError::DataDirPermission {
                    data_dir: data_dir.path().to_owned(),
                    owner: owner_of(data_dir.path()),
                })
            }
            Err(error) => Err(NodeError::io("reading", &path)(error)),
        }
    }

    /// The defaults, for a command run without any data directory.
    #[must_use]
    pub fn default_for_no_data_dir() -> Self {
        Self {
            source: None,
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
            mount_cache_bytes: 256 << 20,
            metrics_listen: parse_listen(DEFAULT_METRICS_LISTEN).unwrap_or(None),
            listen: Some(DEFAULT_LISTEN.to_owned()),
            listen_configured: false,
        }
    }

    /// Parses a configuration file's text (`path` is named in errors).
    ///
    /// # Errors
    /// As [`NodeConfig::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let invalid = |reason: String| NodeError::Config {
            path: path.to_owned(),
            reason,
        };
        let file: ConfigFile = toml::from_str(text)
            .map_err(|error| invalid(error.to_string().trim().replace('\n', " ")))?;
        let log_level = file
            .log_level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            return Err(invalid(format!("log_level {log_level:?}: {error}")));
        }
        let cache = file
            .mount
            .cache_size
            .as_deref()
            .unwrap_or(DEFAULT_MOUNT_CACHE);
        let mount_cache_bytes = parse_size(cache)
            .map_err(|reason| invalid(format!("mount.cache_size: {reason}")))?
            as usize;
        let metrics_listen = parse_listen(
            file.metrics_listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )
        .map_err(|reason| invalid(format!("metrics_listen: {reason}")))?;
        let listen = parse_mesh_listen(file.listen.as_deref().unwrap_or(DEFAULT_LISTEN))
            .map_err(|reason| invalid(format!("listen: {reason}")))?;
        Ok(Self {
            source: Some(path.to_owned()),
            log_level,
            mount_cache_bytes,
            metrics_listen,
            listen,
            listen_configured: file.listen.is_some(),
        })
    }

    /// The configuration as `forge.toml` text (what `forge node config` prints).
    #[must_use]
    pub fn to_toml(&self) -> String {
        format!(
            "log_level = {:?}\nmetrics_listen = \"{}\"\n{}listen = \"{}\"\n\n[mount]\ncache_size = \"{}\"\n",
            self.log_level,
            self.metrics_listen
                .map_or_else(|| "off".to_owned(), |address| address.to_string()),
            // The default is not pinned: its port is taken over by another when busy.
            if self.listen_configured {
                ""
            } else {
                "# (the default) "
            },
            self.listen.as_deref().unwrap_or("off"),
            format_size(self.mount_cache_bytes)
        )
    }
}

/// Who owns `path`, for an error message ("uid N", or "another user").
pub(crate) fn owner_of(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or_else(
        |_| "another user".to_owned(),
        |metadata| format!("uid {}", metadata.uid()),
    )
}

/// A listen address (`127.0.0.1:9464`, `[::1]:0`) or `off`.
///
/// # Errors
/// Neither.
pub fn parse_listen(text: &str) -> std::result::Result<Option<std::net::SocketAddr>, String> {
    if text.trim() == "off" {
        return Ok(None);
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| format!("{text:?} is not an address like 127.0.0.1:9464, or off"))
}

/// A size like `64K`, `64KiB`, `256M` or `1048576` (binary units); at most 4 GiB - 1.
///
/// # Errors
/// Not a number with an optional unit B, K or M; too large.
pub fn parse_size(text: &str) -> std::result::Result<u32, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 64K or 1M"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("{text:?}: unknown unit (use K or M)")),
    };
    u32::try_from(number.saturating_mul(multiplier)).map_err(|_| format!("{text:?} is too large"))
}

/// A size in the largest unit that divides it (`256M`, `64K`, `1000`).
fn format_size(bytes: usize) -> String {
    if bytes != 0 && bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes != 0 && bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        bytes.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        NodeConfig::parse(text, Path::new("/d/forge.toml"))
    }

    #[test]
    fn an_empty_file_gives_the_defaults_and_prints_back_as_them() {
        let config = parse("").unwrap();
        assert_eq!(config.log_level, DEFAULT_LOG_LEVEL);
        assert_eq!(config.mount_cache_bytes, 256 << 20);
        assert_eq!(parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn set_keys_take_effect_and_round_trip() {
        let config = parse(
            "log_level = \"info\"\nmetrics_listen = \"off\"\n[mount]\ncache_size = \"64K\"\n",
        )
        .unwrap();
        assert_eq!(config.log_level, "info");
        assert_eq!(config.metrics_listen, None);
        assert_eq!(config.mount_cache_bytes, 64 << 10);
        assert_eq!(parse(&config.to_toml()).unwrap(), config);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_them() {
        for (text, expected) in [
            ("log_levle = \"info\"", "log_levle"),
            ("[mount]\ncache = \"1M\"", "cache"),
            ("[mounts]\ncache_size = \"1M\"", "mounts"),
            ("[mount]\ncache_size = \"lots\"", "mount.cache_size"),
            ("[mount]\ncache_size = 5", "cache_size"),
            ("log_level = \"[\"", "log_level"),
            ("log_level = ", "/d/forge.toml"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
        ] {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("/d/forge.toml"), "{text:?}: {error}");
        }
    }
}
