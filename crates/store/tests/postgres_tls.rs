//! PostgreSQL over TLS (`dps_store::pg_tls`) against a private PostgreSQL cluster: `initdb` into
//! a temp dir, a free port, `ssl=on` with a server certificate (for `localhost` and
//! `127.0.0.1`) from a CA generated here, and a `pg_hba.conf` that accepts TLS connections only
//! (`hostssl`).
//!
//! Needs PostgreSQL's server binaries (`initdb`, `pg_ctl`: on `PATH` or under
//! `/usr/lib/postgresql/*/bin`). Without them the test fails under `CI=true` and is skipped,
//! with the reason printed, elsewhere. Run as root, the cluster runs as the `postgres` user
//! (`runuser`), since PostgreSQL refuses to run as root.
//!
//! Run: `cargo test -p dps-store --test postgres_tls -- --nocapture`

use std::path::{Path, PathBuf};
use std::process::Command;

use dps_store::PostgresStore;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

fn find_bin(name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.is_file())
        .collect();
    versions.sort();
    versions.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as the cluster's owner.
fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn params(cn: &str, ca: bool, sans: &[&str]) -> CertificateParams {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(30);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    } else {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    }
    p
}

/// The private cluster; stopped on drop.
struct Cluster {
    pg_ctl: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut c = pg_command(&self.pg_ctl, self.as_postgres);
        c.args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data);
        let _ = c.output();
    }
}

fn start_cluster(initdb: &Path, pg_ctl: &Path) -> Cluster {
    let as_postgres = is_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().to_path_buf();
    // Certificates: a CA, a server certificate it signs, and an unrelated CA.
    let ca = CertifiedIssuer::self_signed(
        params("dps test PostgreSQL CA", true, &[]),
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    let server = CertifiedIssuer::signed_by(
        params("localhost", false, &["localhost", "127.0.0.1"]),
        KeyPair::generate().unwrap(),
        &ca,
    )
    .unwrap();
    let other_ca = CertifiedIssuer::self_signed(
        params("some other CA", true, &[]),
        KeyPair::generate().unwrap(),
    )
    .unwrap();
    std::fs::write(base.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(base.join("other-ca.pem"), other_ca.pem()).unwrap();
    std::fs::write(base.join("server.crt"), server.pem()).unwrap();
    std::fs::write(base.join("server.key"), server.key().serialize_pem()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            base.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    if as_postgres {
        let mut c = Command::new("chown");
        c.args(["-R", "postgres:postgres"]).arg(&base);
        run(c, "chown");
    }
    let data = base.join("data");
    let mut c = pg_command(initdb, as_postgres);
    c.args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
    run(c, "initdb");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().unwrap().port()
    };
    let conf = format!(
        "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
         ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nfsync = off\n",
        base.display(),
        base.join("server.crt").display(),
        base.join("server.key").display(),
    );
    let mut pc = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    pc.push_str(&conf);
    std::fs::write(data.join("postgresql.conf"), pc).unwrap();
    // TLS only over TCP.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let mut c = pg_command(pg_ctl, as_postgres);
    c.args(["start", "-w", "-t", "60", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(base.join("log"));
    run(c, "pg_ctl start");
    Cluster {
        pg_ctl: pg_ctl.to_path_buf(),
        data,
        as_postgres,
        port,
        dir,
    }
}

#[tokio::test]
async fn postgres_over_tls_with_each_sslmode() {
    let (Some(initdb), Some(pg_ctl)) = (find_bin("initdb"), find_bin("pg_ctl")) else {
        let reason = "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or under \
                      /usr/lib/postgresql/*/bin";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{reason} (required under CI=true)");
        }
        println!("SKIPPED postgres_over_tls_with_each_sslmode: {reason}");
        return;
    };
    let cluster = start_cluster(&initdb, &pg_ctl);
    let dir = cluster.dir.path();
    let port = cluster.port;
    let ca = dir.join("ca.pem");
    let other = dir.join("other-ca.pem");
    let url =
        |host: &str, query: &str| format!("postgres://postgres@{host}:{port}/postgres{query}");

    // require: encrypted, certificate not checked.
    let s = PostgresStore::open(&url("127.0.0.1", "?sslmode=require"))
        .await
        .expect("sslmode=require connects");
    drop(s);
    // No sslmode: prefer, which uses TLS when offered (the server accepts nothing else).
    let s = PostgresStore::open(&url("127.0.0.1", ""))
        .await
        .expect("the default (prefer) connects over TLS");
    drop(s);
    // verify-full with the right CA, by IP address and by DNS name.
    for host in ["127.0.0.1", "localhost"] {
        let q = format!("?sslmode=verify-full&sslrootcert={}", ca.display());
        let s = PostgresStore::open(&url(host, &q))
            .await
            .unwrap_or_else(|e| panic!("verify-full to {host} with the right CA: {e}"));
        drop(s);
    }
    // verify-ca with the right CA.
    let q = format!("?sslmode=verify-ca&sslrootcert={}", ca.display());
    PostgresStore::open(&url("127.0.0.1", &q))
        .await
        .expect("verify-ca with the right CA");

    // verify-full (and verify-ca) with another CA: refused, saying why.
    for mode in ["verify-full", "verify-ca"] {
        let q = format!("?sslmode={mode}&sslrootcert={}", other.display());
        let e = PostgresStore::open(&url("127.0.0.1", &q))
            .await
            .expect_err("a server certificate from another CA must be refused");
        let msg = e.to_string();
        assert!(
            msg.contains("TLS") && msg.contains("certificate") && msg.contains("UnknownIssuer"),
            "{mode}: the error should say the certificate is not trusted: {msg}"
        );
    }
    // require with a wrong sslrootcert verifies the chain too (libpq's rule).
    let q = format!("?sslmode=require&sslrootcert={}", other.display());
    assert!(PostgresStore::open(&url("127.0.0.1", &q)).await.is_err());

    // disable against a hostssl-only server: refused by pg_hba.conf.
    let e = PostgresStore::open(&url("127.0.0.1", "?sslmode=disable"))
        .await
        .expect_err("a plain connection must be refused by a hostssl-only server");
    let msg = e.to_string();
    assert!(
        msg.contains("pg_hba.conf") && msg.contains("no encryption"),
        "the error should carry the server's reason: {msg}"
    );

    // A PostgreSQL on the same machine over its Unix socket (the socket's directory as the
    // URL's host, percent-encoded, as libpq takes it): no TLS (there is none on a Unix socket,
    // as with libpq), and `pg_hba.conf`'s `local` line admits it.
    let socket_dir: String = percent_encoding::utf8_percent_encode(
        &dir.display().to_string(),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string();
    let s = PostgresStore::open(&url(&socket_dir, ""))
        .await
        .expect("the Unix socket, sslmode=prefer (the default)");
    use dps_core::store::Store as _;
    s.append_audit(dps_core::store::AuditEntry {
        timestamp: "2026-12-04T00:00:00.0000000Z".into(),
        action: "unix.socket".into(),
        ..Default::default()
    })
    .await
    .expect("a write over the Unix socket");
    drop(s);

    // A verifying mode without a CA is a configuration error, named.
    let e = PostgresStore::open(&url("127.0.0.1", "?sslmode=verify-full"))
        .await
        .expect_err("verify-full without sslrootcert");
    assert!(e.to_string().contains("sslrootcert"), "{e}");
}
