//! Reprovisioning rules (protocol digest §9.4): what a registration of an already-registered
//! device does, and which substatus it reports.

use crate::model::{ReprovisionPolicy, Substatus};

/// What to do with a registration, given the previous assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// First registration (or the record was deleted): allocate, create with the initial twin.
    Initial,
    /// `updateHubAssignment = false`: keep the current hub (make sure the identity exists).
    KeepCurrent {
        /// Current hub.
        hub: String,
    },
    /// Allocate again; if the hub changes, migrate or reset the twin.
    Reallocate {
        /// Previous hub.
        previous_hub: String,
        /// Carry the twin from the old hub.
        migrate: bool,
    },
}

/// Decide the plan from the previous assigned hub (if any) and the enrollment's policy.
pub fn plan(previous_hub: Option<&str>, policy: ReprovisionPolicy) -> Plan {
    match previous_hub {
        None => Plan::Initial,
        Some(h) if !policy.update_hub_assignment => Plan::KeepCurrent { hub: h.to_string() },
        Some(h) => Plan::Reallocate {
            previous_hub: h.to_string(),
            migrate: policy.migrate_device_data,
        },
    }
}

/// The outcome of applying a plan once the new hub is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Substatus to report.
    pub substatus: Substatus,
    /// Write the initial twin on the (new) hub.
    pub write_initial_twin: bool,
    /// Copy the twin from the old hub.
    pub migrate_from: Option<String>,
    /// Remove the identity from this hub afterwards.
    pub remove_from: Option<String>,
}

/// Apply a plan. `history` is the list of hubs the device was assigned to before (oldest first).
pub fn outcome(
    plan: &Plan,
    new_hub: &str,
    history: &[String],
    previous_substatus: Option<Substatus>,
) -> Outcome {
    match plan {
        Plan::Initial => Outcome {
            substatus: Substatus::InitialAssignment,
            write_initial_twin: true,
            migrate_from: None,
            remove_from: None,
        },
        Plan::KeepCurrent { .. } => Outcome {
            substatus: previous_substatus.unwrap_or(Substatus::InitialAssignment),
            write_initial_twin: false,
            migrate_from: None,
            remove_from: None,
        },
        Plan::Reallocate {
            previous_hub,
            migrate,
        } => {
            if previous_hub.eq_ignore_ascii_case(new_hub) {
                // Same hub: keep the identity and twin; a reset policy re-applies the initial twin.
                return Outcome {
                    substatus: if *migrate {
                        previous_substatus.unwrap_or(Substatus::InitialAssignment)
                    } else {
                        Substatus::DeviceDataReset
                    },
                    write_initial_twin: !*migrate,
                    migrate_from: None,
                    remove_from: None,
                };
            }
            let back_to_first = history
                .first()
                .is_some_and(|h| h.eq_ignore_ascii_case(new_hub));
            let substatus = if back_to_first {
                Substatus::ReprovisionedToInitialAssignment
            } else if *migrate {
                Substatus::DeviceDataMigrated
            } else {
                Substatus::DeviceDataReset
            };
            Outcome {
                substatus,
                write_initial_twin: !*migrate,
                migrate_from: if *migrate {
                    Some(previous_hub.clone())
                } else {
                    None
                },
                remove_from: Some(previous_hub.clone()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATE: ReprovisionPolicy = ReprovisionPolicy {
        update_hub_assignment: true,
        migrate_device_data: true,
    };
    const RESET: ReprovisionPolicy = ReprovisionPolicy {
        update_hub_assignment: true,
        migrate_device_data: false,
    };
    const NEVER: ReprovisionPolicy = ReprovisionPolicy {
        update_hub_assignment: false,
        migrate_device_data: true,
    };

    #[test]
    fn first_registration_is_initial_assignment() {
        let p = plan(None, MIGRATE);
        assert_eq!(p, Plan::Initial);
        let o = outcome(&p, "a", &[], None);
        assert_eq!(o.substatus, Substatus::InitialAssignment);
        assert!(o.write_initial_twin);
    }

    #[test]
    fn migrate_moves_twin_and_removes_old() {
        let p = plan(Some("a"), MIGRATE);
        let o = outcome(&p, "b", &["a".into()], Some(Substatus::InitialAssignment));
        assert_eq!(
            o,
            Outcome {
                substatus: Substatus::DeviceDataMigrated,
                write_initial_twin: false,
                migrate_from: Some("a".into()),
                remove_from: Some("a".into())
            }
        );
    }

    #[test]
    fn reset_writes_initial_twin() {
        let p = plan(Some("a"), RESET);
        let o = outcome(&p, "b", &["x".into(), "a".into()], None);
        assert_eq!(o.substatus, Substatus::DeviceDataReset);
        assert!(o.write_initial_twin && o.migrate_from.is_none());
        // Reset on the same hub is a factory reset.
        let o = outcome(&p, "a", &["a".into()], None);
        assert_eq!(o.substatus, Substatus::DeviceDataReset);
        assert!(o.write_initial_twin && o.remove_from.is_none());
    }

    #[test]
    fn never_keeps_the_hub() {
        let p = plan(Some("a"), NEVER);
        assert_eq!(p, Plan::KeepCurrent { hub: "a".into() });
        assert_eq!(
            outcome(&p, "a", &[], Some(Substatus::DeviceDataMigrated)).substatus,
            Substatus::DeviceDataMigrated
        );
    }

    #[test]
    fn moving_back_to_the_first_hub() {
        let p = plan(Some("b"), MIGRATE);
        let o = outcome(&p, "a", &["a".into(), "b".into()], None);
        assert_eq!(o.substatus, Substatus::ReprovisionedToInitialAssignment);
    }

    #[test]
    fn same_hub_keeps_substatus() {
        let p = plan(Some("a"), MIGRATE);
        let o = outcome(&p, "A", &["a".into()], Some(Substatus::InitialAssignment));
        assert_eq!(o.substatus, Substatus::InitialAssignment);
        assert!(!o.write_initial_twin && o.remove_from.is_none());
    }
}
