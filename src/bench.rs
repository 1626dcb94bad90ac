//! `termtune bench`: LoRA training speed and memory on a real model, beside PyTorch + PEFT measured
//! in the same invocation on exactly the same batches (when a Python with torch, transformers and
//! peft is available). A benchmark, never a timed test: it reports ratios, it asserts nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};

use crate::config::{self, Purpose};
use crate::data::prepare_dataset;
use crate::engine::source::SourceKind;
use crate::engine::{Finetune, Model};
use crate::resolve;
use crate::trainer::optim::{AdamW, AdamWConfig, param_groups};
use crate::trainer::run::{batch_tensors, host_inputs, peak_rss_gib, u32_mask};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    pub dataset: String,
    pub dataset_dir: PathBuf,
    pub template: Option<String>,
    pub examples: usize,
    pub batch_size: usize,
    pub cutoff_len: usize,
    pub lora_rank: u32,
    /// DoRA (`use_dora: true`) on both sides.
    pub dora: bool,
    /// Measured steps (after `warmup`).
    pub steps: usize,
    pub warmup: usize,
    /// Python for the PyTorch + PEFT reference; `None` skips it.
    pub python: Option<PathBuf>,
    /// CPU threads for both termtune and the reference (0 = all cores).
    pub threads: usize,
    /// Base-weight dtype: `None` is bf16 on a GPU and f32 on the CPU.
    pub dtype: Option<DType>,
    /// Pack examples into full `cutoff_len` rows (`packing: true`).
    pub packing: bool,
    /// Dense peak of the device in TFLOP/s, for MFU (GPU only).
    pub peak_tflops: f64,
    /// Time each kind of kernel in one extra step per setting (GPU: a device sync around each; see
    /// `engine::profile`).
    pub profile: bool,
}

/// termtune's measurements for one gradient-checkpointing setting.
struct Setting {
    checkpointing: bool,
    times: Vec<StepTime>,
    /// Peak memory (GiB): resident set on the CPU; (in use, reserved) of the memory pool on a GPU.
    mem_gib: (Option<f64>, Option<f64>),
}

