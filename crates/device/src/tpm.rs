//! The device side of TPM attestation, driven through the `tpm2-tools` commands (Debian
//! package `tpm2-tools`): the TPM holds every key, this module only moves public data and
//! blobs between files and the tools.
//!
//! Keys are persistent, as the Azure SDKs keep them: the endorsement key (EK) at `0x81010001`,
//! the storage root key (SRK, RSA 2048 or ECC P-256, AES-128-CFB) at `0x81000001`. The HMAC key dps sends
//! in its activation blob is imported under the SRK and loaded for each signature (the tools
//! flush transient objects after every step, so a TPM without a resource manager, such as
//! `swtpm`, has room for them).
//!
//! Which TPM: `tcti` (`TPM2TOOLS_TCTI` syntax, e.g. `swtpm:host=127.0.0.1,port=2321` or
//! `device:/dev/tpmrm0`); `None` leaves the tools' default.

use dps_core::tpm::ActivationParts;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The EK's persistent handle.
pub const EK_HANDLE: &str = "0x81010001";
/// The SRK's persistent handle.
pub const SRK_HANDLE: &str = "0x81000001";

/// A TPM step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// A tool could not be started (not installed?).
    #[error("cannot run {tool}: {error} (is tpm2-tools installed?)")]
    Spawn {
        /// The command.
        tool: String,
        /// Why.
        error: String,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command.
        tool: String,
        /// Exit status.
        status: String,
        /// Its error output (last lines).
        stderr: String,
    },
    /// A file in the work directory.
    #[error("{path}: {error}")]
    File {
        /// Which file.
        path: String,
        /// Why.
        error: String,
    },
    /// The activation blob is malformed.
    #[error("the activation blob is malformed: {0}")]
    Blob(#[from] dps_core::tpm::TpmError),
}

/// The public keys a device sends (`TPM2B_PUBLIC` bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublicKeys {
    /// Endorsement key.
    pub endorsement_key: Vec<u8>,
    /// Storage root key.
    pub storage_root_key: Vec<u8>,
}

/// A TPM reached through `tpm2-tools`, with a work directory for the files the tools exchange.
#[derive(Debug, Clone)]
pub struct Tpm2Tools {
    tcti: Option<String>,
    dir: PathBuf,
    ek_alg: &'static str,
    srk_alg: &'static str,
}

impl Tpm2Tools {
    /// Use the TPM named by `tcti`, with files in `dir` (created if missing).
    pub fn new(tcti: Option<String>, dir: impl Into<PathBuf>) -> Self {
        Tpm2Tools {
            tcti,
            dir: dir.into(),
            ek_alg: "rsa",
            srk_alg: "rsa2048:aes128cfb",
        }
    }

