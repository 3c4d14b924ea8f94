//! CA certificates of an instance (proof-of-possession verification) and the revocation deny
//! list, under `/admin/instances/{name}/certificates` and `/admin/instances/{name}/denylist`.

use crate::app::App;
use crate::service_api::Caller;
use axum::body::Body;
use axum::http::{Method, Response};
use dps_core::Error;

/// Handle certificate routes (filled in by the X.509 work).
pub async fn handle(
    _app: &App,
    _caller: &Caller,
    method: &Method,
    _body: &[u8],
    segs: &[String],
    _l: &[&str],
) -> Result<Response<Body>, Error> {
    Err(Error::Unsupported(format!(
        "no admin API route for {method} /{}",
        segs.join("/")
    )))
}
