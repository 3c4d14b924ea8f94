//! The AMQP listeners: AMQP 1.0 over TLS (own accept loop, peer chain captured) and AMQP over
//! WebSocket (subprotocol `AMQPWSB10`, upgraded on the HTTPS listener beside MQTT over
//! WebSocket), both served by `dps_amqp` over the engine.

use crate::app::App;
use crate::connections::{Slot, Slots};
use axum::extract::ws::WebSocket;
use dps_core::device::{DeviceService, Transport};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Serve AMQP over TLS. `slots` is the AMQP connection cap (`max_amqp_connections`), shared
/// with AMQP over WebSocket; a connection beyond it is closed before the handshake.
pub async fn serve_amqp(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    handshake_timeout: Duration,
    slots: Slots,
    max_pending_handshakes: usize,
) {
    let tls = crate::tls::TlsListener {
        listener,
        acceptor,
        name: "amqp",
        handshake_timeout,
        max_pending_handshakes,
        faults: Some(app.engine.clone()),
    };
    let admit = move |peer| {
        let g = slots.try_acquire(crate::connections::listener::AMQP);
        if g.is_none() {
            tracing::warn!(%peer, "AMQP connection refused: max_amqp_connections reached");
        }
        g
    };
    tls.serve(admit, move |tls, certs, peer| {
        let app = app.clone();
        async move {
            let svc: Arc<dyn DeviceService> = app.engine.clone();
            if let Err(e) = dps_amqp::serve_connection(
                tls,
                Some(peer.ip()),
                certs,
                Transport::Amqp,
                svc,
                app.amqp_limits.clone(),
            )
            .await
            {
                tracing::debug!(%peer, error = %e, "AMQP connection closed");
            }
        }
    })
    .await;
}

/// Serve AMQP over an upgraded WebSocket from `peer`; `slot` is its place among the AMQP
/// connections, held until the connection ends.
pub async fn serve_ws(
    app: Arc<App>,
    socket: WebSocket,
    peer: Option<std::net::IpAddr>,
    certs: Vec<Vec<u8>>,
    slot: Option<Slot>,
) {
    let _slot = slot;
    let svc: Arc<dyn DeviceService> = app.engine.clone();
    if let Err(e) = dps_amqp::serve_connection(
        crate::connections::websocket_bytes(socket),
        peer,
        certs,
        Transport::AmqpWs,
        svc,
        app.amqp_limits.clone(),
    )
    .await
    {
        tracing::debug!(error = %e, "AMQP over WebSocket closed");
    }
}
