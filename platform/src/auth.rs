//! Bearer-token authentication of the APIs: the accepted keys come from configuration (or a
//! mounted secret file), a presented token is compared in constant time, and the ops paths
//! (`/health`, `/ready`, `/metrics`) never ask for one.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// Shortest key accepted: a shorter one could be guessed by trying.
pub const MIN_KEY_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every API call needs `Authorization: Bearer <key>`.
    Bearer,
    /// No authentication: for local experiments only.
    None,
}

#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// Accepted API keys (bearer tokens), comma-separated, at least 16 characters each.
    #[arg(long, env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,

    /// A file of accepted API keys, one per line (e.g. a mounted Kubernetes Secret); read once
    /// at start-up, in addition to API_KEYS.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// `bearer` requires a key on every API call; `none` turns authentication off.
    #[arg(long, env = "API_AUTH", value_enum, default_value = "bearer")]
    pub api_auth: AuthMode,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    #[error("API_KEYS (or API_KEYS_FILE) is required: give at least one key, or set API_AUTH=none to run without authentication")]
    NoKeys,
    #[error("API_KEYS: a key is {0} characters; keys must have at least {MIN_KEY_CHARS}")]
    ShortKey(usize),
    #[error("API_KEYS_FILE {path}: {reason}")]
    File { path: String, reason: String },
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Denied {
    #[error("an API key is required: Authorization: Bearer <key>")]
    Missing,
    #[error("the Authorization header is not `Bearer <key>`")]
    Malformed,
    #[error("the API key is not valid")]
    Invalid,
}

/// The accepted keys, kept as SHA-256 digests: every comparison has the same length, and no
/// key sits in memory in clear after start-up.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
    enabled: bool,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ApiKeys({} keys, enabled: {})",
            self.digests.len(),
            self.enabled
        )
    }
}

impl AuthArgs {
    /// The keys a server of `what` accepts; a bad setting stops start-up with one line naming
    /// it, and authentication turned off is said once.
    pub fn keys_or_exit(&self, what: &str) -> ApiKeys {
        let keys = self.keys().unwrap_or_else(|e| crate::config::fail(e));
        if !keys.enabled() {
            tracing::warn!("API_AUTH=none: {what} accepts calls without a key");
        }
        keys
    }

    pub fn keys(&self) -> Result<ApiKeys, AuthConfigError> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| AuthConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        ApiKeys::new(&keys, self.api_auth == AuthMode::Bearer)
    }
}

impl ApiKeys {
    pub fn new(keys: &[String], enabled: bool) -> Result<ApiKeys, AuthConfigError> {
        if enabled && keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        if let Some(short) = keys.iter().find(|k| k.chars().count() < MIN_KEY_CHARS) {
            return Err(AuthConfigError::ShortKey(short.chars().count()));
        }
        Ok(ApiKeys {
            digests: keys
                .iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
            enabled,
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Checks an `Authorization` header value. Every key is compared, each in constant time,
    /// so the time taken says nothing about which key, or how much of one, matched.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let header = authorization.ok_or(Denied::Missing)?;
        let token = header
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| header[7..].trim_ascii())
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Malformed)?;
        let presented: [u8; 32] = Sha256::digest(token).into();
        let mut matched = 0u8;
        for digest in &self.digests {
            matched |= constant_time_eq(digest, &presented);
        }
        if matched == 1 {
            Ok(())
        } else {
            Err(Denied::Invalid)
        }
    }
}

/// 1 when equal, 0 otherwise, with no branch on the data.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> u8 {
    let mut diff = 0u8;
    for i in 0..32 {
        diff |= a[i] ^ b[i];
    }
    let diff = std::hint::black_box(diff);
    // 0 → 1, anything else → 0, without a comparison the compiler could turn into a branch.
    (((diff as u16).wrapping_sub(1) >> 8) & 1) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&str]) -> ApiKeys {
        ApiKeys::new(
            &list.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
            true,
        )
        .unwrap()
    }

    #[test]
    fn a_listed_key_passes_and_anything_else_is_refused() {
        let k = keys(&["first-key-0123456789", "second-key-0123456789"]);
        assert_eq!(k.check(Some(b"Bearer first-key-0123456789")), Ok(()));
        assert_eq!(k.check(Some(b"bearer second-key-0123456789")), Ok(()));
        assert_eq!(k.check(Some(b"BEARER  second-key-0123456789 ")), Ok(()));
        assert_eq!(k.check(None), Err(Denied::Missing));
        assert_eq!(k.check(Some(b"Basic Zm9vOmJhcg==")), Err(Denied::Malformed));
        assert_eq!(k.check(Some(b"Bearer ")), Err(Denied::Malformed));
        assert_eq!(k.check(Some(b"Bear")), Err(Denied::Malformed));
        assert_eq!(
            k.check(Some(b"Bearer first-key-012345678")),
            Err(Denied::Invalid)
        );
        assert_eq!(
            k.check(Some(b"Bearer first-key-01234567890")),
            Err(Denied::Invalid)
        );
        assert_eq!(k.check(Some(b"Bearer \xff\xfe")), Err(Denied::Invalid));
    }

    #[test]
    fn configuration_needs_long_keys_unless_auth_is_off() {
        assert_eq!(
            ApiKeys::new(&[], true).unwrap_err(),
            AuthConfigError::NoKeys
        );
        assert_eq!(
            ApiKeys::new(&["short".into()], true).unwrap_err(),
            AuthConfigError::ShortKey(5)
        );
        let open = ApiKeys::new(&[], false).unwrap();
        assert_eq!(open.check(None), Ok(()));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [7u8; 32];
        let mut b = a;
        assert_eq!(constant_time_eq(&a, &b), 1);
        for i in [0, 13, 31] {
            b = a;
            b[i] ^= 0x80;
            assert_eq!(constant_time_eq(&a, &b), 0);
            b[i] ^= 0x81;
            assert_eq!(constant_time_eq(&a, &b), 0);
        }
    }
}
