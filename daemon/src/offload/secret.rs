//! Reading secrets (the cloud API key) from where the operator keeps them: a file, an environment
//! variable, or a systemd credential. Errors name what is missing and how to provide it; the secret
//! itself never appears in logs or `Debug` output.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::SecretSource;

/// A secret value. `Debug` and `Display` print a placeholder, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value (for callers that obtained it elsewhere).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself; keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "cannot read the secret file {path}: {source}; create it with the secret on its first line \
         (readable only by the tandemd user, e.g. mode 0600)"
    )]
    File { path: PathBuf, source: io::Error },
    #[error("the secret file {path} has nothing on its first line; put the secret there")]
    EmptyFile { path: PathBuf },
    #[error(
        "the environment variable {name} is not set; set it in the service environment \
         (e.g. `Environment={name}=…` or an EnvironmentFile= in the systemd unit)"
    )]
    EnvMissing { name: String },
    #[error("the environment variable {name} is set but empty; give it the secret as its value")]
    EnvEmpty { name: String },
    #[error("the environment variable {name} is not valid UTF-8")]
    EnvNotUnicode { name: String },
    #[error(
        "the systemd credential `{name}` was asked for but CREDENTIALS_DIRECTORY is not set: tandemd is \
         not running under systemd with credentials; add `LoadCredential={name}:/path/to/secret` (or \
         `LoadCredentialEncrypted=`) to the unit's [Service] section, or use a file or env source"
    )]
    NoCredentialsDirectory { name: String },
    #[error(
        "cannot read the systemd credential `{name}` at {path}: {source}; check that the unit has \
         `LoadCredential={name}:…` and that the source file exists"
    )]
    Credential { name: String, path: PathBuf, source: io::Error },
    #[error("the systemd credential `{name}` at {path} is empty; put the secret on its first line")]
    EmptyCredential { name: String, path: PathBuf },
    #[error("`{name}` is not a valid systemd credential name (it must be a plain file name, without `/`)")]
    InvalidCredentialName { name: String },
}

/// Reads `source` from the real process environment.
pub fn read_secret(source: &SecretSource) -> Result<Secret, SecretError> {
    read_secret_with(source, |name| std::env::var_os(name))
}

/// Reads `source`, looking environment variables up with `env` (tests pass their own).
pub fn read_secret_with(
    source: &SecretSource,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Secret, SecretError> {
    match source {
        SecretSource::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| SecretError::File { path: path.clone(), source })?;
            warn_if_readable_by_others(path);
            first_line(&text).ok_or_else(|| SecretError::EmptyFile { path: path.clone() })
        }
        SecretSource::Env(name) => {
            let value = env(name).ok_or_else(|| SecretError::EnvMissing { name: name.clone() })?;
            let value = value.into_string().map_err(|_| SecretError::EnvNotUnicode { name: name.clone() })?;
            let value = value.trim();
            if value.is_empty() {
                return Err(SecretError::EnvEmpty { name: name.clone() });
            }
            Ok(Secret(value.to_string()))
        }
        SecretSource::Credential(name) => {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(SecretError::InvalidCredentialName { name: name.clone() });
            }
            let dir = env("CREDENTIALS_DIRECTORY")
                .filter(|dir| !dir.is_empty())
                .ok_or_else(|| SecretError::NoCredentialsDirectory { name: name.clone() })?;
            let path = PathBuf::from(dir).join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| SecretError::Credential {
                name: name.clone(),
                path: path.clone(),
                source,
            })?;
            first_line(&text).ok_or_else(|| SecretError::EmptyCredential { name: name.clone(), path })
        }
    }
}

fn first_line(text: &str) -> Option<Secret> {
    let line = text.lines().next().unwrap_or("").trim();
    (!line.is_empty()).then(|| Secret(line.to_string()))
}

/// A secret file others can read is worth a warning, not a refusal: containers often run as root
/// with relaxed modes.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "secret file is readable by group or others; consider chmod 600"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn file_secret_is_its_first_line_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "  sk-abc123  \nsecond line\n").expect("write");
        let secret = read_secret_with(&SecretSource::File(path), no_env).expect("secret");
        assert_eq!(secret.expose(), "sk-abc123");
    }

    #[test]
    fn missing_file_error_names_the_path_and_the_fix() {
        let error = read_secret_with(&SecretSource::File("/nonexistent/tandem/key".into()), no_env)
            .expect_err("missing file");
        let message = error.to_string();
        assert!(message.contains("/nonexistent/tandem/key"), "{message}");
        assert!(message.contains("first line"), "{message}");
    }

    #[test]
    fn empty_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "\n\n").expect("write");
        let error = read_secret_with(&SecretSource::File(path), no_env).expect_err("empty");
        assert!(matches!(error, SecretError::EmptyFile { .. }), "{error}");
    }

    #[test]
    fn env_secret_is_read_and_trimmed() {
        let env = |name: &str| (name == "TANDEM_KEY").then(|| OsString::from(" sk-env\n"));
        let secret = read_secret_with(&SecretSource::Env("TANDEM_KEY".into()), env).expect("secret");
        assert_eq!(secret.expose(), "sk-env");
    }

    #[test]
    fn unset_env_error_names_the_variable() {
        let error = read_secret_with(&SecretSource::Env("TANDEM_KEY".into()), no_env).expect_err("unset");
        assert!(error.to_string().contains("TANDEM_KEY is not set"), "{error}");
    }

    #[test]
    fn credential_is_read_from_credentials_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cloud-key"), "sk-cred\n").expect("write");
        let dir_os = dir.path().as_os_str().to_owned();
        let env = move |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| dir_os.clone());
        let secret = read_secret_with(&SecretSource::Credential("cloud-key".into()), env).expect("secret");
        assert_eq!(secret.expose(), "sk-cred");
    }

    #[test]
    fn credential_outside_systemd_explains_load_credential() {
        let error =
            read_secret_with(&SecretSource::Credential("cloud-key".into()), no_env).expect_err("no dir");
        assert!(error.to_string().contains("LoadCredential=cloud-key:"), "{error}");
    }

    #[test]
    fn credential_name_cannot_escape_the_directory() {
        let env = |_: &str| Some(OsString::from("/run/credentials/tandemd.service"));
        let error = read_secret_with(&SecretSource::Credential("../etc/passwd".into()), env)
            .expect_err("path traversal");
        assert!(matches!(error, SecretError::InvalidCredentialName { .. }), "{error}");
    }

    #[test]
    fn debug_output_hides_the_secret() {
        assert_eq!(format!("{:?}", Secret::new("sk-very-secret")), "Secret(<redacted>)");
    }
}
