//! The interface applications implement. The node core knows no application: the kernel (and
//! the simulator) link the apps they want and hand them in as an [`AppSet`].
//!
//! A task function is named, deterministic and bounded: the same spec and inputs give the same
//! output on every node (which is what lets two executors' output hashes be compared), inputs
//! and outputs are at most [`MAX_CHUNK_LEN`] bytes each.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Longest application name.
pub const MAX_APP_NAME: usize = 24;
/// Most parameter bytes of one task.
pub const MAX_PARAMS: usize = 64;
/// Most input chunks of one task (a reduce task has one per map task).
pub const MAX_INPUTS: usize = 16;
/// Most output parts of one task (a map task has one per reduce partition).
pub const MAX_PARTS: usize = 8;
/// Largest chunk: one task input or one output part.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;
/// Most applications one node offers.
pub const MAX_APPS: usize = 8;

/// What role a task plays in its job; the core spawns reduce tasks from map outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskKind {
    /// A task on its own: one output part.
    Single,
    /// A map task: one output part per reduce partition.
    Map { reducers: u8 },
    /// Reduce partition `partition` over the outputs of `maps` map tasks: one output part.
    Reduce { partition: u8, maps: u8 },
}

impl TaskKind {
    /// Output parts a task of this kind must produce.
    pub fn parts(self) -> usize {
        match self {
            TaskKind::Map { reducers } => reducers as usize,
            TaskKind::Single | TaskKind::Reduce { .. } => 1,
        }
    }
}

/// What to run: the application, the task's role and its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskSpec {
    pub app: String,
    pub kind: TaskKind,
    /// Application-defined parameters (e.g. a range for `primes`), at most [`MAX_PARAMS`].
    pub params: Vec<u8>,
}

impl TaskSpec {
    /// Whether the spec keeps every bound.
    pub fn is_bounded(&self) -> bool {
        !self.app.is_empty()
            && self.app.len() <= MAX_APP_NAME
            && self.params.len() <= MAX_PARAMS
            && self.kind.parts() <= MAX_PARTS
            && !matches!(self.kind, TaskKind::Map { reducers: 0 })
            && !matches!(self.kind, TaskKind::Reduce { maps, .. } if maps == 0 || maps as usize > MAX_INPUTS)
    }
}

/// A task's result: its output parts (one, or one per reduce partition for a map task).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskOutput {
    pub parts: Vec<Vec<u8>>,
}

impl TaskOutput {
    pub fn single(bytes: Vec<u8>) -> Self {
        TaskOutput {
            parts: alloc::vec![bytes],
        }
    }
}

/// Why a task did not produce an output. A task error is deterministic: it is reported, not
/// retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskError {
    /// No application of that name on this node.
    UnknownApp,
    /// The parameters do not parse or break the app's bounds.
    BadParams,
    /// An input is malformed for this app, or the input count is wrong.
    BadInput,
    /// The output would exceed [`MAX_CHUNK_LEN`] or [`MAX_PARTS`].
    OutputTooLarge,
    /// The application failed on purpose or by its own rule, with its code.
    Failed(u16),
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::UnknownApp => write!(f, "no such application on this node"),
            TaskError::BadParams => write!(f, "task parameters are malformed"),
            TaskError::BadInput => write!(f, "task input is malformed"),
            TaskError::OutputTooLarge => write!(f, "task output exceeds its bound"),
            TaskError::Failed(code) => write!(f, "application failed with code {code}"),
        }
    }
}

impl core::error::Error for TaskError {}

/// Where a sliced task stands after a slice.
#[derive(Debug)]
pub enum Slice {
    /// Not finished: call again with the same state.
    More,
    Done(Result<TaskOutput, TaskError>),
}

/// An app's progress between slices of one task (the app's own type, downcast by the app).
pub type SliceState = Option<Box<dyn Any>>;

/// An application: named, deterministic task functions.
pub trait App: Sync {
    /// The name tasks and manifests refer to (at most [`MAX_APP_NAME`] bytes).
    fn name(&self) -> &'static str;
    /// Runs one task. Must be deterministic and must not panic on any input.
    fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError>;

    /// Runs part of a task, so a node with one CPU keeps serving the network (leases,
    /// keepalives) while long tasks run: the app asks `yield_now` now and then and returns
    /// [`Slice::More`] when it says so, keeping its progress in `state` (empty at the first
    /// slice). The result must equal [`Self::run`]'s. The default runs the whole task at once:
    /// right for apps whose tasks are short by their bounds.
    fn run_slice(
        &self,
        task: &TaskSpec,
        inputs: &[&[u8]],
        state: &mut SliceState,
        yield_now: &mut dyn FnMut() -> bool,
    ) -> Slice {
        let _ = (state, yield_now);
        Slice::Done(self.run(task, inputs))
    }
}

