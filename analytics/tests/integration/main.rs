//! The analytics crate's integration tests, in one test binary: each binary links DataFusion
//! and herald's crates once more, which costs about a minute of a cold build.

mod embedded_bus;
mod reconcile;
