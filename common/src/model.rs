//! Domain types that cross the wire, with their conversions to and from the
//! prost types. Receivers expect junk: `TryFrom<proto::X>` names the missing
//! or invalid field.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::proto;

/// An operation an agent may permit. Probes are always permitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Backup,
    Restore,
    Replica,
    Promote,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Backup,
        Operation::Restore,
        Operation::Replica,
        Operation::Promote,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Backup => "backup",
            Operation::Restore => "restore",
            Operation::Replica => "replica",
            Operation::Promote => "promote",
        }
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Operation> for proto::Operation {
    fn from(operation: Operation) -> Self {
        match operation {
            Operation::Backup => proto::Operation::Backup,
            Operation::Restore => proto::Operation::Restore,
            Operation::Replica => proto::Operation::Replica,
            Operation::Promote => proto::Operation::Promote,
        }
    }
}

impl TryFrom<i32> for Operation {
    type Error = Error;
    fn try_from(value: i32) -> Result<Self, Error> {
        match proto::Operation::try_from(value) {
            Ok(proto::Operation::Backup) => Ok(Operation::Backup),
            Ok(proto::Operation::Restore) => Ok(Operation::Restore),
            Ok(proto::Operation::Replica) => Ok(Operation::Replica),
            Ok(proto::Operation::Promote) => Ok(Operation::Promote),
            _ => Err(Error::protocol(
                "operation",
                format!("unknown value {value}"),
            )),
        }
    }
}

impl From<crate::identity::Role> for proto::OperatorRole {
    fn from(role: crate::identity::Role) -> Self {
        match role {
            crate::identity::Role::Viewer => proto::OperatorRole::Viewer,
            crate::identity::Role::Operator => proto::OperatorRole::Operator,
            crate::identity::Role::Admin => proto::OperatorRole::Admin,
        }
    }
}

/// The operator role carried in a request's `role` field.
pub fn role_from_wire(value: i32) -> Result<crate::identity::Role, Error> {
    match proto::OperatorRole::try_from(value) {
        Ok(proto::OperatorRole::Viewer) => Ok(crate::identity::Role::Viewer),
        Ok(proto::OperatorRole::Operator) => Ok(crate::identity::Role::Operator),
        Ok(proto::OperatorRole::Admin) => Ok(crate::identity::Role::Admin),
        _ => Err(Error::protocol("role", "use viewer, operator or admin")),
    }
}

