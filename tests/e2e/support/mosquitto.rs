//! A real Mosquitto broker for tests: started as a child process on a free loopback port with a
//! generated configuration (anonymous, or password file + ACL), stopped, paused or restarted on
//! the same port on demand, and killed when dropped.

use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";
const NOT_INSTALLED: &str = "mosquitto is not installed: run `make test` (it installs it with apt-get)";
const STARTUP_LIMIT: Duration = Duration::from_secs(10);

/// Who may connect, and what they may do.
pub enum Access<'a> {
    /// Anyone, anything.
    Anonymous,
    /// Only these `(user, password)` pairs, restricted by this Mosquitto `acl_file` text.
    Acl { users: &'a [(&'a str, &'a str)], acl: &'a str },
    /// TLS only, with a server certificate from `pki`; clients must present a certificate from the
    /// same CA.
    MutualTls { pki: &'a TestPki },
}

/// A private CA with a server certificate for 127.0.0.1 and a client certificate, made with the
/// `openssl` command line tool.
pub struct TestPki {
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    /// The broker's certificate (PEM) and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (PEM) and key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Generates the CA and both certificates (P-256 keys, valid for two days).
    pub fn generate() -> Self {
        const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        let dir = tempfile::tempdir().expect("temporary directory");
        let cwd = dir.path();
        openssl(
            cwd,
            &format!("req -x509 {NEW_KEY} -keyout ca.key -out ca.pem -days 2 -subj /CN=tandem-test-ca"),
        );
        for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
            let extensions = format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n\
                 subjectAltName=IP:127.0.0.1\n"
            );
            std::fs::write(cwd.join(format!("{name}.ext")), extensions).expect("extensions file");
            openssl(cwd, &format!("req {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"));
            openssl(
                cwd,
                &format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                     -out {name}.pem -extfile {name}.ext"
                ),
            );
        }
        Self {
            ca: cwd.join("ca.pem"),
            server_cert: cwd.join("server.pem"),
            server_key: cwd.join("server.key"),
            client_cert: cwd.join("client.pem"),
            client_key: cwd.join("client.key"),
            _dir: dir,
        }
    }
}

/// Runs `openssl` with whitespace-separated `args` in `dir`.
fn openssl(dir: &Path, args: &str) {
    let output = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("openssl is needed for the TLS tests (apt-get install openssl): {e}"));
    assert!(output.status.success(), "openssl {args} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// A running (or stopped) Mosquitto broker.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    starts: u32,
}

impl Mosquitto {
    /// A broker that lets anyone in.
    pub fn start() -> Self {
        Self::start_with(Access::Anonymous)
    }

    /// A broker with the given access rules, accepting connections when this returns.
    pub fn start_with(access: Access<'_>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        write_config(dir.path(), port, &access);
        let mut broker = Self { dir, port, child: None, starts: 0 };
        broker.start_again();
        broker
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `mqtts://127.0.0.1:PORT`, for a broker started with [`Access::MutualTls`].
    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL: no goodbye to its clients); it forgets every session.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _already_gone = child.kill();
            let _status = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same configuration.
    pub fn start_again(&mut self) {
        self.stop();
        let binary = Path::new(MOSQUITTO);
        assert!(binary.is_file(), "{NOT_INSTALLED}");
        self.starts += 1;
        let log = self.log_path();
        let log_file = File::create(&log).expect("broker log file");
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        self.child = Some(child);
        self.wait_until_listening();
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the broker is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill {signal}`: {e}"));
        assert!(status.success(), "kill {signal} failed");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("mosquitto-{}.log", self.starts))
    }

    fn wait_until_listening(&mut self) {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + STARTUP_LIMIT;
        loop {
            let child = self.child.as_mut().expect("started");
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mosquitto exited with {status} at startup:\n{}", self.log());
            }
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "mosquitto did not listen on {address}:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the broker logged since its last start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // SIGKILL also ends a paused broker.
        self.stop();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free loopback port");
    listener.local_addr().expect("bound address").port()
}

fn write_config(dir: &Path, port: u16, access: &Access<'_>) {
    // `user root` keeps a broker started by root from switching to the `mosquitto` user (which
    // could not read this private directory); it has no effect for other users.
    let mut config = format!(
        "listener {port} 127.0.0.1\npersistence false\nuser root\nlog_dest stderr\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
    );
    match access {
        Access::Anonymous => config.push_str("allow_anonymous true\n"),
        Access::Acl { users, acl } => {
            let passwords = dir.join("passwords");
            for (i, (user, password)) in users.iter().enumerate() {
                let create = if i == 0 { &["-c"][..] } else { &[][..] };
                let binary = Path::new(MOSQUITTO_PASSWD);
                assert!(binary.is_file(), "{NOT_INSTALLED}");
                let status = Command::new(binary)
                    .args(create)
                    .arg("-b")
                    .arg(&passwords)
                    .args([user, password])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO_PASSWD}: {e}"));
                assert!(status.success(), "mosquitto_passwd failed for {user}");
            }
            let acl_file = dir.join("acl");
            std::fs::write(&acl_file, acl).expect("acl file");
            config.push_str(&format!(
                "allow_anonymous false\npassword_file {}\nacl_file {}\n",
                passwords.display(),
                acl_file.display()
            ));
        }
        Access::MutualTls { pki } => config.push_str(&format!(
            "allow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        )),
    }
    let mut file = File::create(dir.join("mosquitto.conf")).expect("mosquitto.conf");
    file.write_all(config.as_bytes()).expect("mosquitto.conf written");
}
