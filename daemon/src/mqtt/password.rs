//! The broker password: the first line of a file, or of a systemd credential
//! (`credential:NAME` = `$CREDENTIALS_DIRECTORY/NAME`, from `LoadCredential=` in the unit).

use std::path::{Path, PathBuf};

use super::MqttLinkError;

const CREDENTIAL_PREFIX: &str = "credential:";

/// Reads the password named by `spec` (the `password_file` setting); `credentials_dir` is
/// `$CREDENTIALS_DIRECTORY` when set.
pub(crate) fn read_password(spec: &str, credentials_dir: Option<&Path>) -> Result<String, MqttLinkError> {
    let path = password_path(spec, credentials_dir)?;
    let text = std::fs::read_to_string(&path).map_err(|source| MqttLinkError::ReadFile {
        what: "password",
        path: path.clone(),
        source,
    })?;
    let password = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if password.is_empty() {
        return Err(MqttLinkError::Config(format!("the password file {} is empty", path.display())));
    }
    Ok(password.to_string())
}

fn password_path(spec: &str, credentials_dir: Option<&Path>) -> Result<PathBuf, MqttLinkError> {
    let Some(name) = spec.strip_prefix(CREDENTIAL_PREFIX) else {
        return Ok(PathBuf::from(spec));
    };
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(MqttLinkError::Config(format!("{spec:?} does not name a systemd credential")));
    }
    let dir = credentials_dir.ok_or_else(|| {
        MqttLinkError::Config(format!(
            "password_file = {spec:?} needs $CREDENTIALS_DIRECTORY (set by systemd's LoadCredential=)"
        ))
    })?;
    Ok(dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_of_the_file_is_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\r\nignored\n").unwrap();
        assert_eq!(read_password(file.to_str().unwrap(), None).unwrap(), "s3cret");
    }

    #[test]
    fn credentials_are_read_from_the_systemd_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mqtt-password"), "from-systemd\n").unwrap();
        let password = read_password("credential:mqtt-password", Some(dir.path())).unwrap();
        assert_eq!(password, "from-systemd");
    }

    #[test]
    fn unusable_password_sources_say_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let cases = [
            ("credential:x", None, "CREDENTIALS_DIRECTORY"),
            ("credential:../etc/shadow", Some(dir.path()), "does not name"),
            ("/nonexistent/pw", None, "cannot read the MQTT password"),
        ];
        for (spec, creds, why) in cases {
            let err = read_password(spec, creds).unwrap_err().to_string();
            assert!(err.contains(why), "{spec}: {err}");
        }
        let empty = dir.path().join("empty");
        let err = read_password(empty.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
    }
}
