//! The training side that does not depend on a particular model: schedules, the optimizer,
//! and (as they land) the loop, the run folder and checkpoints.
pub mod optim;
pub mod schedule;