/// One step's measurements.
#[derive(Debug, Clone, Copy)]
struct StepTime {
    /// Model FLOPs of the step (forward and backward, no recomputation): see [`step_flops`].
    flops: f64,
    loss: f64,
    forward_s: f64,
    backward_s: f64,
    optimizer_s: f64,
    real_tokens: usize,
    padded_tokens: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Runs the benchmark; progress goes to `note`, the report is returned.
pub fn run(opts: &BenchOptions, note: &mut (dyn FnMut(&str) + Send)) -> Result<String, String> {
    let preset_text = format!(
        "model_name_or_path: {:?}\ndataset: {}\ndataset_dir: {:?}\ncutoff_len: {}\nmax_samples: {}\n\
         per_device_train_batch_size: {}\nlora_rank: {}\nlora_target: all\nlearning_rate: 1.0e-4\nuse_dora: {}\n{}{}",
        opts.model,
        opts.dataset,
        opts.dataset_dir.display().to_string(),
        opts.cutoff_len,
        opts.examples,
        opts.batch_size,
        opts.lora_rank,
        opts.dora,
        opts.template
            .as_ref()
            .map(|t| format!("template: {t}\n"))
            .unwrap_or_default(),
        if opts.packing { "packing: true\n" } else { "" },
    );
    let loaded = config::parse(&preset_text, &[], Purpose::Train).map_err(|issues| {
        issues
            .iter()
            .map(|i| i.message.clone())
            .collect::<Vec<_>>()
            .join("; ")
    })?;
    let p = &loaded.preset;
    let device = crate::engine::device::chosen().map_err(|e| e.to_string())?;
    let gpu = !device.is_cpu();
    let dtype = opts
        .dtype
        .unwrap_or(if gpu { DType::BF16 } else { DType::F32 });
    note(&format!(
        "device {}, base weights {dtype:?}, LoRA and AdamW f32",
        crate::engine::device::describe(&device)
    ));
    let mut progress = |sp: crate::engine::source::SourceProgress| {
        if let crate::engine::source::SourceProgress::Note(l) = sp {
            note(&l);
        }
    };
    let src = resolve::load_model(
        p,
        crate::config::Purpose::Train,
        dtype,
        &device,
        &mut progress,
    )
    .map_err(|e| e.to_string())?;
    let reference_model = match &src.kind {
        SourceKind::Mirror { path, .. } => path.clone(),
        _ => src.files.dir.clone(),
    };
    let reference_model = if Path::new(&p.model_name_or_path).is_file() {
        PathBuf::from(&p.model_name_or_path)
    } else {
        reference_model
    };
    let spec = resolve::lora_spec(p).map_err(|e| e.to_string())?;
    let model = Model::from_files(&src.files, dtype, &device, &Finetune::Lora(spec))
        .map_err(|e| e.to_string())?;
    drop(src.files);
    let data_opts = resolve::data_options(p);
    let enc = resolve::encoder(&data_opts, &src.tokenizer).map_err(|e| e.to_string())?;
    let data = prepare_dataset(&data_opts, &enc).map_err(|e| e.to_string())?;
    // Batches of consecutive passes over the data (a speed measurement may see an example twice).
    let wanted = opts.warmup + opts.steps;
    let mut batches = Vec::new();
    for epoch in 0..wanted as u64 {
        let more = data.epoch_batches(opts.batch_size, crate::data::Sampler::Random, p.seed, epoch);
        if more.is_empty() {
            break;
        }
        batches.extend(more);
        if batches.len() >= wanted {
            break;
        }
    }
    batches.truncate(wanted);
    if batches.len() < wanted {
        return Err(format!(
            "only {} batches of {} examples; lower --steps or add examples",
            batches.len(),
            opts.batch_size
        ));
    }

    let mut model = model;
    let threads = if opts.threads == 0 {
        rayon::current_num_threads()
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| format!("cannot start {threads} threads: {e}"))?;
    // Both settings start from the same LoRA values, so their losses must agree with each other and the reference.
    let init: Vec<(candle_core::Var, candle_core::Tensor)> = model
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| {
            let t = v.as_tensor().copy()?;
            Ok((v, t))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(|e| e.to_string())?;
    let mut settings = Vec::new();
    for checkpointing in [true, false] {
        for (v, t) in &init {
            v.set(t).map_err(|e| e.to_string())?;
        }
        model.checkpointing = checkpointing;
        // Peak memory per setting: reset the high-water mark (Linux `clear_refs` 5; the GPU pool's) before each.
        crate::engine::device::reset_peak_memory(&device);
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        if !reset && checkpointing && !gpu {
            note(
                "cannot reset the peak RSS between settings; the second setting's peak includes the first's",
            );
        }
        let times = pool.install(|| measure(&model, &batches, &device, checkpointing, note))?;
        if opts.profile {
            let b = &batches[opts.warmup.min(batches.len() - 1)];
            let report = pool.install(|| profile_step(&model, b, &device))?;
            note(&format!(
                "profile of one step (gradient checkpointing {}), time by kind of kernel:\n{report}",
                if checkpointing { "on" } else { "off" }
            ));
        }
        let gib = |b: u64| {
            #[allow(clippy::cast_precision_loss)]
            let g = b as f64 / f64::from(1u32 << 30);
            g
        };
        let mem_gib = match crate::engine::device::peak_memory(&device) {
            Some((used, reserved)) => (Some(gib(used)), Some(gib(reserved))),
            None => (peak_rss_gib(), None),
        };
        settings.push(Setting {
            checkpointing,
            times,
            mem_gib,
        });
    }
    drop(model);
    drop(init);
    // What termtune's pool keeps for itself would leave the reference (another process) short of GPU memory.
    crate::engine::device::release_cached_memory(&device);

    // The reference on the same device and dtype; on a GPU with and without its gradient checkpointing (on the
    // CPU, where it is slow, without: it keeps all activations).
    let mut references = Vec::new();
    match &opts.python {
        None => references.push((false, Err("skipped (--no-reference)".to_string()))),
        Some(py) => {
            for ckpt in if gpu { vec![true, false] } else { vec![false] } {
                let r = run_reference(
                    py,
                    &reference_model,
                    &batches,
                    opts,
                    &RefSetup {
                        threads,
                        device: crate::engine::device::short_name(&device),
                        dtype,
                        checkpointing: ckpt,
                    },
                    note,
                );
                references.push((ckpt, r));
            }
        }
    }
    let setup = format!(
        "{dtype:?} base on {}",
        if gpu {
            crate::engine::device::describe(&device)
        } else {
            format!("CPU {threads} threads")
        }
    );
    Ok(report(opts, &setup, gpu, &settings, &references))
}

/// CPU time (user + system) of this process, from /proc/self/stat (clock ticks of 1/100 s).
fn process_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 0, utime 11, stime 12.
    Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
}

/// Warm-up and measured steps of LoRA training on `batches` with a fresh AdamW.
fn measure(
    model: &Model,
    batches: &[crate::data::Batch],
    device: &Device,
    checkpointing: bool,
    note: &mut (dyn FnMut(&str) + Send),
) -> Result<Vec<StepTime>, String> {
    let params = param_groups(model.trainable_vars(), None);
    let mut opt = AdamW::new(params, AdamWConfig::default()).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for (i, b) in batches.iter().enumerate() {
        let (ids, labels, mask) = batch_tensors(b, device).map_err(|e| e.to_string())?;
        let am = u32_mask(b);
        let host = host_inputs(b, &am);
        let c0 = process_cpu_seconds();
        let t0 = Instant::now();
        let (loss, n) = model
            .forward_loss_with(&ids, &mask, &labels, Some(&host), true)
            .map_err(|e| e.to_string())?;
        #[allow(clippy::cast_precision_loss)]
        let mean = (loss / n.max(1) as f64).map_err(|e| e.to_string())?;
        let loss_value = mean
            .to_dtype(DType::F64)
            .and_then(|t| t.to_scalar::<f64>())
            .map_err(|e| e.to_string())?;
        let t1 = Instant::now();
        let grads = mean.backward().map_err(|e| e.to_string())?;
        // A GPU runs asynchronously: wait for its queue before reading the clock.
        device.synchronize().map_err(|e| e.to_string())?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4).map_err(|e| e.to_string())?;
        device.synchronize().map_err(|e| e.to_string())?;
        let t3 = Instant::now();
        let real = b.attention_mask.iter().filter(|&&m| m != 0).count();
        let cpu = process_cpu_seconds()
            .zip(c0)
            .map_or(f64::NAN, |(a, b)| a - b);
        note(&format!(
            "termtune (gradient checkpointing {}) step {}/{}: {:.2} s, process CPU {cpu:.2} s ({} real tokens of {})",
            if checkpointing { "on" } else { "off" },
            i + 1,
            batches.len(),
            (t3 - t0).as_secs_f64(),
            real,
            b.batch_size * b.seq_len
        ));
        times.push(StepTime {
            loss: loss_value,
            forward_s: (t1 - t0).as_secs_f64(),
            backward_s: (t2 - t1).as_secs_f64(),
            optimizer_s: (t3 - t2).as_secs_f64(),
            real_tokens: real,
            flops: step_flops(&model.cfg, b),
            padded_tokens: b.batch_size * b.seq_len,
        });
    }
    Ok(times)
}