/// The applications linked into this node, handed in by the kernel or the simulator.
#[derive(Clone, Default)]
pub struct AppSet {
    apps: Vec<&'static dyn App>,
}

impl fmt::Debug for AppSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.apps.iter().map(|a| a.name()))
            .finish()
    }
}

impl AppSet {
    /// The set of `apps`; names too long, duplicates and apps beyond [`MAX_APPS`] are left out.
    pub fn new(apps: &[&'static dyn App]) -> Self {
        let mut set = AppSet { apps: Vec::new() };
        for a in apps {
            let n = a.name();
            if n.is_empty() || n.len() > MAX_APP_NAME || set.has(n) || set.apps.len() >= MAX_APPS {
                continue;
            }
            set.apps.push(*a);
        }
        set
    }

    pub fn has(&self, name: &str) -> bool {
        self.apps.iter().any(|a| a.name() == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.apps.iter().map(|a| a.name())
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    fn app_for(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<&'static dyn App, TaskError> {
        if !task.is_bounded() {
            return Err(TaskError::BadParams);
        }
        if inputs.len() > MAX_INPUTS || inputs.iter().any(|i| i.len() > MAX_CHUNK_LEN) {
            return Err(TaskError::BadInput);
        }
        self.apps
            .iter()
            .find(|a| a.name() == task.app)
            .copied()
            .ok_or(TaskError::UnknownApp)
    }

    fn checked(task: &TaskSpec, out: TaskOutput) -> Result<TaskOutput, TaskError> {
        if out.parts.len() != task.kind.parts() || out.parts.iter().any(|p| p.len() > MAX_CHUNK_LEN)
        {
            return Err(TaskError::OutputTooLarge);
        }
        Ok(out)
    }

    /// Runs `task` with the named app and checks the output against the bounds and the task
    /// kind's part count.
    pub fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
        let app = self.app_for(task, inputs)?;
        Self::checked(task, app.run(task, inputs)?)
    }

    /// Runs a slice of `task` (see [`App::run_slice`]) with the same checks as [`Self::run`].
    pub fn run_slice(
        &self,
        task: &TaskSpec,
        inputs: &[&[u8]],
        state: &mut SliceState,
        yield_now: &mut dyn FnMut() -> bool,
    ) -> Slice {
        let app = match self.app_for(task, inputs) {
            Ok(a) => a,
            Err(e) => return Slice::Done(Err(e)),
        };
        match app.run_slice(task, inputs, state, yield_now) {
            Slice::More => Slice::More,
            Slice::Done(r) => Slice::Done(r.and_then(|out| Self::checked(task, out))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    struct Echo;
    impl App for Echo {
        fn name(&self) -> &'static str {
            "echo"
        }
        fn run(&self, task: &TaskSpec, inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
            let n = task.kind.parts();
            Ok(TaskOutput {
                parts: vec![inputs.concat(); n],
            })
        }
    }
    struct Liar;
    impl App for Liar {
        fn name(&self) -> &'static str {
            "liar"
        }
        fn run(&self, _: &TaskSpec, _: &[&[u8]]) -> Result<TaskOutput, TaskError> {
            Ok(TaskOutput { parts: vec![] })
        }
    }

    fn spec(app: &str, kind: TaskKind) -> TaskSpec {
        TaskSpec {
            app: app.to_string(),
            kind,
            params: vec![],
        }
    }

    #[test]
    fn runs_named_app_and_checks_bounds() {
        let set = AppSet::new(&[&Echo, &Echo, &Liar]);
        assert_eq!(set.names().count(), 2, "duplicates are left out");
        let out = set
            .run(&spec("echo", TaskKind::Single), &[b"ab", b"c"])
            .unwrap();
        assert_eq!(out.parts, vec![b"abc".to_vec()]);
        let out = set
            .run(&spec("echo", TaskKind::Map { reducers: 3 }), &[b"x"])
            .unwrap();
        assert_eq!(out.parts.len(), 3);
        assert_eq!(
            set.run(&spec("nope", TaskKind::Single), &[]),
            Err(TaskError::UnknownApp)
        );
        assert_eq!(
            set.run(&spec("liar", TaskKind::Single), &[]),
            Err(TaskError::OutputTooLarge),
            "a wrong part count is caught"
        );
        assert_eq!(
            set.run(&spec("echo", TaskKind::Map { reducers: 0 }), &[]),
            Err(TaskError::BadParams)
        );
        let big = vec![0u8; MAX_CHUNK_LEN + 1];
        assert_eq!(
            set.run(&spec("echo", TaskKind::Single), &[&big]),
            Err(TaskError::BadInput)
        );
    }
}
