//! The compute device, chosen in one place.
//!
//! `--device auto|cpu|cuda|cuda:N` (every command and the TUI) becomes a [`DeviceSpec`]; [`select`] turns it into
//! a candle `Device`. `auto` takes the first CUDA device when the binary was built with the `cuda` feature and a
//! GPU is there, else the CPU. `CUDA_VISIBLE_DEVICES` is honoured by the driver itself: `cuda:0` is the first
//! visible GPU. [`describe`] names the device for the status bar, `termtune env`, the run folder and chat.
//!
//! On CUDA the device's memory pool keeps what it frees (candle leaves the pool's release threshold at 0, which
//! hands freed memory back to the driver at every synchronisation: one `to_scalar` per step did that).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use super::error::{EngineError, Result};

/// Which device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first CUDA device if there is one (and the build has CUDA), else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal among the visible ones.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "" | "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}`; use auto, cpu, cuda or cuda:N (N counts the GPUs CUDA_VISIBLE_DEVICES shows)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

static PREFERRED: std::sync::OnceLock<DeviceSpec> = std::sync::OnceLock::new();

/// Records the device the user chose (`--device`), once, at start-up.
pub fn set_preferred(spec: DeviceSpec) {
    let _ = PREFERRED.set(spec);
}

/// The device the user chose (`auto` when nothing was said).
pub fn preferred() -> DeviceSpec {
    PREFERRED.get().copied().unwrap_or_default()
}

/// The device every engine thread (training, chat, export, bench) works on: [`select`] of [`preferred`].
/// Each call makes its own handle (a CUDA device's cuBLAS handle and stream are not shared across threads).
pub fn chosen() -> Result<Device> {
    select(preferred())
}

/// What [`chosen`] will be, without starting it: `cpu` or `cuda:N`.
pub fn chosen_label() -> String {
    match preferred() {
        DeviceSpec::Cpu => "cpu".into(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        DeviceSpec::Auto => {
            if cuda_device_count() > 0 {
                "cuda:0".into()
            } else {
                "cpu".into()
            }
        }
    }
}

/// Whether this binary was built with CUDA support.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

/// Number of CUDA devices the driver shows (0 without the `cuda` build, the driver or a GPU).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::CudaContext::device_count()
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// Every compute device this binary can use, for `termtune env`: `cpu, cuda:0 NVIDIA H200 (139.8 GiB, 139.1 free)`,
/// or why there is no CUDA device.
pub fn inventory() -> String {
    #[cfg(feature = "cuda")]
    {
        let mut parts = vec!["cpu".to_string()];
        match cudarc::driver::CudaContext::device_count() {
            Err(e) => parts.push(format!("no CUDA device ({e:?}: no NVIDIA driver or GPU)")),
            Ok(0) => parts.push("no CUDA device".into()),
            Ok(n) => {
                for i in 0..usize::try_from(n).unwrap_or(0) {
                    let gib = |b: usize| {
                        #[allow(clippy::cast_precision_loss)]
                        let g = b as f64 / f64::from(1u32 << 30);
                        g
                    };
                    parts.push(match cudarc::driver::CudaContext::new(i) {
                        Ok(ctx) => {
                            let name = ctx.name().unwrap_or_else(|_| "?".into());
                            match ctx.mem_get_info() {
                                Ok((free, total)) => format!(
                                    "cuda:{i} {name} ({:.1} GiB, {:.1} free)",
                                    gib(total),
                                    gib(free)
                                ),
                                Err(_) => format!("cuda:{i} {name}"),
                            }
                        }
                        Err(e) => format!("cuda:{i} (cannot start: {e:?})"),
                    });
                }
            }
        }
        parts.join(", ")
    }
    #[cfg(not(feature = "cuda"))]
    {
        "cpu (this build has no CUDA: scripts/build-cuda.sh builds one)".into()
    }
}

/// The device for `spec`, with a message naming the fix when it cannot be had.
pub fn select(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            if cuda_device_count() > 0 {
                cuda(0)
            } else {
                Ok(Device::Cpu)
            }
        }
        DeviceSpec::Cuda(n) => {
            if !cuda_built() {
                return Err(EngineError::Invalid(format!(
                    "--device cuda:{n}: this termtune was built without CUDA; build it with scripts/build-cuda.sh (see the README's GPU section) or use --device cpu"
                )));
            }
            let count = cuda_device_count();
            if n >= count {
                return Err(EngineError::Invalid(if count == 0 {
                    format!(
                        "--device cuda:{n}: no CUDA device found (no NVIDIA driver, no GPU, or CUDA_VISIBLE_DEVICES hides them); use --device cpu"
                    )
                } else {
                    format!(
                        "--device cuda:{n}: only {count} CUDA device(s) visible (cuda:0..cuda:{}); check CUDA_VISIBLE_DEVICES",
                        count - 1
                    )
                }));
            }
            cuda(n)
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device> {
    let device = Device::new_cuda(n)
        .map_err(|e| EngineError::Invalid(format!("cannot start CUDA device cuda:{n}: {e}")))?;
    if let Device::Cuda(d) = &device
        && let Err(e) = keep_freed_memory(d)
    {
        tracing::warn!("cuda:{n}: could not set the memory pool's release threshold: {e}");
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda(n: usize) -> Result<Device> {
    Err(EngineError::Invalid(format!(
        "--device cuda:{n}: this termtune was built without CUDA"
    )))
}

/// Sets the default memory pool's release threshold to "never": memory freed by candle stays in the pool for
/// the next allocation instead of going back to the driver at every synchronisation.
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) -> std::result::Result<(), String> {
    use cudarc::driver::sys::CUmemPool_attribute as A;
    pool_attr(d, A::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, Some(u64::MAX)).map(|_| ())
}

/// Peak bytes of the CUDA memory pool since the last [`reset_peak_memory`]: (in use, reserved from the driver),
/// the counterparts of PyTorch's `max_memory_allocated` / `max_memory_reserved`. `None` on the CPU.
pub fn peak_memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use cudarc::driver::sys::CUmemPool_attribute as A;
            let used = pool_attr(d, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, None).ok()?;
            let reserved = pool_attr(d, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, None).ok()?;
            Some((used, reserved))
        }
        _ => None,
    }
}