/// Forward and backward of one step with [`crate::engine::profile`] on (on this thread): time by kind of kernel.
fn profile_step(model: &Model, b: &crate::data::Batch, device: &Device) -> Result<String, String> {
    let (ids, labels, mask) = batch_tensors(b, device).map_err(|e| e.to_string())?;
    let am = u32_mask(b);
    let host = host_inputs(b, &am);
    device.synchronize().map_err(|e| e.to_string())?;
    crate::engine::profile::enable(true);
    let t0 = Instant::now();
    let step = || -> Result<(), String> {
        let (loss, n) = model
            .forward_loss_with(&ids, &mask, &labels, Some(&host), true)
            .map_err(|e| e.to_string())?;
        #[allow(clippy::cast_precision_loss)]
        let mean = (loss / n.max(1) as f64).map_err(|e| e.to_string())?;
        mean.backward().map_err(|e| e.to_string())?;
        device.synchronize().map_err(|e| e.to_string())
    };
    let done = step();
    let total = t0.elapsed().as_secs_f64();
    let report = crate::engine::profile::report(total);
    crate::engine::profile::enable(false);
    done?;
    Ok(format!(
        "  step (forward + backward) {total:.4} s\n{report}"
    ))
}

/// Model FLOPs of one LoRA step on `b`: 4·P per real token for the frozen linears (forward 2·P, input gradient
/// 2·P, no weight gradient), P the matmul parameters (attention and MLP projections and the lm_head), plus causal
/// attention: 4·d per (query, key) pair in the forward (scores and the weighted sum, d = heads × head_dim) and
/// twice that in the backward. LoRA's own rank-r GEMMs and any recomputation are not counted: MFU measures the
/// model's work done per second, whatever the implementation spends on top (as PaLM defines it).
#[allow(clippy::cast_precision_loss)]
fn step_flops(cfg: &crate::engine::arch::ModelConfig, b: &crate::data::Batch) -> f64 {
    let (h, attn, kv) = (
        cfg.hidden_size as f64,
        (cfg.num_heads * cfg.head_dim) as f64,
        (cfg.num_kv_heads * cfg.head_dim) as f64,
    );
    let per_layer = h * attn * 2.0 + h * kv * 2.0 + 3.0 * h * cfg.intermediate_size as f64;
    let p = per_layer * cfg.num_layers as f64 + cfg.vocab_size as f64 * h;
    let mut tokens = 0f64;
    let mut pairs = 0f64;
    for row in 0..b.batch_size {
        let span = row * b.seq_len..(row + 1) * b.seq_len;
        let mask = &b.attention_mask[span.clone()];
        tokens += mask.iter().filter(|&&m| m != 0).count() as f64;
        // Causal pairs per attention block: each example of a block-diagonal row, else the row's real tokens.
        let mut run = 0f64;
        let mut last = None;
        for (i, &m) in mask.iter().enumerate() {
            let block = if b.block_diagonal {
                b.sequence_ids[span.start + i]
            } else {
                1
            };
            if m == 0 {
                continue;
            }
            if last != Some(block) {
                pairs += run * (run + 1.0) / 2.0;
                run = 0.0;
                last = Some(block);
            }
            run += 1.0;
        }
        pairs += run * (run + 1.0) / 2.0;
    }
    4.0 * p * tokens + 3.0 * 4.0 * attn * pairs * cfg.num_layers as f64
}

