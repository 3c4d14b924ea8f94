//! Register one device and print where it landed.
//!
//! ```text
//! cargo run -p dps-device --example register -- \
//!     <host:port> <id-scope> <registration-id> <key> [ca.pem] [https|mqtt]
//! ```
//! The key is an individual enrollment's symmetric key. Prefix it with `group:` to use an
//! enrollment group's key (the device key is then derived from it).

use dps_device::{Auth, ProvisioningClient, Transport, Trust};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!(
            "usage: register <host:port> <id-scope> <registration-id> <key|group:KEY> [ca.pem] [https|mqtt]"
        );
        return std::process::ExitCode::from(2);
    }
    let auth = match args[3].strip_prefix("group:") {
        Some(g) => Auth::GroupKey(g.to_string()),
        None => Auth::SymmetricKey(args[3].clone()),
    };
    let trust = match args.get(4) {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Trust::SystemAndPem(pem),
            Err(e) => {
                eprintln!("cannot read {path}: {e}");
                return std::process::ExitCode::from(2);
            }
        },
        None => Trust::System,
    };
    let transport = match args.get(5).map(String::as_str) {
        Some("mqtt") => Transport::Mqtt,
        _ => Transport::Https,
    };
    let client = match ProvisioningClient::builder()
        .global_endpoint(args[0].as_str())
        .id_scope(args[1].as_str())
        .registration_id(args[2].as_str())
        .auth(auth)
        .trust(trust)
        .transport(transport)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    match client.register().await {
        Ok(r) => {
            println!(
                "assigned: hub={} deviceId={} substatus={:?} in {:?}",
                r.assigned_hub().unwrap_or("?"),
                r.device_id().unwrap_or("?"),
                r.state.substatus,
                r.timing.elapsed
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("not assigned: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
