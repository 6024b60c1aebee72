//! Undo steps of a multi-step create: each step that made something
//! registers how to take it back; on failure they run in reverse. A step
//! that fails is logged with the object and what it was undoing: a leak is
//! never silent.

use crate::error::Result;

type Step = Box<dyn FnOnce() -> Result<()> + Send>;

pub struct Undo {
    /// The object being created, for the logs.
    object: String,
    steps: Vec<(String, Step)>,
}

impl Undo {
    pub fn new(object: impl Into<String>) -> Undo {
        Undo {
            object: object.into(),
            steps: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        what: impl Into<String>,
        step: impl FnOnce() -> Result<()> + Send + 'static,
    ) {
        self.steps.push((what.into(), Box::new(step)));
    }

    /// What the registered steps undo, latest first.
    pub fn pending(&self) -> Vec<&str> {
        self.steps.iter().rev().map(|(w, _)| w.as_str()).collect()
    }

    /// Runs every step, latest first; returns how many failed.
    pub fn run(self) -> usize {
        let mut failed = 0;
        for (what, step) in self.steps.into_iter().rev() {
            if let Err(e) = step() {
                failed += 1;
                tracing::error!(object = %self.object, undo = %what, error = %crate::error::chain(&e), "undo step failed; this may leak");
            }
        }
        failed
    }

    /// The create succeeded: keep everything.
    pub fn forget(mut self) {
        self.steps.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn steps_run_in_reverse_and_failures_do_not_stop_the_rest() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut undo = Undo::new("x");
        for i in 0..3 {
            let log = log.clone();
            undo.push(format!("step {i}"), move || {
                log.lock().unwrap().push(i);
                if i == 1 {
                    Err(crate::error::Error::Internal("boom".into()))
                } else {
                    Ok(())
                }
            });
        }
        assert_eq!(undo.pending(), ["step 2", "step 1", "step 0"]);
        assert_eq!(undo.run(), 1);
        assert_eq!(*log.lock().unwrap(), [2, 1, 0]);
    }
}
