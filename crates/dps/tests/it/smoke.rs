use crate::support::*;

#[tokio::test]
async fn an_individual_symmetric_key_device_registers_and_is_assigned() {
    let s = TestServer::spawn().await;
    let key = s.enroll("smoke-dev-1", serde_json::json!({})).await;
    let r = s.register("smoke-dev-1", &key, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "assigned");
    let hub = r.body["registrationState"]["assignedHub"].as_str().unwrap();
    assert!(
        hub == "hub-a.example.net" || hub == "hub-b.example.net",
        "{hub}"
    );
    assert_eq!(r.body["registrationState"]["deviceId"], "smoke-dev-1");
}

/// The server prefers the SHA-256 suites (cheaper handshakes and records) whatever the client's
/// order, and still serves a client that offers only AES-256.
#[tokio::test]
async fn the_server_prefers_aes_128_gcm_sha256_and_still_serves_aes_256_only_clients() {
    use std::sync::Arc;
    let s = TestServer::spawn().await;
    let connect = |suites: Vec<rustls::SupportedCipherSuite>,
                   versions: Vec<&'static rustls::SupportedProtocolVersion>| {
        let ca = s.ca_pem.clone();
        let port = s.server.https.port();
        async move {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls_pki_types::pem::PemObject::from_pem_slice(ca.as_bytes()).unwrap())
                .unwrap();
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider.cipher_suites = suites;
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .unwrap();
            tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
        }
    };
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    use rustls::CipherSuite as C;
    // The client's own default order puts AES-256 first.
    let all = rustls::crypto::aws_lc_rs::default_provider().cipher_suites;
    assert_eq!(all[0].suite(), C::TLS13_AES_256_GCM_SHA384);
    assert_eq!(
        connect(all.clone(), vec![&rustls::version::TLS13]).await,
        C::TLS13_AES_128_GCM_SHA256
    );
    assert_eq!(
        connect(all, vec![&rustls::version::TLS12]).await,
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
    );
    assert_eq!(
        connect(
            vec![cs::TLS13_AES_256_GCM_SHA384],
            vec![&rustls::version::TLS13]
        )
        .await,
        C::TLS13_AES_256_GCM_SHA384
    );
}

/// Beyond `max_pending_handshakes`, a new connection is closed at once (the device retries),
/// and the place is free again when a handshake ends.
#[tokio::test]
async fn connections_beyond_the_pending_handshake_limit_are_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let s = TestServer::spawn_with(|cfg| cfg.limits.max_pending_handshakes = 1).await;
    let port = s.server.https.port();
    // Holds the only place: connected, but no ClientHello yet.
    let holder = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // Wait until the server has accepted it (the place is taken): a second connection is then
    // closed by the server without a byte.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(std::time::Duration::from_millis(200), c.read(&mut buf)).await;
        if matches!(r, Ok(Ok(0)) | Ok(Err(_))) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection was shed"
        );
    }
    // The held connection goes away: its handshake fails, the place is free, TLS works again.
    drop(holder);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (head, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.try_raw_exchange(
                "GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
            ),
        )
        .await
        .unwrap_or_default();
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "TLS never came back: {head}"
        );
    }
}