    /// Create ECC (NIST P-256) keys instead of RSA 2048 when the EK and SRK are missing.
    pub fn with_ecc_keys(mut self, ecc_ek: bool, ecc_srk: bool) -> Self {
        if ecc_ek {
            self.ek_alg = "ecc";
        }
        if ecc_srk {
            self.srk_alg = "ecc256:aes128cfb";
        }
        self
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<Vec<u8>, TpmError> {
        let mut cmd = Command::new(tool);
        cmd.args(args);
        if let Some(t) = &self.tcti {
            cmd.env("TPM2TOOLS_TCTI", t);
        }
        let out = cmd.output().map_err(|e| TpmError::Spawn {
            tool: tool.to_string(),
            error: e.to_string(),
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
            return Err(TpmError::Tool {
                tool: format!("{tool} {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        Ok(out.stdout)
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<(), TpmError> {
        std::fs::write(self.path(name), data).map_err(|e| file_err(&self.path(name), e))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>, TpmError> {
        std::fs::read(self.path(name)).map_err(|e| file_err(&self.path(name), e))
    }

    /// Flush transient objects and sessions (a TPM without a resource manager has few slots).
    fn flush(&self) -> Result<(), TpmError> {
        self.run("tpm2_flushcontext", &["-t"])?;
        self.run("tpm2_flushcontext", &["-s"])?;
        Ok(())
    }

    fn persistent(&self) -> Result<String, TpmError> {
        Ok(
            String::from_utf8_lossy(&self.run("tpm2_getcap", &["handles-persistent"])?)
                .into_owned(),
        )
    }

    /// Make sure the EK and SRK exist at their persistent handles (creating them with the
    /// standard templates if not) and return their public areas.
    pub fn provision(&self) -> Result<TpmPublicKeys, TpmError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        self.flush()?;
        let handles = self.persistent()?.to_ascii_lowercase();
        if !handles.contains(EK_HANDLE) {
            self.run(
                "tpm2_createek",
                &["-c", EK_HANDLE, "-G", self.ek_alg, "-u", &self.p("ek.pub")],
            )?;
            self.flush()?;
        }
        if !handles.contains(SRK_HANDLE) {
            self.run(
                "tpm2_createprimary",
                &[
                    "-C",
                    "o",
                    "-g",
                    "sha256",
                    "-G",
                    self.srk_alg,
                    "-a",
                    "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
                    "-c",
                    &self.p("srk.ctx"),
                ],
            )?;
            self.run(
                "tpm2_evictcontrol",
                &["-C", "o", "-c", &self.p("srk.ctx"), SRK_HANDLE],
            )?;
            self.flush()?;
        }
        self.run(
            "tpm2_readpublic",
            &["-c", EK_HANDLE, "-o", &self.p("ek.pub")],
        )?;
        self.run(
            "tpm2_readpublic",
            &["-c", SRK_HANDLE, "-o", &self.p("srk.pub")],
        )?;
        Ok(TpmPublicKeys {
            endorsement_key: self.read("ek.pub")?,
            storage_root_key: self.read("srk.pub")?,
        })
    }

    /// Open dps's activation blob: `ActivateCredential` with the EK (under a PolicySecret
    /// session on the endorsement hierarchy) gives the inner wrap key, then `Import` puts the
    /// HMAC key under the SRK. The imported key's files stay in the work directory for
    /// [`Tpm2Tools::hmac`].
    pub fn import_activation(&self, blob: &[u8]) -> Result<(), TpmError> {
        let parts = ActivationParts::parse(blob)?;
        // tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
        let mut cred = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
        cred.extend_from_slice(&dps_core::tpm::tpm2b(&parts.id_object));
        cred.extend_from_slice(&dps_core::tpm::tpm2b(&parts.encrypted_secret));
        self.write("cred.in", &cred)?;
        self.write("idkey.dup", &dps_core::tpm::tpm2b(&parts.private))?;
        self.write("idkey.seed", &dps_core::tpm::tpm2b(&parts.encrypted_seed))?;
        self.write("idkey.pub", &dps_core::tpm::tpm2b(&parts.public))?;
        self.flush()?;
        let session = self.p("session.ctx");
        self.run(
            "tpm2_startauthsession",
            &["--policy-session", "-S", &session],
        )?;
        let activated = (|| {
            self.run("tpm2_policysecret", &["-S", &session, "-c", "e"])?;
            self.run(
                "tpm2_activatecredential",
                &[
                    "-c",
                    SRK_HANDLE,
                    "-C",
                    EK_HANDLE,
                    "-i",
                    &self.p("cred.in"),
                    "-o",
                    &self.p("inner.key"),
                    "-P",
                    &format!("session:{session}"),
                ],
            )
        })();
        let _ = self.run("tpm2_flushcontext", &[&session]);
        activated?;
        let imported = self.run(
            "tpm2_import",
            &[
                "-C",
                SRK_HANDLE,
                "-G",
                "hmac",
                "-u",
                &self.p("idkey.pub"),
                "-i",
                &self.p("idkey.dup"),
                "-s",
                &self.p("idkey.seed"),
                "-k",
                &self.p("inner.key"),
                "-r",
                &self.p("idkey.priv"),
            ],
        );
        // The inner key is no longer needed; do not leave it on disk.
        let _ = std::fs::remove_file(self.path("inner.key"));
        imported?;
        self.flush()
    }

    /// HMAC-SHA256 of `data` with the imported key, inside the TPM.
    pub fn hmac(&self, data: &[u8]) -> Result<[u8; 32], TpmError> {
        self.flush()?;
        self.run(
            "tpm2_load",
            &[
                "-C",
                SRK_HANDLE,
                "-u",
                &self.p("idkey.pub"),
                "-r",
                &self.p("idkey.priv"),
                "-c",
                &self.p("idkey.ctx"),
            ],
        )?;
        self.write("hmac.in", data)?;
        let mac = self.run(
            "tpm2_hmac",
            &[
                "-c",
                &self.p("idkey.ctx"),
                "-g",
                "sha256",
                "-o",
                &self.p("hmac.out"),
                &self.p("hmac.in"),
            ],
        );
        let flushed = self.flush();
        mac?;
        flushed?;
        let out = self.read("hmac.out")?;
        out.try_into().map_err(|v: Vec<u8>| TpmError::File {
            path: self.p("hmac.out"),
            error: format!("{} bytes, not 32", v.len()),
        })
    }
}

fn file_err(p: &Path, e: std::io::Error) -> TpmError {
    TpmError::File {
        path: p.display().to_string(),
        error: e.to_string(),
    }
}

/// A software TPM (`swtpm`, Debian package `swtpm`) in a child process, for tests and for
/// trying TPM attestation without hardware. The process ends when this value is dropped.
#[derive(Debug)]
pub struct Swtpm {
    child: std::process::Child,
    port: u16,
    state: PathBuf,
}

impl Swtpm {
    /// Start `swtpm` with its state in `state_dir` (kept across starts: the EK and SRK persist)
    /// on a free loopback port pair, and wait (up to 10 s) until it accepts connections.
    pub fn start(state_dir: impl Into<PathBuf>) -> Result<Self, TpmError> {
        let state = state_dir.into();
        std::fs::create_dir_all(&state).map_err(|e| file_err(&state, e))?;
        let mut last = None;
        for _ in 0..20 {
            let port = free_port_pair()?;
            let mut child = Command::new("swtpm")
                .args([
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    &format!("dir={}", state.display()),
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                    "--flags",
                    "not-need-init,startup-clear",
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| TpmError::Spawn {
                    tool: "swtpm".into(),
                    error: e.to_string(),
                })?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    // Lost the port race, or a real failure: try another pair.
                    let mut stderr = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        use std::io::Read;
                        let _ = e.read_to_string(&mut stderr);
                    }
                    last = Some(TpmError::Tool {
                        tool: "swtpm".into(),
                        status: status.to_string(),
                        stderr,
                    });
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Swtpm { child, port, state });
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TpmError::Tool {
                        tool: "swtpm".into(),
                        status: "not listening after 10 s".into(),
                        stderr: String::new(),
                    });
                }
                std::thread::park_timeout(std::time::Duration::from_millis(20));
            }
        }
        Err(last.unwrap_or(TpmError::Spawn {
            tool: "swtpm".into(),
            error: "no free port pair".into(),
        }))
    }

    /// The `TPM2TOOLS_TCTI` value that reaches it.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Its command (data) port; the control port is the next one.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port `p` such that `p` and `p + 1` were both free just now.
fn free_port_pair() -> Result<u16, TpmError> {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| TpmError::Spawn {
            tool: "swtpm".into(),
            error: e.to_string(),
        })?;
        let p = l.local_addr().map(|a| a.port()).unwrap_or(0);
        if p != 0 && p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(TpmError::Spawn {
        tool: "swtpm".into(),
        error: "no free port pair".into(),
    })
}

/// Are `swtpm` and `tpm2-tools` installed?
pub fn tools_available() -> bool {
    ["swtpm", "tpm2_createek", "tpm2_import"].iter().all(|t| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(t).is_file()))
    })
}
