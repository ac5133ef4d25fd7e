//! Jobs on the host side: the job manifest (`unipeer submit JOB.toml`) and the tasks it plans,
//! the client port's client, the Application Agent, and results with their host reference.

pub mod aa;
pub mod client;
pub mod manifest;
pub mod result;
pub mod sample;

pub use manifest::{JobManifest, ManifestError, PlannedTask, TaskPlan};
