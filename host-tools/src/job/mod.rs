//! Jobs on the host side: the job manifest (`unipeer submit JOB.toml`) and the tasks it plans.

pub mod manifest;

pub use manifest::{JobManifest, ManifestError, PlannedTask, TaskPlan};
