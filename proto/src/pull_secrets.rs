//! Registry credentials from mounted pull secrets (`kubernetes.io/dockerconfigjson` and the
//! legacy `.dockercfg`), matched to an image's registry host. Secret values live in
//! [`Secret`], whose `Debug`/`Display` never print them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// A string that must never be logged. Only [`Secret::expose`] reveals it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Credentials for one registry, resolved to what the CRI `AuthConfig` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Where the credentials came from (`DIR/secret/.dockerconfigjson`), safe to log.
    pub source: PathBuf,
    pub username: String,
    pub password: Secret,
    pub identity_token: Secret,
}

impl Credentials {
    #[cfg(feature = "runtime-apis")]
    pub fn to_cri(&self) -> crate::cri::AuthConfig {
        // server_address stays empty: containerd drops credentials whose server_address
        // is not a URL with the registry's host (RUNTIME-NOTES).
        crate::cri::AuthConfig {
            username: self.username.clone(),
            password: self.password.expose().to_string(),
            identity_token: self.identity_token.expose().to_string(),
            ..Default::default()
        }
    }

    /// Replaces every secret value that occurs in `text` (a runtime's error message, say),
    /// so an error can be logged even if a registry echoed something back.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        let pair = format!("{}:{}", self.username, self.password.expose());
        let encoded = base64::engine::general_purpose::STANDARD.encode(&pair);
        for secret in [encoded.as_str(), self.password.expose(), self.identity_token.expose()] {
            if secret.len() >= 3 {
                out = out.replace(secret, "<redacted>");
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read pull secrets directory {dir}: {source}")]
    ReadDir { dir: PathBuf, source: std::io::Error },
    #[error("pull secret {file}: invalid JSON: {reason}")]
    InvalidJson { file: PathBuf, reason: String },
    #[error("pull secret {file}: registry `{registry}`: `auth` is not base64 `user:password`")]
    InvalidAuthField { file: PathBuf, registry: String },
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: BTreeMap<String, DockerAuthEntry>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default, alias = "identitytoken")]
    identity_token: Option<String>,
}

/// File names that hold credentials, as Kubernetes mounts secrets and as docker writes them.
const CREDENTIAL_FILES: [&str; 3] = [".dockerconfigjson", "config.json", ".dockercfg"];

/// Credentials found in a pull-secrets directory, keyed by normalized registry host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyring {
    by_host: BTreeMap<String, Credentials>,
}

impl Keyring {
    /// Reads `DIR/<secret>/{.dockerconfigjson,config.json,.dockercfg}` and the same file names
    /// directly in `DIR`. Secrets are read in name order; the first one for a host wins.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        let read_err = |source| AuthError::ReadDir { dir: dir.to_path_buf(), source };
        let mut files = Vec::new();
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            // Kubernetes' `..data` / `..2024_…` entries are the atomic-swap machinery.
            .filter(|p| p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..")))
            .collect();
        subdirs.sort();
        for base in std::iter::once(dir.to_path_buf()).chain(subdirs) {
            for name in CREDENTIAL_FILES {
                let f = base.join(name);
                if f.is_file() {
                    files.push(f);
                }
            }
        }
        let mut keyring = Keyring::default();
        for file in files {
            let text =
                std::fs::read_to_string(&file).map_err(|source| AuthError::ReadDir { dir: file.clone(), source })?;
            keyring.add_file(&file, &text)?;
        }
        Ok(keyring)
    }

    /// Adds the credentials of one file; `.dockercfg` has no `auths` wrapper.
    pub fn add_file(&mut self, file: &Path, text: &str) -> Result<(), AuthError> {
        // serde_json's messages quote no input values, so the reason is safe to show.
        let invalid = |e: serde_json::Error| AuthError::InvalidJson { file: file.to_path_buf(), reason: e.to_string() };
        let legacy = file.file_name().is_some_and(|n| n == ".dockercfg");
        let auths = if legacy {
            serde_json::from_str::<BTreeMap<String, DockerAuthEntry>>(text).map_err(invalid)?
        } else {
            serde_json::from_str::<DockerConfigJson>(text).map_err(invalid)?.auths
        };
        for (registry, entry) in auths {
            let creds = resolve_entry(file, &registry, entry)?;
            self.by_host.entry(normalize_registry(&registry)).or_insert(creds);
        }
        Ok(())
    }

    /// Credentials for an image's registry host (`docker.io`, `quay.io`, `127.0.0.1:5000`).
    pub fn for_registry(&self, registry: &str) -> Option<&Credentials> {
        self.by_host.get(&normalize_registry(registry))
    }

    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.by_host.keys().map(String::as_str)
    }
}

