//! The OpenShell gateway's health method as it is on the wire, written by hand from the
//! OpenShell proto (`proto/openshell.proto`: package `openshell.v1`, service `OpenShell`, rpc
//! `Health`; the same field numbers and enum values), so the build needs no protoc. Only prost
//! here: the VM tests compile this file too.

/// The method's path: package `openshell.v1`, service `OpenShell`, rpc `Health`.
pub const HEALTH_PATH: &str = "/openshell.v1.OpenShell/Health";

/// `message HealthRequest {}`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthRequest {}

/// `message HealthResponse { ServiceStatus status = 1; string version = 2; }`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthResponse {
    #[prost(enumeration = "ServiceStatus", tag = "1")]
    pub status: i32,
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `enum ServiceStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ServiceStatus {
    Unspecified = 0,
    Healthy = 1,
    Degraded = 2,
    Unhealthy = 3,
}

impl ServiceStatus {
    /// The value's name in the proto.
    pub fn as_str_name(self) -> &'static str {
        match self {
            ServiceStatus::Unspecified => "SERVICE_STATUS_UNSPECIFIED",
            ServiceStatus::Healthy => "SERVICE_STATUS_HEALTHY",
            ServiceStatus::Degraded => "SERVICE_STATUS_DEGRADED",
            ServiceStatus::Unhealthy => "SERVICE_STATUS_UNHEALTHY",
        }
    }
}
