//! The training side that does not depend on a particular model: schedules, the optimizer,
//! the run folder's logs and checkpoints (and, as they land, the loop itself).
pub mod checkpoint;
pub mod optim;
pub mod runlog;
pub mod schedule;