fn resolve_entry(file: &Path, registry: &str, entry: DockerAuthEntry) -> Result<Credentials, AuthError> {
    let (mut username, mut password) = (entry.username.unwrap_or_default(), entry.password.unwrap_or_default());
    if username.is_empty() && password.is_empty() {
        if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
            let bad = || AuthError::InvalidAuthField { file: file.to_path_buf(), registry: registry.to_string() };
            let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
            let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
            (username, password) = (u.to_string(), p.to_string());
        }
    }
    Ok(Credentials {
        source: file.to_path_buf(),
        username,
        password: Secret::new(password),
        identity_token: Secret::new(entry.identity_token.unwrap_or_default()),
    })
}

/// `https://index.docker.io/v1/` → `docker.io`; `HTTPS://Quay.io/` → `quay.io`.
pub fn normalize_registry(key: &str) -> String {
    let key = key.trim().to_ascii_lowercase();
    let key = key.as_str();
    let without_scheme = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default().to_string();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn docker_hub_aliases_normalize_to_docker_io() {
        for k in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
            "docker.io",
            "https://registry.hub.docker.com",
        ] {
            assert_eq!(normalize_registry(k), "docker.io", "{k}");
        }
        assert_eq!(normalize_registry("HTTPS://Quay.io/"), "quay.io");
        assert_eq!(normalize_registry("http://127.0.0.1:5000/v2/"), "127.0.0.1:5000");
    }

    #[test]
    fn dockerconfigjson_with_auth_field_and_hub_alias() {
        let mut k = Keyring::default();
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},"quay.io":{{"username":"q","password":"qp"}}}}}}"#,
            b64("hubuser:hub:pass")
        );
        k.add_file(Path::new("/s/a/.dockerconfigjson"), &json).unwrap();
        let hub = k.for_registry("docker.io").unwrap();
        assert_eq!(hub.username, "hubuser");
        assert_eq!(hub.password.expose(), "hub:pass", "only the first colon separates user and password");
        let quay = k.for_registry("quay.io").unwrap();
        assert_eq!((quay.username.as_str(), quay.password.expose()), ("q", "qp"));
        assert!(k.for_registry("ghcr.io").is_none());
        #[cfg(feature = "runtime-apis")]
        {
            let cri = quay.to_cri();
            assert_eq!(cri.server_address, "", "server_address must stay empty for containerd");
            assert_eq!(cri.username, "q");
        }
    }

    #[test]
    fn legacy_dockercfg_has_no_auths_wrapper() {
        let mut k = Keyring::default();
        k.add_file(
            Path::new("/s/.dockercfg"),
            &format!(r#"{{"127.0.0.1:5000":{{"auth":"{}","email":"x@y"}}}}"#, b64("u:p")),
        )
        .unwrap();
        assert_eq!(k.for_registry("127.0.0.1:5000").unwrap().username, "u");
    }

    #[test]
    fn invalid_json_and_bad_auth_name_the_file_not_the_secret() {
        let mut k = Keyring::default();
        let err = k.add_file(Path::new("/s/a/.dockerconfigjson"), "{not json").unwrap_err();
        assert!(err.to_string().starts_with("pull secret /s/a/.dockerconfigjson: invalid JSON"), "{err}");
        let err = k
            .add_file(Path::new("/s/a/config.json"), r#"{"auths":{"r.io":{"auth":"c2VjcmV0LW5vLWNvbG9u"}}}"#)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "pull secret /s/a/config.json: registry `r.io`: `auth` is not base64 `user:password`"
        );
        assert!(!err.to_string().contains("secret-no-colon"));
    }

    #[test]
    fn debug_never_shows_secrets_and_redact_scrubs_them() {
        let c = Credentials {
            source: "/x".into(),
            username: "alice".into(),
            password: Secret::new("s3cr3t-pw"),
            identity_token: Secret::default(),
        };
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t-pw"), "{dbg}");
        let msg = format!("401 for s3cr3t-pw and {}", b64("alice:s3cr3t-pw"));
        assert_eq!(c.redact(&msg), "401 for <redacted> and <redacted>");
    }

    #[test]
    fn load_reads_secret_subdirectories_in_order_and_skips_dotdot_entries() {
        let dir = tempfile::tempdir().unwrap();
        for (secret, user) in [("b-second", "second"), ("a-first", "first"), ("..data", "hidden")] {
            std::fs::create_dir(dir.path().join(secret)).unwrap();
            std::fs::write(
                dir.path().join(secret).join(".dockerconfigjson"),
                format!(r#"{{"auths":{{"reg.example:5000":{{"username":"{user}","password":"p"}}}}}}"#),
            )
            .unwrap();
        }
        let k = Keyring::load(dir.path()).unwrap();
        assert_eq!(k.for_registry("reg.example:5000").unwrap().username, "first");
        assert_eq!(k.hosts().collect::<Vec<_>>(), vec!["reg.example:5000"]);
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = Keyring::load(Path::new("/nonexistent/kip-secrets")).unwrap_err();
        assert!(err.to_string().starts_with("cannot read pull secrets directory /nonexistent/kip-secrets"), "{err}");
    }
}
