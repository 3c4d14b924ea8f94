//! The MQTT listeners: MQTT over TLS (own accept loop, peer chain captured) and MQTT over
//! WebSocket (upgraded on the HTTPS listener), both served by `dps_mqtt` over the engine.

use crate::app::App;
use crate::connections::{Slot, Slots};
use axum::extract::ws::WebSocket;
use dps_core::device::{DeviceService, Transport};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Serve MQTT over TLS. `slots` is the MQTT connection cap (`max_mqtt_connections`), shared
/// with MQTT over WebSocket; a connection beyond it is closed before the handshake.
pub async fn serve_mqtt(
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
        name: "mqtt",
        handshake_timeout,
        max_pending_handshakes,
        faults: Some(app.engine.clone()),
    };
    let admit = move |peer| {
        let g = slots.try_acquire(crate::connections::listener::MQTT);
        if g.is_none() {
            tracing::warn!(%peer, "MQTT connection refused: max_mqtt_connections reached");
        }
        g
    };
    tls.serve(admit, move |tls, certs, peer| {
        let app = app.clone();
        async move {
            let svc: Arc<dyn DeviceService> = app.engine.clone();
            if let Err(e) = dps_mqtt::serve_connection(
                tls,
                Some(peer.ip()),
                certs,
                Transport::Mqtt,
                svc,
                app.mqtt_limits.clone(),
            )
            .await
            {
                tracing::debug!(%peer, error = %e, "MQTT connection closed");
            }
        }
    })
    .await;
}

/// Serve MQTT over an upgraded WebSocket from `peer`; `slot` is its place among the MQTT
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
    if let Err(e) = dps_mqtt::serve_connection(
        crate::connections::websocket_bytes(socket),
        peer,
        certs,
        Transport::MqttWs,
        svc,
        app.mqtt_limits.clone(),
    )
    .await
    {
        tracing::debug!(error = %e, "MQTT over WebSocket closed");
    }
}
