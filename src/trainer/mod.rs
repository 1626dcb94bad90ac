//! Training: schedules, the optimizer, the run folder's logs and checkpoints, and the loop that
//! ties them to the engine's model and the data pipeline's batches.
pub mod checkpoint;
pub mod optim;
pub mod plot;
pub mod pref;
pub mod protocol;
pub mod run;
pub mod runlog;
pub mod schedule;
pub mod thread;
