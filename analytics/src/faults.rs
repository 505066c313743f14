//! Crash injection for tests: a point where a test makes a multi-step operation stop as if
//! the process died there, leaving the warehouse as it is. A no-op outside tests.

use crate::error::AnalyticsError;
use std::fmt::Debug;
use std::marker::PhantomData;

/// Where to "crash", among the steps `S` of one operation.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Faults<S> {
    #[cfg(test)]
    pub(crate) crash_at: Option<S>,
    _steps: PhantomData<S>,
}

impl<S> Default for Faults<S> {
    fn default() -> Self {
        Faults {
            #[cfg(test)]
            crash_at: None,
            _steps: PhantomData,
        }
    }
}

impl<S: Copy + PartialEq + Debug> Faults<S> {
    /// Fails as if the process died at `step`.
    pub(crate) fn check(self, step: S) -> Result<(), AnalyticsError> {
        #[cfg(test)]
        if self.crash_at == Some(step) {
            return Err(AnalyticsError::Corrupt(format!(
                "injected crash at {step:?}"
            )));
        }
        let _ = step;
        Ok(())
    }
}
