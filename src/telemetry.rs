//! System telemetry: NVIDIA GPUs through NVML (loaded at run time; absent is a normal state).

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}

/// What NVML says about this machine.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuProbe {
    /// NVML loaded; the GPUs it lists (possibly none) and the driver version.
    Found { driver: String, gpus: Vec<GpuInfo> },
    /// NVML could not be loaded or initialised (no NVIDIA driver): the reason.
    Unavailable(String),
    /// This build has no NVML support (`--no-default-features`).
    NotBuilt,
}

/// Asks NVML once for the GPUs of this machine.
pub fn probe_gpus() -> GpuProbe {
    #[cfg(feature = "nvml")]
    {
        use nvml_wrapper::Nvml;
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => return GpuProbe::Unavailable(nvml_reason(&e)),
        };
        let driver = nvml.sys_driver_version().unwrap_or_else(|_| "?".into());
        let count = nvml.device_count().unwrap_or(0);
        let gpus = (0..count)
            .filter_map(|i| {
                let d = nvml.device_by_index(i).ok()?;
                let mem = d.memory_info().ok();
                Some(GpuInfo {
                    index: i,
                    name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
                    memory_total_bytes: mem.as_ref().map_or(0, |m| m.total),
                    memory_used_bytes: mem.as_ref().map_or(0, |m| m.used),
                })
            })
            .collect();
        GpuProbe::Found { driver, gpus }
    }
    #[cfg(not(feature = "nvml"))]
    {
        GpuProbe::NotBuilt
    }
}

#[cfg(feature = "nvml")]
fn nvml_reason(e: &nvml_wrapper::error::NvmlError) -> String {
    use nvml_wrapper::error::NvmlError;
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
            "no NVIDIA GPU / NVML not found (libnvidia-ml.so.1 is not installed)".into()
        }
        NvmlError::DriverNotLoaded => "no NVIDIA GPU / the NVIDIA driver is not loaded".into(),
        other => format!("NVML failed: {other}"),
    }
}

/// One GPU at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub name: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// GPU busy, percent.
    pub utilization_percent: Option<u32>,
    pub temperature_c: Option<u32>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    /// GPU memory of this process (its training and chat), when the driver reports it for our pid.
    pub process_memory_bytes: Option<u64>,
}

/// The GPUs at one moment, or why there are none to show.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuReading {
    Gpus(Vec<GpuSample>),
    /// No NVML / no NVIDIA GPU (the reason), or a build without NVML.
    Unavailable(String),
}

/// This process and the machine at one moment (sysinfo).
#[derive(Debug, Clone, PartialEq)]
pub struct SystemSample {
    pub process_rss_bytes: u64,
    /// Process CPU use, percent of one core (a process using 2 cores fully reads 200).
    pub process_cpu_percent: f32,
    /// Whole-machine CPU use, percent of all cores.
    pub system_cpu_percent: f32,
    pub cpu_count: usize,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// One telemetry reading, sent by the sampler thread.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySample {
    pub gpu: GpuReading,
    pub system: Option<SystemSample>,
}

/// A cancellation flag with an interruptible sleep (bottom's Condvar token).
#[derive(Debug, Default)]
pub struct CancelToken {
    cancelled: std::sync::Mutex<bool>,
    wake: std::sync::Condvar,
}

impl CancelToken {
    pub fn cancel(&self) {
        if let Ok(mut c) = self.cancelled.lock() {
            *c = true;
        }
        self.wake.notify_all();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.lock().map_or(true, |c| *c)
    }

    /// Sleeps up to `d`; returns true when cancelled (at once when already cancelled).
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        let Ok(guard) = self.cancelled.lock() else {
            return true;
        };
        match self.wake.wait_timeout_while(guard, d, |c| !*c) {
            Ok((c, _)) => *c,
            Err(_) => true,
        }
    }
}

/// The running sampler; dropping it stops the thread (within one sleep, which is interrupted).
#[derive(Debug)]
pub struct Sampler {
    token: std::sync::Arc<CancelToken>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn stop(&mut self) {
        self.token.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The process whose CPU, memory and GPU memory the sampler reads: 0 for this one, else the run process a TUI
/// follows (the run trains in a process of its own).
static WATCHED_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Reads `pid`'s process figures from now on (`None`: this process's own).
pub fn watch_process(pid: Option<u32>) {
    WATCHED_PID.store(pid.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
}

/// The pid whose figures are read.
fn watched_pid() -> u32 {
    match WATCHED_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::process::id(),
        pid => pid,
    }
}

/// Starts the sampler thread "telemetry": a reading every `interval`, passed to `send`, until
/// `send` returns false (the receiver is gone) or the [`Sampler`] is dropped.
pub fn spawn_sampler(
    interval: std::time::Duration,
    mut send: impl FnMut(TelemetrySample) -> bool + Send + 'static,
) -> std::io::Result<Sampler> {
    let token = std::sync::Arc::new(CancelToken::default());
    let t = std::sync::Arc::clone(&token);
    let handle = std::thread::Builder::new()
        .name("telemetry".into())
        .spawn(move || {
            let mut gpu = GpuReader::new();
            let mut sys = SystemReader::new();
            loop {
                let sample = TelemetrySample {
                    gpu: gpu.read(),
                    system: sys.as_mut().and_then(SystemReader::read),
                };
                if t.is_cancelled() || !send(sample) || t.sleep(interval) {
                    break;
                }
            }
        })?;
    Ok(Sampler {
        token,
        handle: Some(handle),
    })
}

struct SystemReader {
    sys: sysinfo::System,
}

impl SystemReader {
    fn new() -> Option<Self> {
        let sys = sysinfo::System::new().ok()?;
        Some(Self { sys })
    }

