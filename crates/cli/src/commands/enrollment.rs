//! `dps enrollment …`: individual enrollments (service API). Their subcommands and code are those
//! of [`super::enrollment_common`], shared with enrollment groups; here is what is their own: the
//! `--device-id` flag and the help texts.

use super::enrollment_common::{Kind, KindCommand, KindHelp, NounArgs};
use clap::Args;

/// `dps enrollment …`
pub type EnrollmentCommand = KindCommand<DeviceIdArg>;

/// The flag of `dps enrollment create|update` that groups do not have.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceIdArg {
    /// Device id on the hub.
    #[arg(long)]
    pub device_id: Option<String>,
}

impl NounArgs for DeviceIdArg {
    const KIND: Kind = Kind::Enrollment;
    fn doc_field(&self) -> Option<(&'static str, String)> {
        self.device_id.clone().map(|d| ("deviceId", d))
    }
}

/// The help texts of `dps enrollment …`.
pub(crate) const HELP: KindHelp = KindHelp {
    list: "List individual enrollments",
    show: "Show one enrollment",
    create: "Create an enrollment (fails if it exists)",
    update: "Update an enrollment (read, change, write with If-Match)",
    delete: "Delete an enrollment",
    id: "Registration id",
    flag: "device_id",
    flag_create: "Device id on the hub (default: the registration id)",
    flag_update: "Device id on the hub",
};
