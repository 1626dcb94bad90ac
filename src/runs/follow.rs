//! Following a run folder read-only from its `trainer_log.jsonl`, as it grows: any
//! LLaMA-Factory run (`llamafactory-cli train`, DeepSpeed on 8 GPUs, the WebUI) writes the same
//! file as termtune, one JSON object a line, appended as the run logs. A line still being written
//! (no newline yet) waits for the next poll; a line that does not parse is skipped.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::trainer::runlog::LogLine;

/// How often followers look at the file again.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// What a poll found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Polled {
    /// The file is shorter than what was read: it was started over (LLaMA-Factory deletes it
    /// when a run starts with `overwrite_output_dir`); `lines` are from its start.
    pub restarted: bool,
    pub lines: Vec<LogLine>,
}

/// The reading position in one folder's `trainer_log.jsonl`.
#[derive(Debug, Clone)]
pub struct LogFollower {
    path: PathBuf,
    /// Bytes consumed (up to the end of the last complete line).
    offset: u64,
}

impl LogFollower {
    /// A follower of `dir/trainer_log.jsonl`, from its start.
    pub fn new(dir: &Path) -> Self {
        Self {
            path: dir.join("trainer_log.jsonl"),
            offset: 0,
        }
    }

    /// The complete lines written since the last poll (none while the file does not exist).
    pub fn poll(&mut self) -> std::io::Result<Polled> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Polled::default()),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        let restarted = len < self.offset;
        if restarted {
            self.offset = 0;
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        f.take(len - self.offset).read_to_end(&mut bytes)?;
        // Only up to the last newline: the rest is a line being written.
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        let lines = String::from_utf8_lossy(&bytes[..complete])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Ok(Polled { restarted, lines })
    }
}

/// The run's end as a follower sees it: the last step logged (LLaMA-Factory writes no other
/// mark; its final evaluation may follow on the same step).
pub fn reached_the_end(line: &LogLine) -> bool {
    line.total_steps > 0 && line.current_steps >= line.total_steps
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use super::*;

    #[test]
    fn a_line_being_written_waits_and_a_restarted_file_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = LogFollower::new(dir.path());
        assert_eq!(f.poll().unwrap(), Polled::default());
        let path = dir.path().join("trainer_log.jsonl");
        let mut file = std::fs::File::create(&path).unwrap();
        let line = |step: u64| {
            format!(
                "{{\"current_steps\": {step}, \"total_steps\": 4, \"loss\": 1.5, \"lr\": 1e-4, \"epoch\": 0.5, \"percentage\": 25.0, \"elapsed_time\": \"0:00:01\", \"remaining_time\": \"0:00:03\"}}\n"
            )
        };
        let one = line(1);
        let (head, tail) = one.split_at(30);
        file.write_all(head.as_bytes()).unwrap();
        assert!(f.poll().unwrap().lines.is_empty());
        file.write_all(tail.as_bytes()).unwrap();
        file.write_all(b"not json\n").unwrap();
        let got = f.poll().unwrap();
        assert_eq!(got.lines.len(), 1);
        assert_eq!(got.lines[0].current_steps, 1);
        assert!(!got.restarted);
        std::fs::write(&path, line(4)).unwrap();
        let got = f.poll().unwrap();
        assert!(got.restarted);
        assert_eq!(got.lines[0].current_steps, 4);
        assert!(reached_the_end(&got.lines[0]));
    }
}
