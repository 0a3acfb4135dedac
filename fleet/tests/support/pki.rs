//! A private CA with a server certificate for 127.0.0.1 and two client certificates, made with the
//! `openssl` command line tool.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

pub struct TestPki {
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// SHA-256 fingerprint of the client certificate, `AB:CD:…`.
    pub client_fingerprint: String,
}

impl TestPki {
    pub fn generate() -> Self {
        const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        openssl(
            cwd,
            &format!("req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 2 -subj /CN=fleet-test-ca"),
        );
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let extensions = format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1\n"
            );
            std::fs::write(cwd.join(format!("{name}.ext")), extensions).unwrap();
            openssl(cwd, &format!("req {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"));
            openssl(
                cwd,
                &format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out {name}.pem -extfile {name}.ext"
                ),
            );
        }
        let fingerprint = openssl(cwd, "x509 -in client.pem -noout -fingerprint -sha256");
        let client_fingerprint = fingerprint.trim().rsplit('=').next().unwrap().to_string();
        Self {
            ca: cwd.join("ca.pem"),
            server_cert: cwd.join("server.pem"),
            server_key: cwd.join("server.key"),
            client_cert: cwd.join("client.pem"),
            client_key: cwd.join("client.key"),
            client_fingerprint,
            _dir: dir,
        }
    }

    /// A rustls client configuration trusting the CA, with the client certificate when asked.
    pub fn client_config(&self, with_certificate: bool) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = if with_certificate {
            let chain =
                CertificateDer::pem_file_iter(&self.client_cert).unwrap().map(Result::unwrap).collect();
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&self.client_key).unwrap())
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }
}

fn openssl(dir: &Path, args: &str) -> String {
    let output = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("openssl is needed for the TLS tests: {e}"));
    assert!(output.status.success(), "openssl {args}:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