/// Converts received probes, dropping (and logging) any that are invalid.
pub fn probes_from_wire(probes: Vec<proto::InstanceProbe>) -> Vec<InstanceProbe> {
    probes
        .into_iter()
        .filter_map(|probe| match InstanceProbe::try_from(probe) {
            Ok(probe) => Some(probe),
            Err(error) => {
                tracing::warn!(%error, "dropping an invalid probe");
                None
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationRole {
    Unknown,
    Primary,
    Standby,
}

/// One probe of one PostgreSQL instance (see `probe.proto` for each field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceProbe {
    pub instance: String,
    pub probed_at: DateTime<Utc>,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    pub select1_rtt_micros: u64,
    pub server_version: String,
    pub server_version_num: u32,
    pub uptime_seconds: u64,
    pub in_recovery: bool,
    pub role: ReplicationRole,
    pub standbys: Vec<StandbyLag>,
    pub receiver: Option<ReceiverLag>,
    pub databases: Vec<DatabaseSize>,
    pub data_directory_disk: Option<DiskSpace>,
    pub archiver: Option<ArchiverStatus>,
    pub connections: u32,
    pub max_connections: u32,
    /// The cluster's system identifier, in decimal; empty when unknown.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub system_identifier: String,
}

/// Checks a reported system identifier: empty (unknown) or the decimal
/// form of a 64-bit number, as `pg_control_system()` gives it. `field`
/// names it in the error.
pub fn check_system_identifier(field: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.parse::<u64>().is_ok_and(|n| n.to_string() == value) {
        Ok(())
    } else {
        Err(Error::protocol(
            field,
            "not a system identifier: expected the decimal number pg_control_system() reports",
        ))
    }
}

impl InstanceProbe {
    /// A probe that could not reach the instance.
    pub fn unreachable(instance: &str, probed_at: DateTime<Utc>, error: String) -> Self {
        InstanceProbe {
            instance: instance.to_string(),
            probed_at,
            reachable: false,
            error: Some(error),
            select1_rtt_micros: 0,
            server_version: String::new(),
            server_version_num: 0,
            uptime_seconds: 0,
            in_recovery: false,
            role: ReplicationRole::Unknown,
            standbys: Vec::new(),
            receiver: None,
            databases: Vec::new(),
            data_directory_disk: None,
            archiver: None,
            connections: 0,
            max_connections: 0,
            system_identifier: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandbyLag {
    pub application_name: String,
    pub client_address: String,
    pub state: String,
    pub replay_lag_bytes: u64,
    pub replay_lag_seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiverLag {
    pub replay_lag_bytes: u64,
    pub replay_lag_seconds: Option<f64>,
    pub streaming: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatabaseSize {
    pub name: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskSpace {
    pub path: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchiverStatus {
    pub archived_count: u64,
    pub failed_count: u64,
    pub last_failed_wal: String,
    pub last_failed_at: Option<DateTime<Utc>>,
}

/// Milliseconds since the Unix epoch to a time; `None` for 0 or out of range.
pub fn time_from_unix_ms(ms: i64) -> Option<DateTime<Utc>> {
    if ms == 0 {
        return None;
    }
    Utc.timestamp_millis_opt(ms).single()
}

impl From<InstanceProbe> for proto::InstanceProbe {
    fn from(p: InstanceProbe) -> Self {
        proto::InstanceProbe {
            instance: p.instance,
            probed_at_unix_ms: p.probed_at.timestamp_millis(),
            reachable: p.reachable,
            error: p.error.unwrap_or_default(),
            select1_rtt_micros: p.select1_rtt_micros,
            server_version: p.server_version,
            server_version_num: p.server_version_num,
            uptime_seconds: p.uptime_seconds,
            in_recovery: p.in_recovery,
            role: match p.role {
                ReplicationRole::Unknown => proto::ReplicationRole::Unspecified,
                ReplicationRole::Primary => proto::ReplicationRole::Primary,
                ReplicationRole::Standby => proto::ReplicationRole::Standby,
            } as i32,
            standbys: p
                .standbys
                .into_iter()
                .map(|s| proto::StandbyLag {
                    application_name: s.application_name,
                    client_address: s.client_address,
                    state: s.state,
                    replay_lag_bytes: s.replay_lag_bytes,
                    replay_lag_seconds: s.replay_lag_seconds,
                })
                .collect(),
            receiver: p.receiver.map(|r| proto::ReceiverLag {
                replay_lag_bytes: r.replay_lag_bytes,
                replay_lag_seconds: r.replay_lag_seconds,
                streaming: r.streaming,
            }),
            databases: p
                .databases
                .into_iter()
                .map(|d| proto::DatabaseSize {
                    name: d.name,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            data_directory_disk: p.data_directory_disk.map(|d| proto::DiskSpace {
                path: d.path,
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
            }),
            archiver: p.archiver.map(|a| proto::ArchiverStatus {
                archived_count: a.archived_count,
                failed_count: a.failed_count,
                last_failed_wal: a.last_failed_wal,
                last_failed_at_unix_ms: a.last_failed_at.map(|t| t.timestamp_millis()).unwrap_or(0),
            }),
            connections: p.connections,
            max_connections: p.max_connections,
            system_identifier: p.system_identifier,
        }
    }
}

impl TryFrom<proto::InstanceProbe> for InstanceProbe {
    type Error = Error;
    fn try_from(p: proto::InstanceProbe) -> Result<Self, Error> {
        crate::names::InstanceName::new(p.instance.as_str())
            .map_err(|e| Error::protocol("instance", e.to_string()))?;
        check_system_identifier("system_identifier", &p.system_identifier)?;
        let probed_at = time_from_unix_ms(p.probed_at_unix_ms)
            .ok_or_else(|| Error::protocol("probed_at_unix_ms", "missing or out of range"))?;
        let role = match proto::ReplicationRole::try_from(p.role) {
            Ok(proto::ReplicationRole::Primary) => ReplicationRole::Primary,
            Ok(proto::ReplicationRole::Standby) => ReplicationRole::Standby,
            Ok(proto::ReplicationRole::Unspecified) => ReplicationRole::Unknown,
            Err(_) => return Err(Error::protocol("role", format!("unknown value {}", p.role))),
        };
        Ok(InstanceProbe {
            instance: p.instance,
            probed_at,
            reachable: p.reachable,
            error: (!p.error.is_empty()).then_some(p.error),
            select1_rtt_micros: p.select1_rtt_micros,
            server_version: p.server_version,
            server_version_num: p.server_version_num,
            uptime_seconds: p.uptime_seconds,
            in_recovery: p.in_recovery,
            role,
            standbys: p
                .standbys
                .into_iter()
                .map(|s| StandbyLag {
                    application_name: s.application_name,
                    client_address: s.client_address,
                    state: s.state,
                    replay_lag_bytes: s.replay_lag_bytes,
                    replay_lag_seconds: s.replay_lag_seconds,
                })
                .collect(),
            receiver: p.receiver.map(|r| ReceiverLag {
                replay_lag_bytes: r.replay_lag_bytes,
                replay_lag_seconds: r.replay_lag_seconds,
                streaming: r.streaming,
            }),
            databases: p
                .databases
                .into_iter()
                .map(|d| DatabaseSize {
                    name: d.name,
                    size_bytes: d.size_bytes,
                })
                .collect(),
            data_directory_disk: p.data_directory_disk.map(|d| DiskSpace {
                path: d.path,
                total_bytes: d.total_bytes,
                available_bytes: d.available_bytes,
            }),
            archiver: p.archiver.map(|a| ArchiverStatus {
                archived_count: a.archived_count,
                failed_count: a.failed_count,
                last_failed_wal: a.last_failed_wal,
                last_failed_at: time_from_unix_ms(a.last_failed_at_unix_ms),
            }),
            connections: p.connections,
            max_connections: p.max_connections,
            system_identifier: p.system_identifier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_round_trips_through_the_wire() {
        let mut probe = InstanceProbe::unreachable("main", Utc::now(), "x".into());
        probe.reachable = true;
        probe.error = None;
        probe.role = ReplicationRole::Standby;
        probe.receiver = Some(ReceiverLag {
            replay_lag_bytes: 5,
            replay_lag_seconds: Some(1.5),
            streaming: true,
        });
        probe.databases = vec![DatabaseSize {
            name: "app".into(),
            size_bytes: 7,
        }];
        probe.system_identifier = "7345678901234567890".into();
        // The wire carries milliseconds.
        probe.probed_at = time_from_unix_ms(probe.probed_at.timestamp_millis()).unwrap();
        let wire: proto::InstanceProbe = probe.clone().into();
        assert_eq!(InstanceProbe::try_from(wire).unwrap(), probe);
    }

    #[test]
    fn junk_is_refused_naming_the_field() {
        let wire = proto::InstanceProbe {
            instance: "main".into(),
            probed_at_unix_ms: 1,
            role: 42,
            ..Default::default()
        };
        let error = InstanceProbe::try_from(wire).unwrap_err().to_string();
        assert!(error.contains("`role`"), "{error}");
        let wire = proto::InstanceProbe::default();
        let error = InstanceProbe::try_from(wire).unwrap_err().to_string();
        assert!(error.contains("`instance`"), "{error}");
        let wire = proto::InstanceProbe {
            instance: "main".into(),
            probed_at_unix_ms: 1,
            system_identifier: "../7345".into(),
            ..Default::default()
        };
        let error = InstanceProbe::try_from(wire).unwrap_err().to_string();
        assert!(error.contains("`system_identifier`"), "{error}");
    }

    #[test]
    fn system_identifiers_are_decimal_numbers_or_empty() {
        let check = |value: &str, valid: bool| {
            assert_eq!(
                check_system_identifier("system_identifier", value).is_ok(),
                valid,
                "{value:?}"
            );
        };
        check("", true);
        check("7345678901234567890", true);
        check("18446744073709551615", true);
        check("18446744073709551616", false);
        check("007345", false);
        check("-1", false);
        check("+1", false);
        check("73456 ", false);
        check("cluster", false);
    }
}
