//! `fail`: a task that fails on purpose, to exercise the error path (reported, not retried).

use unipeer_node::jobs::app::{App, TaskError, TaskOutput, TaskSpec};

/// Always fails; the code is the first two parameter bytes (little-endian), else 1.
pub struct Fail;

impl App for Fail {
    fn name(&self) -> &'static str {
        "fail"
    }

    fn run(&self, task: &TaskSpec, _inputs: &[&[u8]]) -> Result<TaskOutput, TaskError> {
        let code = match task.params.as_slice() {
            [a, b, ..] => u16::from_le_bytes([*a, *b]),
            _ => 1,
        };
        Err(TaskError::Failed(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;
    use unipeer_node::jobs::app::TaskKind;

    #[test]
    fn always_fails_with_its_code() {
        let mut t = TaskSpec {
            app: "fail".to_string(),
            kind: TaskKind::Single,
            params: vec![],
        };
        assert_eq!(Fail.run(&t, &[]), Err(TaskError::Failed(1)));
        t.params = 7u16.to_le_bytes().to_vec();
        assert_eq!(Fail.run(&t, &[b"x"]), Err(TaskError::Failed(7)));
    }
}
