//! `dps enrollment-group …`: enrollment groups (service API). Their subcommands and code are
//! those of [`super::enrollment_common`], shared with individual enrollments; here is what is
//! their own: the `--root-ca-name` flag and the help texts.

use super::enrollment_common::{Kind, KindCommand, KindHelp, NounArgs};
use clap::Args;

/// `dps enrollment-group …`
pub type GroupCommand = KindCommand<RootCaArg>;

/// The flag of `dps enrollment-group create|update` that individual enrollments do not have.
#[derive(Args, Debug, Clone, Default)]
pub struct RootCaArg {
    /// Name of a verified CA certificate of the instance.
    #[arg(long)]
    pub root_ca_name: Option<String>,
}

impl NounArgs for RootCaArg {
    const KIND: Kind = Kind::Group;
    fn root_ca_name(&self) -> Option<&str> {
        self.root_ca_name.as_deref()
    }
}

/// The help texts of `dps enrollment-group …`.
pub(crate) const HELP: KindHelp = KindHelp {
    list: "List enrollment groups",
    show: "Show one group",
    create: "Create a group (fails if it exists)",
    update: "Update a group (read, change, write with If-Match)",
    delete: "Delete a group",
    id: "Group id",
    flag: "root_ca_name",
    flag_create: "Name of a verified CA certificate of the instance (x509 caReferences)",
    flag_update: "Name of a verified CA certificate of the instance",
};
