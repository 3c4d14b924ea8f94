//! The commands, one module per noun of [`crate::Command`]: each holds that noun's arguments
//! and the code that runs them. Individual enrollments and enrollment groups share theirs in
//! [`enrollment_common`]. (`dps bench`, the load generator, is [`crate::bench`].)

pub(crate) mod access_policy;
pub(crate) mod audit;
pub(crate) mod certificate;
pub(crate) mod device;
pub(crate) mod enrollment;
pub(crate) mod enrollment_common;
pub(crate) mod enrollment_group;
pub(crate) mod events;
pub(crate) mod fault;
pub(crate) mod hub;
pub(crate) mod instance;
pub(crate) mod linked_hub;
pub(crate) mod registration;

use crate::service::{svc_path, Service};
use crate::{Command, Globals};
use anyhow::{bail, Result};
use hub::HubCommand;
use reqwest::Method;
use std::process::ExitCode;

/// Run a command of the service or admin API (all but `serve`, `device` and `bench`).
pub(crate) async fn dispatch(g: &Globals, cmd: Command) -> Result<ExitCode> {
    let svc = g.service()?;
    match cmd {
        Command::Instance(c) => instance::run(g, &svc, c).await,
        Command::LinkedHub(c) => linked_hub::run(g, &svc, c).await,
        Command::Enrollment(c) => enrollment_common::run(g, &svc, c).await,
        Command::EnrollmentGroup(c) => enrollment_common::run(g, &svc, c).await,
        Command::Registration(c) => registration::run(g, &svc, c).await,
        Command::Hub(HubCommand::Device(c)) => hub::run(g, &svc, c).await,
        Command::Hub(HubCommand::Cleanup(c)) => hub::run_cleanup(g, &svc, c).await,
        Command::Audit(c) => audit::run(g, &svc, c).await,
        Command::Events(c) => events::run(g, &svc, c).await,
        Command::Certificate(c) => certificate::run(g, &svc, c).await,
        Command::AccessPolicy(c) => access_policy::run(g, &svc, c).await,
        Command::Fault(c) => fault::run(g, &svc, c).await,
        _ => bail!("unsupported command"),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Delete a service-API document (an enrollment, a group, a registration), only if its etag
/// still matches when one is given.
async fn delete_doc(svc: &Service, path: &str, etag: Option<String>) -> Result<()> {
    let headers: Vec<(&str, String)> = etag.map(|e| ("If-Match", e)).into_iter().collect();
    svc.call(Method::DELETE, &svc_path(path, &[]), None, &headers)
        .await?;
    Ok(())
}