/// Starts a new peak for [`peak_memory`] (PyTorch's `reset_peak_memory_stats`).
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use cudarc::driver::sys::CUmemPool_attribute as A;
        let _ = pool_attr(d, A::CU_MEMPOOL_ATTR_USED_MEM_HIGH, Some(0));
        let _ = pool_attr(d, A::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, Some(0));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// Gives the memory pool's unused memory back to the driver (PyTorch's `empty_cache`), after the device's queue
/// is done: for another process that needs the GPU next (the bench's reference runs after termtune).
pub fn release_cached_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let _ = device.synchronize();
        if let Err(e) = trim_pool(d) {
            tracing::warn!("could not release the memory pool's cached memory: {e}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// The device's default memory pool.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> std::result::Result<cudarc::driver::sys::CUmemoryPool, String> {
    use cudarc::driver::sys;
    let dev = d.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a valid out-pointer alive for the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&raw mut pool, dev)
            .result()
            .map_err(|e| format!("cuDeviceGetDefaultMemPool: {e:?}"))?;
    }
    Ok(pool)
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn trim_pool(d: &candle_core::CudaDevice) -> std::result::Result<(), String> {
    let pool = default_pool(d)?;
    // SAFETY: the pool handle comes from the driver; trimming to 0 keeps only memory still in use.
    unsafe {
        cudarc::driver::sys::cuMemPoolTrimTo(pool, 0)
            .result()
            .map_err(|e| format!("cuMemPoolTrimTo: {e:?}"))
    }
}

/// Reads (`set` None) or writes a u64 attribute of the device's default memory pool.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
fn pool_attr(
    d: &candle_core::CudaDevice,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> std::result::Result<u64, String> {
    use cudarc::driver::sys;
    let pool = default_pool(d)?;
    let mut value: u64 = set.unwrap_or(0);
    // SAFETY: a valid pointer alive for each call; the USED/RESERVED_MEM_HIGH and RELEASE_THRESHOLD attributes
    // are u64 (cuuint64_t) by the driver API's documentation.
    unsafe {
        let r = if set.is_some() {
            sys::cuMemPoolSetAttribute(pool, attr, (&raw mut value).cast())
        } else {
            sys::cuMemPoolGetAttribute(pool, attr, (&raw mut value).cast())
        };
        r.result()
            .map_err(|e| format!("cuMemPool attribute {attr:?}: {e:?}"))?;
    }
    Ok(value)
}

/// A short name for people: `cpu`, or `cuda:0 (NVIDIA H200)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let stream = d.cuda_stream();
            let ctx = stream.context();
            match ctx.name() {
                Ok(name) => format!("cuda:{} ({name})", ctx.ordinal()),
                Err(_) => format!("cuda:{}", ctx.ordinal()),
            }
        }
        #[allow(unreachable_patterns)]
        other => format!("{:?}", other.location()),
    }
}

/// The short machine name used in logs and files: `cpu` or `cuda:N`.
pub fn short_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// (free, total) bytes of a CUDA device's memory; `None` on the CPU.
pub fn memory_info(device: &Device) -> Option<(usize, usize)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

/// Whether an error's text is the GPU running out of memory, so the caller can name what to lower.
pub fn is_out_of_memory(error_text: &str) -> bool {
    error_text.contains("OUT_OF_MEMORY") || error_text.contains("out of memory")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        let err = "cuda:x".parse::<DeviceSpec>().unwrap_err();
        assert!(err.contains("cuda:N"), "{err}");
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cpu_is_always_available() {
        let d = select(DeviceSpec::Cpu).unwrap();
        assert!(d.is_cpu());
        assert_eq!(describe(&d), "cpu");
        assert_eq!(short_name(&d), "cpu");
        assert!(memory_info(&d).is_none());
    }

    #[test]
    fn auto_without_a_gpu_is_the_cpu() {
        if cuda_device_count() == 0 {
            assert!(select(DeviceSpec::Auto).unwrap().is_cpu());
            let err = select(DeviceSpec::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("--device cpu"), "{err}");
        }
    }
}