    fn read(&mut self) -> Option<SystemSample> {
        use sysinfo::{ProcessRefreshKind, ProcessesToUpdate};
        let pid = sysinfo::Pid::from_u32(watched_pid());
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        self.sys.refresh_memory();
        self.sys.refresh_cpu_usage();
        let p = self.sys.process(pid)?;
        Some(SystemSample {
            process_rss_bytes: p.memory(),
            process_cpu_percent: p.cpu_usage(),
            system_cpu_percent: self.sys.global_cpu_usage(),
            cpu_count: self.sys.cpus().len(),
            memory_used_bytes: self.sys.used_memory(),
            memory_total_bytes: self.sys.total_memory(),
        })
    }
}

/// NVML, initialised once on the sampler thread; its failure is a value, shown as "no GPU".
struct GpuReader {
    #[cfg(feature = "nvml")]
    nvml: Result<nvml_wrapper::Nvml, String>,
}

impl GpuReader {
    fn new() -> Self {
        Self {
            #[cfg(feature = "nvml")]
            nvml: nvml_wrapper::Nvml::init().map_err(|e| nvml_reason(&e)),
        }
    }

    fn read(&mut self) -> GpuReading {
        #[cfg(feature = "nvml")]
        {
            use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
            let nvml = match &self.nvml {
                Ok(n) => n,
                Err(reason) => return GpuReading::Unavailable(reason.clone()),
            };
            let count = nvml.device_count().unwrap_or(0);
            if count == 0 {
                return GpuReading::Unavailable("NVML found no NVIDIA GPU".into());
            }
            let gpus = (0..count)
                .filter_map(|i| {
                    let d = nvml.device_by_index(i).ok()?;
                    let mem = d.memory_info().ok();
                    Some(GpuSample {
                        index: i,
                        name: d.name().unwrap_or_else(|_| "unknown GPU".into()),
                        memory_used_bytes: mem.as_ref().map_or(0, |m| m.used),
                        memory_total_bytes: mem.as_ref().map_or(0, |m| m.total),
                        utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                        temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                        power_watts: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
                        power_limit_watts: d
                            .enforced_power_limit()
                            .ok()
                            .map(|mw| f64::from(mw) / 1000.0),
                        process_memory_bytes: own_memory(&d),
                    })
                })
                .collect::<Vec<_>>();
            if gpus.is_empty() {
                // A GPU that fell off the bus or a driver reset: say so, keep sampling (it may come back).
                return GpuReading::Unavailable(format!(
                    "NVML lists {count} GPU(s) but none answers (driver reset or GPU lost?)"
                ));
            }
            GpuReading::Gpus(gpus)
        }
        #[cfg(not(feature = "nvml"))]
        {
            GpuReading::Unavailable("GPU: n/a (this build has no NVML support)".into())
        }
    }
}

/// The watched process's memory on `d` (this one's, or the followed run's; `None` where the driver hides pids,
/// as in some containers).
#[cfg(feature = "nvml")]
fn own_memory(d: &nvml_wrapper::Device<'_>) -> Option<u64> {
    use nvml_wrapper::enums::device::UsedGpuMemory;
    let pid = watched_pid();
    d.running_compute_processes()
        .ok()?
        .into_iter()
        .filter(|p| p.pid == pid)
        .map(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => b,
            UsedGpuMemory::Unavailable => 0,
        })
        .reduce(|a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn cancelled_sleep_returns_at_once() {
        let t = std::sync::Arc::new(CancelToken::default());
        let t2 = std::sync::Arc::clone(&t);
        let start = Instant::now();
        let h = std::thread::spawn(move || t2.sleep(Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        t.cancel();
        assert!(h.join().expect("sleeper thread"));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    /// A TUI following a run reads the run process's figures, then its own again.
    #[test]
    fn the_watched_process_is_the_one_read() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let mut reader = SystemReader::new().expect("sysinfo");
        let own = reader.read().expect("this process").process_rss_bytes;
        watch_process(Some(child.id()));
        let theirs = reader.read().map(|s| s.process_rss_bytes);
        watch_process(None);
        let _ = child.kill();
        let _ = child.wait();
        // `sleep` holds a few MiB; this test binary (candle, tokenizers…) holds far more.
        let theirs = theirs.expect("the child's figures");
        assert!(theirs > 0 && theirs < own / 2, "{theirs} vs {own}");
    }

    #[test]
    fn sampler_sends_and_stops_promptly() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = spawn_sampler(Duration::from_secs(60), move |sample| {
            tx.send(sample).is_ok()
        })
        .expect("spawn");
        let first = rx.recv_timeout(Duration::from_secs(10)).expect("a sample");
        // This machine has no NVIDIA GPU in CI; either state is a valid reading, never a panic.
        match first.gpu {
            GpuReading::Gpus(_) | GpuReading::Unavailable(_) => {}
        }
        let sys = first.system.expect("sysinfo reads this process");
        assert!(sys.process_rss_bytes > 0);
        let start = Instant::now();
        s.stop();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stop waits out the 60 s sleep"
        );
    }
}