/// How the reference runs: threads, device (`cpu`, `cuda:0`), dtype, gradient checkpointing.
struct RefSetup {
    threads: usize,
    device: String,
    dtype: DType,
    checkpointing: bool,
}

/// The reference script, compiled in: the binary may run far from its source tree (a GPU machine).
const BENCH_PEFT_PY: &str = include_str!("../scripts/bench_peft.py");

fn run_reference(
    python: &Path,
    model: &Path,
    batches: &[crate::data::Batch],
    opts: &BenchOptions,
    setup: &RefSetup,
    note: &mut (dyn FnMut(&str) + Send),
) -> Result<serde_json::Value, String> {
    let check = std::process::Command::new(python)
        .args(["-c", "import torch, transformers, peft"])
        .output()
        .map_err(|e| format!("skipped: cannot run {}: {e}", python.display()))?;
    if !check.status.success() {
        return Err(format!(
            "skipped: {} lacks torch, transformers or peft (set TERMTUNE_BENCH_PYTHON to a Python that has them)",
            python.display()
        ));
    }
    let json: Vec<serde_json::Value> = batches
        .iter()
        .map(|b| {
            let rows = |v: Vec<serde_json::Value>| -> Vec<serde_json::Value> {
                v.chunks(b.seq_len).map(|c| serde_json::Value::Array(c.to_vec())).collect()
            };
            serde_json::json!({
                "input_ids": rows(b.input_ids.iter().map(|&x| serde_json::json!(x)).collect()),
                "labels": rows(b.labels.iter().map(|&x| serde_json::json!(x)).collect()),
                "attention_mask": rows(b.attention_mask.iter().map(|&x| serde_json::json!(x)).collect()),
            })
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("termtune-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let batches_path = dir.join("batches.json");
    std::fs::write(&batches_path, serde_json::to_vec(&json).unwrap_or_default())
        .map_err(|e| e.to_string())?;
    let script = dir.join("bench_peft.py");
    std::fs::write(&script, BENCH_PEFT_PY).map_err(|e| e.to_string())?;
    note(&format!(
        "running the PyTorch + PEFT reference on the same batches (gradient checkpointing {})",
        if setup.checkpointing { "on" } else { "off" }
    ));
    let mut cmd = std::process::Command::new(python);
    cmd.arg(&script)
        .args(["--model", &model.display().to_string()])
        .args(["--batches", &batches_path.display().to_string()])
        .args(["--threads", &setup.threads.to_string()])
        .args(["--rank", &opts.lora_rank.to_string()])
        .args(["--alpha", &(opts.lora_rank * 2).to_string()])
        .args(["--warmup", &opts.warmup.to_string()])
        .args(["--dora", if opts.dora { "1" } else { "0" }])
        .args(["--device", &setup.device])
        .args([
            "--dtype",
            if setup.dtype == DType::BF16 {
                "bfloat16"
            } else {
                "float32"
            },
        ]);
    if setup.checkpointing {
        cmd.arg("--gradient-checkpointing");
    }
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("the reference failed to start: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        return Err(format!("the reference failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).map_err(|e| format!("unreadable reference output: {e}"))
}

/// The summary figures of one run: step, forward, backward, optimizer medians, real and padded tokens/s, and
/// the two memory figures (peak RSS, or the GPU pool's peak in use and reserved).
fn figures(
    opts: &BenchOptions,
    times: &[StepTime],
    mem_gib: (Option<f64>, Option<f64>),
) -> [f64; 9] {
    let measured = &times[opts.warmup.min(times.len())..];
    let total: f64 = measured
        .iter()
        .map(|t| t.forward_s + t.backward_s + t.optimizer_s)
        .sum();
    #[allow(clippy::cast_precision_loss)]
    let real: f64 = measured.iter().map(|t| t.real_tokens as f64).sum();
    #[allow(clippy::cast_precision_loss)]
    let padded: f64 = measured.iter().map(|t| t.padded_tokens as f64).sum();
    let flops: f64 = measured.iter().map(|t| t.flops).sum();
    let med = |f: fn(&StepTime) -> f64| median(measured.iter().map(f).collect());
    [
        med(|t| t.forward_s + t.backward_s + t.optimizer_s),
        med(|t| t.forward_s),
        med(|t| t.backward_s),
        med(|t| t.optimizer_s),
        real / total.max(1e-9),
        padded / total.max(1e-9),
        mem_gib.0.unwrap_or(f64::NAN),
        mem_gib.1.unwrap_or(f64::NAN),
        100.0 * flops / total.max(1e-9) / (opts.peak_tflops * 1e12),
    ]
}

/// The reference's figures in the order of [`figures`]; `flops_per_token` (model FLOPs per real token of the same
/// batches) gives its MFU.
fn reference_figures(
    r: &serde_json::Value,
    gpu: bool,
    flops_per_token: f64,
    peak_tflops: f64,
) -> [f64; 9] {
    let g = |k: &str| {
        r.get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    let gib = f64::from(1u32 << 30);
    let (m0, m1) = if gpu {
        (
            g("peak_allocated_bytes") / gib,
            g("peak_reserved_bytes") / gib,
        )
    } else {
        (g("peak_rss_bytes") / gib, f64::NAN)
    };
    [
        g("step_s_median"),
        g("forward_s_median"),
        g("backward_s_median"),
        g("optimizer_s_median"),
        g("real_tokens_per_s"),
        g("padded_tokens_per_s"),
        m0,
        m1,
        100.0 * flops_per_token * g("real_tokens_per_s") / (peak_tflops * 1e12),
    ]
}

type Reference = (bool, Result<serde_json::Value, String>);

fn report(
    opts: &BenchOptions,
    setup: &str,
    gpu: bool,
    settings: &[Setting],
    references: &[Reference],
) -> String {
    let on_off = |c: bool| if c { "on" } else { "off" };
    let ours: Vec<[f64; 9]> = settings
        .iter()
        .map(|s| figures(opts, &s.times, s.mem_gib))
        .collect();
    // The same batches on both sides: model FLOPs per real token from termtune's measured steps.
    let flops_per_token = settings.first().map_or(f64::NAN, |s| {
        let measured = &s.times[opts.warmup.min(s.times.len())..];
        #[allow(clippy::cast_precision_loss)]
        let tokens: f64 = measured.iter().map(|t| t.real_tokens as f64).sum();
        measured.iter().map(|t| t.flops).sum::<f64>() / tokens.max(1.0)
    });
    let theirs: Vec<(bool, [f64; 9])> = references
        .iter()
        .filter_map(|(c, r)| {
            r.as_ref().ok().map(|v| {
                (
                    *c,
                    reference_figures(v, gpu, flops_per_token, opts.peak_tflops),
                )
            })
        })
        .collect();
    let measured = settings
        .first()
        .map_or(0, |s| s.times.len().saturating_sub(opts.warmup));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} r {} on all linear layers, {setup}, batch {} x cutoff {}{}, {measured} measured steps after {} warm-up",
        if opts.dora { "DoRA" } else { "LoRA" },
        opts.lora_rank,
        opts.batch_size,
        opts.cutoff_len,
        if opts.packing { " packed" } else { "" },
        opts.warmup
    );
    if gpu {
        let _ = writeln!(
            out,
            "MFU: model FLOPs (4 x matmul params per real token + causal attention, no recomputation) per second \
             against {} TFLOP/s",
            opts.peak_tflops
        );
    }
    // Each termtune setting is compared with the reference of the same checkpointing setting, else the first.
    let partner = |c: bool| -> Option<[f64; 9]> {
        theirs
            .iter()
            .find(|(rc, _)| *rc == c)
            .or_else(|| theirs.first())
            .map(|(_, f)| *f)
    };
    let mut head = format!("{:<28}", "gradient checkpointing:");
    for s in settings {
        let _ = write!(head, "{:>12}", format!("tt {}", on_off(s.checkpointing)));
    }
    for (c, _) in &theirs {
        let _ = write!(head, "{:>12}", format!("PEFT {}", on_off(*c)));
    }
    if !theirs.is_empty() {
        for s in settings {
            let _ = write!(head, "{:>12}", format!("ratio {}", on_off(s.checkpointing)));
        }
    }
    let _ = writeln!(out, "{}", head.trim_end());
    let mut rows = vec![
        ("seconds per step (median)", 0, false),
        ("  forward", 1, false),
        ("  backward", 2, false),
        ("  optimizer", 3, false),
        ("real tokens/s", 4, true),
        ("padded tokens/s", 5, true),
    ];
    if gpu {
        rows.push(("peak GPU allocated (GiB)", 6, false));
        rows.push(("peak GPU reserved (GiB)", 7, false));
        rows.push(("MFU (%)", 8, true));
    } else {
        rows.push(("peak RSS (GiB)", 6, false));
    }
    for (label, i, higher_is_better) in rows {
        let mut line = format!("{label:<28}");
        for o in &ours {
            let _ = write!(line, "{:>12.3}", o[i]);
        }
        for (_, r) in &theirs {
            let _ = write!(line, "{:>12.3}", r[i]);
        }
        for (s, o) in settings.iter().zip(&ours) {
            if let Some(r) = partner(s.checkpointing) {
                let ratio = if higher_is_better {
                    o[i] / r[i]
                } else {
                    r[i] / o[i]
                };
                let _ = write!(line, "{:>11.2}x", ratio);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    if !theirs.is_empty() {
        let _ = writeln!(
            out,
            "(ratio > 1 means termtune is better: faster, or less memory; each termtune setting against the reference with the same checkpointing where it ran)"
        );
    }
    for s in settings {
        let losses: Vec<String> = s.times.iter().map(|t| format!("{:.4}", t.loss)).collect();
        let _ = writeln!(
            out,
            "termtune losses (ckpt {}): {}",
            on_off(s.checkpointing),
            losses.join(" ")
        );
    }
    for (c, r) in references {
        match r {
            Ok(r) => {
                let theirs: Vec<String> = r
                    .get("losses")
                    .and_then(serde_json::Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(serde_json::Value::as_f64)
                            .map(|l| format!("{l:.4}"))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "reference losses (ckpt {}): {}",
                    on_off(*c),
                    theirs.join(" ")
                );
                if let Some(tool) = r.get("tool").and_then(serde_json::Value::as_str) {
                    let _ = writeln!(out, "reference: {tool}");
                }
            }
            Err(why) => {
                let _ = writeln!(out, "PyTorch+PEFT reference (ckpt {}): {why}", on_off(*c));
            }
        }
    }
    out
}
