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
