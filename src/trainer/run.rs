//! One training run, start to finish: load, tokenise, train with accumulation / clipping / schedule,
//! evaluate, checkpoint, resume, and write LLaMA-Factory's run folder. The caller owns the thread;
//! commands arrive on a channel between optimizer steps, events leave through a callback.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::config::{self, FinetuningType, IntervalStrategy, Loaded, Preset};
use crate::data::{self, Batch, Encoder, PreparedDataset, Sampler};
use crate::engine::adapter::{
    convert_pissa, load_adapters_for_training, merge_adapters, parse_adapter_list, save_adapter,
    save_adapter_as,
};
use crate::engine::pissa::LoraInit;
use crate::engine::source::SourceProgress;
use crate::engine::value_head::VALUE_HEAD_FILE;
use crate::engine::weights::save_safetensors;
use crate::engine::{AttnMask, Finetune, Model, SequenceLogps, ValueHead};
use crate::fsutil::{human_bytes, write_file};
use crate::resolve;

use super::checkpoint::{PendingCheckpoint, estimate_checkpoint_bytes, latest_checkpoint, rotate};
use super::optim::{AdamW, AdamWConfig, Param, clip_grad_norm, param_groups};
use super::pref::{
    BatchLoss, KtoConfig, KtoExample, PairLogps, PrefConfig, StageMetrics, kto_loss,
    preference_loss, reward_pair_loss,
};
use super::protocol::{RunSummary, StepMetrics, TrainCommand, TrainEvent};
use super::runlog::{
    HistoryEntry, LogLine, ResumeState, TrainerState, append_log_line, format_duration, round_to,
};
use super::schedule::{Schedule, total_steps, updates_per_epoch};

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("output_dir {path}: {why}")]
    OutputDir { path: PathBuf, why: String },
    #[error(transparent)]
    Source(#[from] crate::engine::source::SourceError),
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Optim(#[from] super::optim::OptimError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(
        "the loss became {value} at step {step}; training stopped without applying that update{kept}. Lower `learning_rate`, keep `max_grad_norm` at 1.0, or check the data"
    )]
    NonFinite { step: u64, value: f64, kept: String },
    #[error(transparent)]
    DiskFull(Box<DiskFullError>),
    #[error("{0}")]
    Invalid(String),
}

/// A full disk while saving, told with the file, the sizes and what to do.
#[derive(Debug, thiserror::Error)]
#[error(
    "no space left on device while writing {} ({}): {what} needs about {} and the file system of {} has {} free; {kept}. Free some space there{limit}",
    file.display(),
    human_bytes(*file_bytes),
    human_bytes(*needed_bytes),
    out.display(),
    free_bytes.map_or_else(|| "an unknown amount".to_string(), human_bytes),
)]
pub struct DiskFullError {
    /// The file being written when the disk filled.
    pub file: PathBuf,
    pub file_bytes: u64,
    /// What was being saved ("checkpoint-40").
    pub what: String,
    /// The estimated size of all of it.
    pub needed_bytes: u64,
    pub out: PathBuf,
    pub free_bytes: Option<u64>,
    /// What is kept ("the last good checkpoint … is intact").
    pub kept: String,
    /// The `save_total_limit` hint.
    pub limit: String,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrainError {
    let context = context.into();
    move |source| TrainError::Io { context, source }
}

/// How often a run paused on a full disk tries to save again by itself.
pub const DISK_FULL_RETRY: Duration = Duration::from_secs(10);
/// How long a run waits on a full disk for room before it ends with its last good checkpoint.
pub const DISK_FULL_WAIT: Duration = Duration::from_secs(30 * 60);

/// How the run ended, for the caller's exit status.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished(RunSummary),
    /// Stopped on request (`Stop`), with or without a final checkpoint.
    Stopped(RunSummary),
}

/// Runs `loaded.preset` to the end (or until a `Stop` command), on `device`.
///
/// With `num_threads: N` (N > 0) the work runs inside a rayon pool of N threads, so candle's GEMMs and the fused
/// kernels use at most N cores; events and commands are relayed between the caller's thread and the pool.
pub fn run_training(
    loaded: &Loaded,
    device: &Device,
    commands: &Receiver<TrainCommand>,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    run_training_on_threads(loaded, device, commands, emit)
        .map_err(|e| explain_out_of_memory(e, &loaded.preset, device))
}

/// A GPU out-of-memory error, turned into what to lower (the checkpoints already written stay).
fn explain_out_of_memory(e: TrainError, p: &Preset, device: &Device) -> TrainError {
    let text = e.to_string();
    if device.is_cpu() || !crate::engine::device::is_out_of_memory(&text) {
        return e;
    }
    // candle appends a backtrace to some errors: the first line says it all.
    let text = text.lines().next().unwrap_or_default().trim().to_string();
    let kept = latest_checkpoint(Path::new(&p.output_dir)).map_or_else(
        || "no checkpoint had been written yet".to_string(),
        |(s, d)| format!("the last checkpoint {} (step {s}) is kept", d.display()),
    );
    let ckpt = if p.disable_gradient_checkpointing {
        "turn gradient checkpointing back on (`disable_gradient_checkpointing: false`)"
    } else {
        "use a smaller model or a GPU with more memory"
    };
    TrainError::Invalid(format!(
        "{} ran out of memory: lower `per_device_train_batch_size` ({}; raise `gradient_accumulation_steps` to keep the effective batch) or `cutoff_len` ({}), or {ckpt}; {kept}. ({text})",
        crate::engine::device::describe(device),
        p.per_device_train_batch_size,
        p.cutoff_len,
    ))
}

fn run_training_on_threads(
    loaded: &Loaded,
    device: &Device,
    commands: &Receiver<TrainCommand>,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    let n = loaded.preset.num_threads;
    if n == 0 {
        return run_training_here(loaded, device, commands, emit);
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("termtune-train-{i}"))
        .build()
        .map_err(|e| {
            TrainError::Invalid(format!("num_threads: {n}: cannot start the threads: {e}"))
        })?;
    with_relay(commands, emit, |cmds, events| {
        pool.install(move || {
            run_training_here(loaded, device, &cmds, &mut |ev| {
                let _ = events.send(ev);
            })
        })
    })
}

/// Runs `work` on a scoped thread with its own command channel and event sink, relaying the caller's commands
/// to it and its events back to `emit` on this thread (which `work` may not borrow: neither is `Send`).
fn with_relay<T: Send>(
    commands: &Receiver<TrainCommand>,
    emit: &mut dyn FnMut(TrainEvent),
    work: impl FnOnce(
        Receiver<TrainCommand>,
        std::sync::mpsc::Sender<TrainEvent>,
    ) -> Result<T, TrainError>
    + Send,
) -> Result<T, TrainError> {
    use std::sync::mpsc::{RecvTimeoutError, channel};
    let (cmd_tx, cmd_rx) = channel::<TrainCommand>();
    let (ev_tx, ev_rx) = channel::<TrainEvent>();
    std::thread::scope(|s| {
        let worker = s.spawn(move || work(cmd_rx, ev_tx));
        let mut cmd_tx = Some(cmd_tx);
        loop {
            match ev_rx.recv_timeout(Duration::from_millis(20)) {
                Ok(ev) => emit(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            loop {
                match commands.try_recv() {
                    Ok(c) => {
                        if let Some(tx) = &cmd_tx {
                            let _ = tx.send(c);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    // The caller hung up: so does the relay (a paused run then stops, as without the pool).
                    Err(TryRecvError::Disconnected) => {
                        cmd_tx = None;
                        break;
                    }
                }
            }
        }
        worker.join().unwrap_or_else(|_| {
            Err(TrainError::Invalid(
                "the training thread panicked; see the log".into(),
            ))
        })
    })
}

fn run_training_here(
    loaded: &Loaded,
    device: &Device,
    commands: &Receiver<TrainCommand>,
    emit: &mut dyn FnMut(TrainEvent),
) -> Result<Outcome, TrainError> {
    let p = &loaded.preset;
    if p.streaming {
        return Err(TrainError::Invalid(
            "`streaming: true` is not supported by the trainer yet (the data pipeline can stream, the loop cannot); remove it: the dataset is then tokenised once and cached".into(),
        ));
    }
    let out_dir = PathBuf::from(&p.output_dir);
    prepare_output_dir(&out_dir, p)?;

    // Resume point: explicit, or the newest complete checkpoint of output_dir (LLaMA-Factory).
    let resume = match (&p.resume_from_checkpoint, p.overwrite_output_dir) {
        (Some(path), _) => {
            let dir = PathBuf::from(path);
            let state = TrainerState::load(&dir.join("trainer_state.json"))
                .map_err(io_err(format!("resume_from_checkpoint {}", dir.display())))?;
            Some((dir, state, "resume_from_checkpoint".to_string()))
        }
        (None, false) => match latest_checkpoint(&out_dir) {
            Some((_, dir)) => {
                let state = TrainerState::load(&dir.join("trainer_state.json"))
                    .map_err(io_err(format!("reading {}", dir.display())))?;
                Some((
                    dir,
                    state,
                    "the newest complete checkpoint in output_dir (set overwrite_output_dir: true to start afresh)".to_string(),
                ))
            }
            None => None,
        },
        (None, true) => None,
    };

    // The dataset names are checked before the (slow) model load, so a typo fails in a second.
    let opts = resolve::data_options(p);
    data::registry::resolve_all(&opts.dataset_dir, &opts.dataset)?;
    data::registry::resolve_all(&opts.dataset_dir, &opts.eval_dataset)?;

    // Model.
    let (dtype, note) = resolve::train_dtype(p, device).map_err(TrainError::Invalid)?;
    if let Some(note) = note {
        emit(TrainEvent::Warning(note));
    }
    let mut last_pct = 0u64;
    let mut progress = |sp: SourceProgress| {
        use crate::engine::hub::HubProgress;
        let what = match sp {
            SourceProgress::Note(line) => line,
            SourceProgress::Hub(HubProgress::Start { file, bytes }) => {
                last_pct = 0;
                #[allow(clippy::cast_precision_loss)]
                let mb = bytes as f64 / 1e6;
                format!("downloading {file} ({mb:.1} MB)")
            }
            SourceProgress::Hub(HubProgress::Advance { file, done, total }) => {
                let pct = done * 100 / total.max(1);
                if pct < last_pct + 10 {
                    return;
                }
                last_pct = pct;
                format!("downloading {file}: {pct}%")
            }
            SourceProgress::Hub(HubProgress::Done { file }) => format!("downloaded {file}"),
            SourceProgress::Hub(HubProgress::Cached { .. }) => return,
        };
        emit(TrainEvent::Loading { what });
    };
    // Hub datasets first: a wrong split or subset fails before the model loads.
    data::pipeline::fetch_hub_datasets(&opts, &mut |hp| {
        progress(SourceProgress::Hub(hp.clone()));
    })?;
    let resolve::PresetModel {
        mut files,
        base_name,
        tokenizer,
        ..
    } = resolve::load_base(
        p,
        crate::config::Purpose::Train,
        dtype,
        device,
        &mut progress,
    )?;
    if let Some(line) = memory_check(p, &files.config, device)? {
        emit(line);
    }
    if let Some(w) = p.pissa_warning() {
        emit(TrainEvent::Warning(w));
    }
    if p.pissa_init && resume.is_none() {
        emit(TrainEvent::Loading {
            what: match p.pissa_iter {
                -1 => "PiSSA: the exact SVD of each adapted weight".into(),
                n => format!(
                    "PiSSA: a randomized SVD of each adapted weight ({n} subspace iterations)"
                ),
            },
        });
    }
    let mut model = build_model(
        p,
        &mut files,
        dtype,
        device,
        resume.as_ref().map(|r| r.0.as_path()),
    )?;
    let objective = match p.stage {
        config::Stage::Dpo => Some(Objective::Dpo(PrefConfig::from_preset(p))),
        config::Stage::Kto => Some(Objective::Kto(KtoConfig::from_preset(p))),
        config::Stage::Rm => Some(Objective::Rm(value_head(
            p,
            &model,
            resume.as_ref().map(|r| r.0.as_path()),
        )?)),
        _ => None,
    };
    let stage = match objective {
        None => None,
        Some(objective) => {
            let needs_reference = match &objective {
                Objective::Dpo(cfg) => cfg.loss.uses_reference(),
                Objective::Kto(_) => true,
                Objective::Rm(_) => false,
            };
            if !matches!(objective, Objective::Rm(_)) {
                // TRL's preference trainers switch dropout off (`disable_dropout`), LoRA's too.
                model.set_lora_dropout(0.0);
            }
            let reference = if !needs_reference {
                Reference::None
            } else if let Some(rp) = resolve::reference_preset(p) {
                emit(TrainEvent::Loading {
                    what: format!("loading the reference model {}", rp.model_name_or_path),
                });
                Reference::Frozen(Box::new(reference_model(
                    &rp,
                    &model,
                    dtype,
                    device,
                    &mut |sp| {
                        if let SourceProgress::Note(what) = sp {
                            emit(TrainEvent::Loading { what });
                        }
                    },
                )?))
            } else if p.finetuning_type == FinetuningType::Lora {
                Reference::AdapterOff
            } else {
                emit(TrainEvent::Loading {
                    what: "loading the reference model (a frozen copy of the base)".into(),
                });
                Reference::Frozen(Box::new(Model::from_files(
                    &files,
                    dtype,
                    device,
                    &Finetune::Frozen,
                )?))
            };
            Some(Preference {
                objective,
                ld_alpha: p.ld_alpha,
                bco_running: std::cell::Cell::default(),
                reference,
                pending: StageMetrics::default(),
                last_eval: None,
                ref_cache: std::cell::RefCell::default(),
            })
        }
    };
    // The model and a frozen reference hold what they use of the loaded weights (a full or freeze run's Vars are
    // copies); the rest of the run reads only the files' configs.
    files.release_weights();

    // Data.
    emit(TrainEvent::Loading {
        what: "tokenising the dataset".into(),
    });
    let encoder = resolve::encoder(&opts, &tokenizer)?;
    if !encoder.added_tokens.is_empty() {
        return Err(TrainError::Invalid(format!(
            "template `{}` needs tokens the tokenizer lacks ({}); resizing the vocabulary is not supported yet: use the model's own template",
            p.template.as_deref().unwrap_or("(tokenizer)"),
            encoder.added_tokens.join(", ")
        )));
    }
    for w in &encoder.warnings {
        emit(TrainEvent::Warning(w.clone()));
    }
    let dataset = data::prepare_dataset(&opts, &encoder)?;
    for w in &dataset.warnings {
        emit(TrainEvent::Warning(w.clone()));
    }
    if dataset.train.is_empty() {
        return Err(TrainError::Invalid(
            "the dataset has no usable training examples after tokenisation".into(),
        ));
    }

    let folder_files = FolderFiles::new(p, &encoder, &files);
    let mut trainer = Trainer::new(
        loaded,
        model,
        dataset,
        base_name,
        out_dir,
        folder_files,
        stage,
    )?;
    if p.use_muon {
        // LLaMA-Factory's "Using Muon optimizer with N Muon params and M AdamW params".
        let muon = trainer.opt.muon_params();
        emit(TrainEvent::Loading {
            what: format!(
                "optimizer: Muon for {muon} matrices, AdamW for {} other tensors (use_muon)",
                trainer.opt.params().len() - muon
            ),
        });
    }
    if p.pissa_convert {
        // LLaMA-Factory's PissaConvertCallback: the start, saved as a plain adapter, for the conversion at the end.
        let start = trainer.out.join(PISSA_INIT_DIR);
        if resume.is_none() {
            save_adapter_as(
                &trainer.model,
                &start,
                &trainer.base_name,
                LoraInit::Default,
            )?;
        } else if !start.join(crate::engine::adapter::CONFIG_FILE).is_file() {
            return Err(TrainError::Invalid(format!(
                "pissa_convert needs {} (the adapter's start, written when the run began) to convert at the end, and it is missing; train afresh or remove pissa_convert",
                start.display()
            )));
        }
    }
    if let Some((dir, state, why)) = resume {
        trainer.restore(&dir, &state)?;
        emit(TrainEvent::Resuming {
            checkpoint: dir,
            step: state.global_step,
            why,
        });
    }
    trainer.run(commands, emit)
}

/// The estimated peak GPU memory against the GPU's free memory, before the first step: a note, or a warning that
/// names what to lower when it does not fit (the run still tries: the estimate is approximate).
fn memory_check(
    p: &Preset,
    config: &serde_json::Value,
    device: &Device,
) -> Result<Option<TrainEvent>, TrainError> {
    let Some((free, total)) = crate::engine::device::memory_info(device) else {
        return Ok(None);
    };
    let cfg = crate::engine::ModelConfig::from_hf_config(config)?;
    let Ok((_, est)) = resolve::memory_estimate(
        p,
        &cfg,
        device.is_cpu(),
        resolve::base_storage(p),
        None,
        resolve::reference_config(p).as_ref(),
    ) else {
        return Ok(None);
    };
    let gib = |b: usize| {
        #[allow(clippy::cast_precision_loss)]
        let g = b as f64 / f64::from(1u32 << 30);
        g
    };
    // The base weights are already on the device: they count as free for the comparison.
    let free = free + usize::try_from(est.weights).unwrap_or(0);
    let head = format!(
        "estimated peak GPU memory at {} x cutoff_len {}: {} of {:.1} GiB free ({:.1} GiB total)",
        p.micro_batch_words(),
        p.cutoff_len,
        est.describe(),
        gib(free),
        gib(total)
    );
    Ok(Some(if est.fits(free as u64) {
        TrainEvent::Loading { what: head }
    } else {
        TrainEvent::Warning(format!(
            "{head}: likely out of memory; lower `per_device_train_batch_size` or `cutoff_len`{}",
            if p.disable_gradient_checkpointing {
                ", or set `disable_gradient_checkpointing: false`"
            } else {
                ""
            }
        ))
    }))
}

/// Creates `output_dir` and proves it writable before any work is done; refuses to overwrite a
/// finished run unless asked (LLaMA-Factory's rule).
fn prepare_output_dir(out: &Path, p: &Preset) -> Result<(), TrainError> {
    let err = |why: String| TrainError::OutputDir {
        path: out.to_path_buf(),
        why,
    };
    std::fs::create_dir_all(out).map_err(|e| err(format!("cannot create it: {e}")))?;
    let probe = out.join(".termtune-write-test");
    std::fs::write(&probe, vec![0u8; 64 * 1024])
        .map_err(|e| err(format!("not writable (full disk or no permission): {e}")))?;
    let _ = std::fs::remove_file(&probe);
    let finished =
        out.join("adapter_model.safetensors").exists() || out.join("model.safetensors").exists();
    if finished
        && latest_checkpoint(out).is_none()
        && p.resume_from_checkpoint.is_none()
        && !p.overwrite_output_dir
    {
        return Err(err(
            "already holds a finished run and no checkpoint to resume; set `overwrite_output_dir: true` or pick another output_dir".into(),
        ));
    }
    if p.overwrite_output_dir {
        let _ = std::fs::remove_file(out.join("trainer_log.jsonl"));
    }
    Ok(())
}

/// LLaMA-Factory's folders of `pissa_convert`: the PiSSA adapter's start, and the plain LoRA it converts to.
pub const PISSA_INIT_DIR: &str = "pissa_init";
pub const PISSA_CONVERTED_DIR: &str = "pissa_converted";

/// The model with its trainable part: fresh LoRA, adapters to continue, or freeze/full. When
/// resuming, the checkpoint's weights replace the fresh ones.
fn build_model(
    p: &Preset,
    files: &mut crate::engine::ModelFiles,
    dtype: DType,
    device: &Device,
    resume_dir: Option<&Path>,
) -> Result<Model, TrainError> {
    let adapters = p
        .adapter_name_or_path
        .as_deref()
        .map(parse_adapter_list)
        .unwrap_or_default();
    let lora = p.finetuning_type == FinetuningType::Lora;
    let model = if lora {
        let mut m = Model::from_files(files, dtype, device, &Finetune::Frozen)?;
        // A LoRA run needs no other copy of the base (its reference is the model with the adapter off, or
        // `ref_model`): released before merging or PiSSA replaces any weight.
        files.release_weights();
        match (resume_dir, adapters.as_slice()) {
            (Some(dir), _) => {
                // The checkpoint holds the adapter being trained; earlier adapters were merged.
                if adapters.len() > 1 || (p.create_new_adapter && !adapters.is_empty()) {
                    let merged = if p.create_new_adapter {
                        &adapters[..]
                    } else {
                        &adapters[..adapters.len() - 1]
                    };
                    merge_adapters(&mut m, merged)?;
                }
                load_adapters_for_training(&mut m, &[dir.to_path_buf()])?;
            }
            (None, []) => m.add_lora(&resolve::lora_spec(p)?)?,
            (None, list) if p.create_new_adapter => {
                merge_adapters(&mut m, list)?;
                m.add_lora(&resolve::lora_spec(p)?)?;
            }
            (None, list) => load_adapters_for_training(&mut m, list)?,
        }
        m
    } else {
        let m = Model::from_files(files, dtype, device, &resolve::finetune(p)?)?;
        if let Some(dir) = resume_dir {
            set_trainable_from(&m, &dir.join("model.safetensors"))?;
        }
        m
    };
    let mut model = model;
    // LLaMA-Factory's default: recompute each layer in the backward instead of keeping its activations.
    model.checkpointing = !p.disable_gradient_checkpointing;
    model.neftune_alpha = p.neftune_noise_alpha;
    model.token_loss = crate::engine::ops::TokenLoss {
        smoothing: p.label_smoothing_factor,
        dft: p.use_dft_loss,
        eaft: p.use_eaft_loss.then_some(p.eaft_alpha),
    };
    Ok(model)
}

/// Sets every trainable tensor of `m` (LoRA with its DoRA magnitudes, or the trained base weights) to its value in
/// the checkpoint file `path` (adapter_model.safetensors or model.safetensors), by name.
fn set_trainable_from(m: &Model, path: &Path) -> Result<(), TrainError> {
    let tensors = candle_core::safetensors::load(path, &m.device)?;
    for (name, var) in m.trainable_vars() {
        let t = tensors.get(&name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: tensor {name} is missing; the checkpoint belongs to another model",
                path.display()
            ))
        })?;
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The state of a run between steps.
struct Trainer<'a> {
    loaded: &'a Loaded,
    p: &'a Preset,
    model: Model,
    data: PreparedDataset,
    base_name: String,
    out: PathBuf,
    opt: AdamW,
    schedule: Schedule,
    total_steps: u64,
    updates_per_epoch: u64,
    step: u64,
    tokens_seen: u64,
    elapsed_before: Duration,
    history: Vec<HistoryEntry>,
    /// Losses since the last log line (Hugging Face logs their mean).
    pending_losses: Vec<f64>,
    last_eval: Option<f64>,
    /// `compute_accuracy`: the last evaluation's token accuracy.
    last_accuracy: Option<f64>,
    /// `load_best_model_at_end`: the best `metric_for_best_model` so far and its step.
    best: Option<(f64, u64)>,
    /// `early_stopping_steps`: evaluations since the best one.
    patience: u64,
    folder_files: FolderFiles,
    /// Stages dpo, kto and rm: the objective, the reference and the metrics since the last log line.
    pref: Option<Preference>,
}

/// What a preference or reward stage adds to a run.
struct Preference {
    objective: Objective,
    /// `ld_alpha` (stage dpo): LD-DPO's weight of the policy's log-probabilities of the tokens of the longer answer
    /// past the shorter one's length (LLaMA-Factory's `get_batch_logps`; the reference's are not reweighted).
    ld_alpha: Option<f64>,
    /// `pref_bco_weight`: BCO's reward baseline, updated with every dpo batch's mean reward (evaluation batches
    /// too, as in LLaMA-Factory, whose `bco_loss` runs in both).
    bco_running: std::cell::Cell<super::pref::RunningMean>,
    reference: Reference,
    /// The micro-batches' metrics since the last log line.
    pending: StageMetrics,
    /// The last evaluation's metrics.
    last_eval: Option<StageMetrics>,
    /// The reference's log-probability of each sequence, by (evaluation split?, sequence index): the reference is
    /// frozen, so from the second epoch on its forward is skipped.
    ref_cache: std::cell::RefCell<HashMap<(bool, usize), f64>>,
}

/// The loss of a preference or reward stage.
enum Objective {
    Dpo(PrefConfig),
    Kto(KtoConfig),
    /// The reward model's value head (trained with the model).
    Rm(ValueHead),
}

/// The reference model of dpo and kto.
enum Reference {
    /// ORPO, SimPO and rm use none.
    None,
    /// LoRA: the trained model with its adapter switched off (no second copy of the weights).
    AdapterOff,
    /// Freeze and full training: a frozen copy of the starting weights.
    Frozen(Box<Model>),
}

/// The way back from a stage's per-row values to the trainable parameters.
enum Backprop {
    /// Sequence log-probabilities (dpo, kto).
    Logps(SequenceLogps),
    /// The value head's scores (rm), a tracked tensor.
    Scores(Tensor),
}

impl Backprop {
    /// Gradients of a loss L given ∂L/∂(each row's value).
    fn backward(&self, dl: &[f64]) -> Result<GradStore, TrainError> {
        match self {
            Backprop::Logps(l) => Ok(l.backward(dl)?),
            Backprop::Scores(v) => {
                let d = Tensor::new(dl, v.device())?.to_dtype(v.dtype())?;
                Ok((v * d)?.sum_all()?.backward()?)
            }
        }
    }
}

/// The reference of dpo or kto from `ref_model`'s preset ([`resolve::reference_preset`]: its adapters, its
/// `quantization_bit`), frozen (LLaMA-Factory's `create_ref_model`). It must score the same tokens as the policy.
fn reference_model(
    rp: &Preset,
    policy: &Model,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(SourceProgress),
) -> Result<Model, TrainError> {
    let name = &rp.model_name_or_path;
    // Its notes (reading, quantizing, adapters) say they are the reference's.
    let mut progress = |sp: SourceProgress| match sp {
        SourceProgress::Note(n) => progress(SourceProgress::Note(format!("ref_model: {n}"))),
        other => progress(other),
    };
    let loaded = resolve::load_base(
        rp,
        crate::config::Purpose::Train,
        dtype,
        device,
        &mut progress,
    )?;
    let mut files = loaded.files;
    let mut m = Model::from_files(&files, dtype, device, &Finetune::Frozen)?;
    let quantized = files.is_quantized();
    files.release_weights();
    let adapters = rp
        .adapter_name_or_path
        .as_deref()
        .map(parse_adapter_list)
        .unwrap_or_default();
    crate::engine::adapter::apply_adapters(&mut m, &adapters, quantized, &mut |n| {
        progress(SourceProgress::Note(n));
    })?;
    if m.cfg.vocab_size != policy.cfg.vocab_size {
        return Err(TrainError::Invalid(format!(
            "`ref_model` {name} has a vocabulary of {} tokens, the trained model {}: the reference must use the same tokenizer",
            m.cfg.vocab_size, policy.cfg.vocab_size
        )));
    }
    Ok(m)
}

/// The reward model's value head: a checkpoint's when resuming, else the one beside the last of
/// `adapter_name_or_path` (LLaMA-Factory's `load_valuehead_params`), else a fresh one.
fn value_head(
    p: &Preset,
    model: &Model,
    resume_dir: Option<&Path>,
) -> Result<ValueHead, TrainError> {
    let hidden = model.cfg.hidden_size;
    if let Some(dir) = resume_dir {
        return Ok(ValueHead::load(dir, hidden, &model.device)?);
    }
    let adapters = p
        .adapter_name_or_path
        .as_deref()
        .map(parse_adapter_list)
        .unwrap_or_default();
    if let Some(last) = adapters.last()
        && last.join(VALUE_HEAD_FILE).exists()
    {
        return Ok(ValueHead::load(last, hidden, &model.device)?);
    }
    Ok(ValueHead::new(hidden, p.seed, &model.device)?)
}

/// What a saved folder carries besides the weights: the tokenizer files, and for freeze and full fine-tuning the
/// model's `config.json` and `generation_config.json` (the folder is then a model transformers and termtune load).
struct FolderFiles {
    tokenizer_json: Option<String>,
    tokenizer_config: serde_json::Value,
    /// The model's config.json as trained (a `rope_scaling` extension included).
    config: serde_json::Value,
    generation_config: serde_json::Value,
}

impl FolderFiles {
    fn new(p: &config::Preset, encoder: &Encoder, files: &crate::engine::ModelFiles) -> Self {
        Self {
            tokenizer_json: encoder.tokenizer.to_string(false).ok(),
            tokenizer_config: run_tokenizer_config(p, encoder, files),
            config: files.config.clone(),
            generation_config: crate::engine::weights::generation_config(
                &files.generation_config,
                &files.config,
            ),
        }
    }
}

impl<'a> Trainer<'a> {
    fn new(
        loaded: &'a Loaded,
        model: Model,
        data: PreparedDataset,
        base_name: String,
        out: PathBuf,
        folder_files: FolderFiles,
        pref: Option<Preference>,
    ) -> Result<Self, TrainError> {
        let p = &loaded.preset;
        let mut vars = model.trainable_vars();
        if let Some(Preference {
            objective: Objective::Rm(head),
            ..
        }) = &pref
        {
            vars.extend(head.vars());
        }
        let params = param_groups(vars, p.loraplus_lr_ratio);
        if params.is_empty() {
            return Err(TrainError::Invalid(
                "nothing to train: the model has no trainable parameters".into(),
            ));
        }
        let opt = AdamW::new(
            params,
            AdamWConfig {
                beta1: p.adam_beta1,
                beta2: p.adam_beta2,
                eps: p.adam_epsilon,
                weight_decay: p.weight_decay,
                muon: p.use_muon,
            },
        )?;
        let n = data.train_examples();
        let total = total_steps(
            n,
            p.per_device_train_batch_size,
            p.gradient_accumulation_steps,
            p.num_train_epochs,
            p.max_steps,
        );
        let upe = updates_per_epoch(
            n,
            p.per_device_train_batch_size,
            p.gradient_accumulation_steps,
        );
        Ok(Trainer {
            loaded,
            p,
            model,
            data,
            base_name,
            out,
            opt,
            schedule: Schedule::from_preset(p, total),
            total_steps: total,
            updates_per_epoch: upe,
            step: 0,
            tokens_seen: 0,
            elapsed_before: Duration::ZERO,
            history: Vec::new(),
            pending_losses: Vec::new(),
            last_eval: None,
            last_accuracy: None,
            best: None,
            patience: 0,
            folder_files,
            pref,
        })
    }

    fn restore(&mut self, dir: &Path, state: &TrainerState) -> Result<(), TrainError> {
        self.opt.load(&dir.join("optimizer.safetensors"))?;
        self.step = state.global_step;
        self.tokens_seen = state.num_input_tokens_seen;
        self.elapsed_before = Duration::from_secs_f64(state.termtune.elapsed_secs.max(0.0));
        self.history.clone_from(&state.log_history);
        self.last_eval = state.log_history.iter().rev().find_map(|h| h.eval_loss);
        self.last_accuracy = state.log_history.iter().rev().find_map(|h| h.eval_accuracy);
        self.best = state.best_metric.zip(
            state
                .best_model_checkpoint
                .as_deref()
                .and_then(|c| c.rsplit("checkpoint-").next())
                .and_then(|n| n.parse().ok()),
        );
        self.patience = state.termtune.early_stopping_patience_counter;
        Ok(())
    }

    /// The micro-batches of optimizer step `step` (0-based): the data order is a pure function of
    /// the seed and the epoch, so a resumed run sees exactly the batches it would have seen.
    fn step_batches(&self, step: u64) -> Vec<Batch> {
        let epoch = step / self.updates_per_epoch;
        let within = step % self.updates_per_epoch;
        let batches = self.data.epoch_batches(
            self.p.per_device_train_batch_size,
            Sampler::of(self.p.group_by_length, self.p.disable_shuffling),
            self.p.data_seed_resolved(),
            epoch,
        );
        let ga = self.p.gradient_accumulation_steps as u64;
        #[allow(clippy::cast_possible_truncation)]
        let start = (within * ga) as usize;
        #[allow(clippy::cast_possible_truncation)]
        let end = ((within + 1) * ga) as usize;
        batches.into_iter().skip(start).take(end - start).collect()
    }

    fn run(
        mut self,
        commands: &Receiver<TrainCommand>,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Result<Outcome, TrainError> {
        let (trainable, total) = self.model.param_counts();
        emit(TrainEvent::Started {
            total_steps: self.total_steps,
            examples: self.data.train_examples(),
            eval_examples: self.data.eval_examples(),
            trainable_params: trainable,
            total_params: total,
            start_step: self.step,
            device: crate::engine::device::describe(&self.model.device),
        });
        config::save(
            self.loaded,
            &self.out.join("training_args.yaml"),
            Some("the resolved preset of this run: `termtune train training_args.yaml` runs it again"),
        )
        .map_err(io_err("writing training_args.yaml"))?;

        let started = Instant::now();
        let start_step = self.step;
        let mut paused = false;
        let mut stop: Option<bool> = None;
        let mut save_now = false;
        while self.step < self.total_steps {
            // Commands between optimizer steps; block while paused.
            loop {
                let cmd = if paused {
                    match commands.recv() {
                        Ok(c) => Some(c),
                        Err(_) => Some(TrainCommand::Stop { save: true }),
                    }
                } else {
                    match commands.try_recv() {
                        Ok(c) => Some(c),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Disconnected) => None,
                    }
                };
                match cmd {
                    Some(TrainCommand::Pause) if !paused => {
                        paused = true;
                        emit(TrainEvent::Paused);
                    }
                    Some(TrainCommand::Resume) if paused => {
                        paused = false;
                        emit(TrainEvent::Resumed);
                    }
                    Some(TrainCommand::SaveCheckpoint) => save_now = true,
                    Some(TrainCommand::Stop { save }) => {
                        stop = Some(save);
                        paused = false;
                    }
                    Some(TrainCommand::Pause | TrainCommand::Resume) | None => {}
                }
                if !paused {
                    break;
                }
            }
            if save_now {
                save_now = false;
                let dir = self.save_checkpoint_waiting(commands, emit)?;
                emit(TrainEvent::CheckpointSaved {
                    step: self.step,
                    dir,
                });
            }
            if let Some(save) = stop {
                if save && self.step > start_step {
                    let dir = self.save_checkpoint_waiting(commands, emit)?;
                    emit(TrainEvent::CheckpointSaved {
                        step: self.step,
                        dir,
                    });
                }
                let summary = self.summary(started, true);
                return Ok(Outcome::Stopped(summary));
            }

            let metrics = self.train_step(started)?;
            let step = metrics.step;
            emit(TrainEvent::StepFinished(metrics.clone()));
            self.pending_losses.push(metrics.loss);

            let mut eval_loss = None;
            let mut early_stop = false;
            let eval_due = match self.p.eval_strategy {
                IntervalStrategy::Steps => step % self.p.eval_steps_resolved() == 0,
                IntervalStrategy::Epoch => step % self.updates_per_epoch == 0,
                _ => false,
            } || (step == self.total_steps && !self.data.eval.is_empty());
            if eval_due && !self.data.eval.is_empty() {
                let (l, accuracy) = if self.pref.is_some() {
                    let (l, m) = self.evaluate_preference()?;
                    let rm = self
                        .pref
                        .as_ref()
                        .is_some_and(|p| matches!(p.objective, Objective::Rm(_)));
                    // LLaMA-Factory's rm evaluation logs `eval_accuracy` (`ComputeAccuracy` on the scores).
                    let accuracy = if rm {
                        m.get("rewards/accuracies")
                    } else {
                        None
                    };
                    if let Some(pref) = self.pref.as_mut() {
                        pref.last_eval = Some(m);
                    }
                    (l, accuracy)
                } else {
                    self.evaluate()?
                };
                self.last_eval = Some(l);
                self.last_accuracy = accuracy;
                eval_loss = Some(l);
                emit(TrainEvent::EvalFinished { step, eval_loss: l });
                if self.p.load_best_model_at_end && self.track_best(step)? {
                    early_stop = true;
                }
            }
            let log_due = step % self.p.logging_steps == 0 || step == self.total_steps;
            if log_due || eval_loss.is_some() {
                self.log(&metrics, eval_loss, log_due)?;
                if eval_loss.is_some()
                    && let Some(h) = self.history.last_mut()
                {
                    h.eval_accuracy = self.last_accuracy.map(|a| round_to(a, 4));
                }
            }
            if save_due(
                self.p.save_strategy,
                step,
                self.p.save_steps,
                self.updates_per_epoch,
                self.total_steps,
            ) {
                let dir = self.save_checkpoint_waiting(commands, emit)?;
                emit(TrainEvent::CheckpointSaved { step, dir });
            }
            if early_stop {
                let (name, _) = self.p.best_metric();
                emit(TrainEvent::Note(format!(
                    "early stopping at step {step}: {name} has not improved for {} evaluations (early_stopping_steps)",
                    self.patience
                )));
                break;
            }
        }
        if self.p.load_best_model_at_end {
            self.load_best(emit)?;
        }
        self.save_final()?;
        if self.p.pissa_convert {
            let converted = self.out.join(PISSA_CONVERTED_DIR);
            convert_pissa(&self.out, &self.out.join(PISSA_INIT_DIR), &converted)?;
            emit(TrainEvent::Note(format!(
                "PiSSA converted to a plain LoRA for the original base: {}",
                converted.display()
            )));
        }
        if let Ok(log) = super::runlog::read_log(&self.out) {
            if let Err(e) = super::plot::plot_loss(&log, &self.out.join("training_loss.png")) {
                emit(TrainEvent::Warning(format!(
                    "training_loss.png was not drawn: {e}"
                )));
            }
            // The stage's own curve, as LLaMA-Factory's workflows add it to `plot_loss`'s keys.
            let metric = self.pref.as_ref().map(|p| match p.objective {
                Objective::Dpo(_) => ("rewards/accuracies", "training_rewards_accuracies.png"),
                Objective::Kto(_) => ("rewards/chosen", "training_rewards_chosen.png"),
                Objective::Rm(_) => ("eval_rewards/accuracies", "training_eval_accuracy.png"),
            });
            if let Some((key, file)) = metric
                && let Err(e) = super::plot::plot_metric(&log, key, &self.out.join(file))
            {
                emit(TrainEvent::Warning(format!("{file} was not drawn: {e}")));
            }
        }
        let summary = self.summary(started, false);
        self.write_results(&summary)?;
        emit(TrainEvent::Finished(summary.clone()));
        Ok(Outcome::Finished(summary))
    }

    /// `load_best_model_at_end`, after an evaluation at `step`: whether `metric_for_best_model` improved on the best
    /// so far (strictly, as the Hugging Face Trainer), which then becomes the best; true when
    /// `early_stopping_steps` evaluations in a row brought no improvement.
    fn track_best(&mut self, step: u64) -> Result<bool, TrainError> {
        let (name, greater) = self.p.best_metric();
        // What this evaluation logged, under its logged names (a stage's as `values` writes them, KTO's derived
        // `rewards/margins` included).
        let mut logged: BTreeMap<String, f64> = self
            .pref
            .as_ref()
            .and_then(|p| p.last_eval.as_ref())
            .map(|m| m.values("eval_"))
            .unwrap_or_default();
        logged.extend(self.last_eval.map(|v| ("eval_loss".to_string(), v)));
        logged.extend(self.last_accuracy.map(|v| ("eval_accuracy".to_string(), v)));
        let value = logged.get(&name).copied().ok_or_else(|| {
            TrainError::Invalid(format!(
                "`metric_for_best_model`: the evaluation at step {step} logged no `{name}`; it logged {}",
                logged.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let improved = match self.best {
            None => true,
            Some((best, _)) if greater => value > best,
            Some((best, _)) => value < best,
        };
        if improved {
            self.best = Some((value, step));
            self.patience = 0;
        } else {
            self.patience += 1;
        }
        Ok(self
            .p
            .early_stopping_steps
            .is_some_and(|n| self.patience >= n))
    }

    /// `load_best_model_at_end`: the trainable weights of the best evaluation's checkpoint, and its evaluation as
    /// the run's (`eval_results.json`); a warning and the last weights when that step has no checkpoint.
    fn load_best(&mut self, emit: &mut dyn FnMut(TrainEvent)) -> Result<(), TrainError> {
        let Some((value, step)) = self.best else {
            return Ok(());
        };
        let (name, _) = self.p.best_metric();
        if step != self.step {
            let dir = self.out.join(super::checkpoint::checkpoint_name(step));
            let file = dir.join(if self.p.finetuning_type == FinetuningType::Lora {
                "adapter_model.safetensors"
            } else {
                "model.safetensors"
            });
            if !file.is_file() {
                emit(TrainEvent::Warning(format!(
                    "the best evaluation ({name} {value:.4} at step {step}) has no checkpoint ({} is missing): keeping the last weights",
                    file.display()
                )));
                return Ok(());
            }
            set_trainable_from(&self.model, &file)?;
            if let Some(h) = self
                .history
                .iter()
                .rev()
                .find(|h| h.step == step && h.eval_loss.is_some())
            {
                self.last_eval = h.eval_loss;
                self.last_accuracy = h.eval_accuracy;
            }
        }
        emit(TrainEvent::Note(format!(
            "the final weights are the best evaluation's: step {step}, {name} {value:.4} (load_best_model_at_end)"
        )));
        Ok(())
    }

    /// One optimizer update: forward + backward over the accumulated micro-batches with the loss
    /// normalised by the label tokens of the whole accumulated batch, clip, AdamW, schedule.
    fn train_step(&mut self, started: Instant) -> Result<StepMetrics, TrainError> {
        let t0 = Instant::now();
        let batches = self.step_batches(self.step);
        let mut grads: Option<GradStore> = None;
        // Summed on the device; read back once per step (a GPU stays busy across the micro-batches).
        let mut loss_sum_t: Option<Tensor> = None;
        let mut label_tokens = 0usize;
        let mut real_tokens = 0u64;
        let mut examples = 0usize;
        // `stage: dpo`: the step's loss (each micro-batch's mean over its pairs / gradient_accumulation_steps).
        let mut pref_loss = 0.0;
        let mut step_metrics = StageMetrics::default();
        for (micro, batch) in batches.iter().enumerate() {
            // LoRA dropout masks: fresh per micro-batch, the same after a resume (seed, step, micro-batch).
            self.model.dropout_seed = self
                .p
                .seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(self.step << 8)
                .wrapping_add(micro as u64);
            real_tokens += batch
                .attention_mask
                .iter()
                .map(|&m| u64::from(m))
                .sum::<u64>();
            if self.pref.is_some() {
                examples += batch.batch_size / 2;
                let (l, n, g, m) = self.preference_micro_batch(batch, batches.len())?;
                step_metrics.merge(&m);
                if let Some(pref) = self.pref.as_mut() {
                    pref.pending.merge(&m);
                }
                pref_loss += l;
                label_tokens += n;
                accumulate(&mut grads, g, self.opt.params())?;
                continue;
            }
            examples += batch.batch_size;
            let x = ModelInputs::new(batch, &self.model.device)?;
            let (loss, n) = x.forward_loss(&self.model, batch, true)?;
            if n == 0 {
                continue;
            }
            let l64 = loss.detach().to_dtype(DType::F64)?;
            loss_sum_t = Some(match loss_sum_t {
                None => l64,
                Some(acc) => (acc + l64)?,
            });
            label_tokens += n;
            let g = loss.to_dtype(DType::F32)?.backward()?;
            accumulate(&mut grads, g, self.opt.params())?;
        }
        let step_no = self.step + 1;
        let loss_sum = match &loss_sum_t {
            Some(t) => t.to_scalar::<f64>()?,
            None => 0.0,
        };
        #[allow(clippy::cast_precision_loss)]
        let loss = if self.pref.is_some() {
            pref_loss
        } else if label_tokens > 0 {
            loss_sum / label_tokens as f64
        } else {
            0.0
        };
        if !loss.is_finite() {
            let kept = latest_checkpoint(&self.out).map_or_else(
                || "; no checkpoint had been written yet".to_string(),
                |(s, d)| format!("; the last good checkpoint is {} (step {s})", d.display()),
            );
            return Err(TrainError::NonFinite {
                step: step_no,
                value: loss,
                kept,
            });
        }
        let mut grad_norm = 0.0;
        if let Some(mut g) = grads {
            // A preference loss's gradients come scaled already.
            if self.pref.is_none() {
                #[allow(clippy::cast_precision_loss)]
                let inv = 1.0 / label_tokens as f64;
                for p in self.opt.params() {
                    if let Some(gi) = g.remove(p.var.as_tensor()) {
                        g.insert(p.var.as_tensor(), (gi * inv)?);
                    }
                }
            }
            grad_norm = clip_grad_norm(&mut g, self.opt.params(), self.p.max_grad_norm)?;
            if !grad_norm.is_finite() {
                return Err(TrainError::NonFinite {
                    step: step_no,
                    value: grad_norm,
                    kept: " (the gradient norm overflowed)".into(),
                });
            }
            let lr = self.schedule.lr_at(self.step);
            self.opt.step(&g, lr)?;
        }
        self.step = step_no;
        self.tokens_seen += real_tokens;
        let step_time = t0.elapsed();
        let elapsed = self.elapsed_before + started.elapsed();
        let done_here = self.step.max(1);
        #[allow(clippy::cast_precision_loss)]
        let per_step = elapsed.as_secs_f64() / done_here as f64;
        #[allow(clippy::cast_precision_loss)]
        let eta = Duration::from_secs_f64(per_step * (self.total_steps - self.step) as f64);
        let secs = step_time.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        Ok(StepMetrics {
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.step as f64 / self.updates_per_epoch as f64,
            loss,
            lr: self.schedule.lr_at(self.step),
            grad_norm,
            tokens: real_tokens,
            label_tokens: label_tokens as u64,
            tokens_seen: self.tokens_seen,
            step_time,
            elapsed,
            eta,
            tokens_per_sec: real_tokens as f64 / secs,
            samples_per_sec: examples as f64 / secs,
            metrics: step_metrics.values(""),
        })
    }

    /// One micro-batch of a preference or reward stage: (its mean loss / the step's micro-batches, label tokens,
    /// the gradients of that loss, its metrics). The step's micro-batches are `gradient_accumulation_steps`, fewer in
    /// an epoch's last, partial step (the Hugging Face trainer divides by the micro-batches it actually has).
    fn preference_micro_batch(
        &mut self,
        batch: &Batch,
        micro_batches: usize,
    ) -> Result<(f64, usize, GradStore, StageMetrics), TrainError> {
        let (out, back, n) = self.stage_forward(batch, true)?;
        let ga = micro_batches.max(1);
        #[allow(clippy::cast_precision_loss)]
        let inv = 1.0 / ga as f64;
        let dl: Vec<f64> = out.d_rows.iter().map(|d| d * inv).collect();
        let g = back.backward(&dl)?;
        Ok((out.mean_loss() * inv, n, g, out.metrics))
    }

    /// A micro-batch's loss for the run's stage, the way back to the parameters and the label tokens. dpo and rm
    /// batches hold k chosen rows, then k rejected; kto batches k examples, then their k KL sequences.
    fn stage_forward(
        &mut self,
        batch: &Batch,
        train: bool,
    ) -> Result<(BatchLoss, Backprop, usize), TrainError> {
        let Some(pref) = self.pref.as_ref() else {
            return Err(TrainError::Invalid(
                "a preference batch outside the preference stages".into(),
            ));
        };
        let device = self.model.device.clone();
        let k = batch.batch_size / 2;
        match &pref.objective {
            Objective::Dpo(cfg) => {
                let cfg = *cfg;
                // Each pair in one row with its prompt once (the answers' log-probabilities are those of their own
                // rows; sequence order as unshared).
                let shared = batch.share_prompts(self.p.cutoff_len);
                let batch = shared.as_ref().unwrap_or(batch);
                let x = ModelInputs::new(batch, &device)?;
                let mut policy = x.sequence_logps(&self.model, batch, train)?;
                if let Some(alpha) = pref.ld_alpha {
                    super::pref::apply_ld_alpha(&mut policy, alpha);
                }
                let reference = cached_reference_logps(pref, &mut self.model, batch, &x, !train)?;
                let pairs: Vec<PairLogps> = (0..k)
                    .map(|i| PairLogps {
                        chosen: policy.logps[i],
                        rejected: policy.logps[k + i],
                        ref_chosen: reference.as_ref().map(|r| r[i]),
                        ref_rejected: reference.as_ref().map(|r| r[k + i]),
                        chosen_tokens: policy.tokens[i],
                        rejected_tokens: policy.tokens[k + i],
                    })
                    .collect();
                let mut cfg = cfg;
                if cfg.uses_bco()
                    && let Some(reward) = super::pref::bco_batch_reward(&cfg, &pairs)
                {
                    let mut running = pref.bco_running.get();
                    running.update(reward);
                    pref.bco_running.set(running);
                    cfg.bco_delta = running.mean;
                }
                let out = preference_loss(&cfg, &pairs)
                    .map_err(|e| TrainError::Invalid(e.to_string()))?;
                let n = policy.tokens.iter().sum();
                Ok((out.into(), Backprop::Logps(policy), n))
            }
            Objective::Kto(cfg) => {
                let cfg = *cfg;
                if batch.kto_tags.len() != k {
                    return Err(TrainError::Invalid(format!(
                        "a kto batch of {k} examples has {} tags",
                        batch.kto_tags.len()
                    )));
                }
                // The examples and their KL sequences run apart: the policy keeps the examples' way back and scores
                // the KL sequences without one (LLaMA-Factory's `torch.no_grad()`); the reference scores both.
                let mut logps = |rows: std::ops::Range<usize>,
                                 grad: bool|
                 -> Result<(SequenceLogps, Vec<f64>), TrainError> {
                    let b = batch.rows(rows);
                    let x = ModelInputs::new(&b, &device)?;
                    let policy = x.sequence_logps(&self.model, &b, grad)?;
                    let reference = cached_reference_logps(pref, &mut self.model, &b, &x, !train)?
                        .ok_or_else(|| {
                            TrainError::Invalid("stage kto needs a reference model".into())
                        })?;
                    Ok((policy, reference))
                };
                let (policy, reference) = logps(0..k, train)?;
                let (kl_policy, kl_reference) = logps(k..2 * k, false)?;
                let examples: Vec<KtoExample> = (0..k)
                    .map(|i| KtoExample {
                        logps: policy.logps[i],
                        ref_logps: reference[i],
                        tokens: policy.tokens[i],
                        desirable: batch.kto_tags[i],
                    })
                    .collect();
                let out = kto_loss(&cfg, &examples, &kl_policy.logps, &kl_reference)
                    .map_err(|e| TrainError::Invalid(e.to_string()))?;
                let n = policy.tokens.iter().sum();
                Ok((out.into(), Backprop::Logps(policy), n))
            }
            Objective::Rm(head) => {
                // Each pair in one row with its prompt once (as dpo); the scores are read at each answer's last
                // token, in the unshared order (chosen, then rejected).
                let shared = batch.share_prompts(self.p.cutoff_len);
                let b = shared.as_ref().unwrap_or(batch);
                let x = ModelInputs::new(b, &device)?;
                let host = x.host(b);
                let h = match &shared {
                    Some(s) => self.model.hidden_at(
                        &x.ids,
                        &x.mask,
                        Some(&host),
                        train,
                        s.answer_ends(),
                    )?,
                    None => self
                        .model
                        .last_hidden(&x.ids, &x.mask, Some(&host), train)?,
                };
                let scores = head.forward(&h, train.then_some(self.model.dropout_seed))?;
                let values: Vec<f64> = scores.to_dtype(DType::F64)?.to_vec1()?;
                let out = reward_pair_loss(&values[..k], &values[k..]);
                let n = batch
                    .labels
                    .iter()
                    .filter(|&&l| l != data::IGNORE_INDEX)
                    .count();
                Ok((out, Backprop::Scores(scores), n))
            }
        }
    }

    /// A preference or reward stage's evaluation: the mean loss over the validation examples and the metrics (each
    /// batch's, combined as the trainers combine them).
    fn evaluate_preference(&mut self) -> Result<(f64, StageMetrics), TrainError> {
        let mut losses = Vec::new();
        let mut metrics = StageMetrics::default();
        for batch in self.data.eval_batches(self.p.per_device_eval_batch_size) {
            let (out, _, _) = self.stage_forward(&batch, false)?;
            losses.extend(out.losses.iter().copied());
            metrics.merge(&out.metrics);
        }
        #[allow(clippy::cast_precision_loss)]
        let loss = if losses.is_empty() {
            0.0
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        };
        Ok((loss, metrics))
    }

    /// Mean loss per label token over the validation split and, with `compute_accuracy`, the token accuracy
    /// as LLaMA-Factory's `ComputeAccuracy` computes it (per example, then the mean).
    fn evaluate(&self) -> Result<(f64, Option<f64>), TrainError> {
        let mut sum = 0.0;
        let mut n = 0usize;
        let mut accuracies = Vec::new();
        for batch in self.data.eval_batches(self.p.per_device_eval_batch_size) {
            let x = ModelInputs::new(&batch, &self.model.device)?;
            let (loss, count) = x.forward_loss(&self.model, &batch, false)?;
            sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += count;
            if self.p.compute_accuracy {
                let logits = self.model.forward(&x.ids, &x.mask, false)?;
                let preds: Vec<u32> = logits
                    .argmax(candle_core::D::Minus1)?
                    .flatten_all()?
                    .to_vec1()?;
                accuracies.extend(token_accuracy(&preds, &batch));
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let loss = if n == 0 { 0.0 } else { sum / n as f64 };
        #[allow(clippy::cast_precision_loss)]
        let accuracy = (!accuracies.is_empty())
            .then(|| accuracies.iter().sum::<f64>() / accuracies.len() as f64);
        Ok((loss, accuracy))
    }

    fn log(
        &mut self,
        m: &StepMetrics,
        eval_loss: Option<f64>,
        with_loss: bool,
    ) -> Result<(), TrainError> {
        #[allow(clippy::cast_precision_loss)]
        let mean_loss = (!self.pending_losses.is_empty() && with_loss)
            .then(|| self.pending_losses.iter().sum::<f64>() / self.pending_losses.len() as f64);
        if with_loss {
            self.pending_losses.clear();
        }
        let elapsed = m.elapsed.as_secs_f64();
        // A preference stage's metrics: the mean over the micro-batches since the last line, and the evaluation's.
        let (train_pref, eval_pref) = match self.pref.as_mut() {
            Some(pref) => {
                let t = if with_loss && !pref.pending.is_empty() {
                    Some(std::mem::take(&mut pref.pending))
                } else {
                    None
                };
                (t, eval_loss.and(pref.last_eval.clone()))
            }
            None => (None, None),
        };
        let mut entries: Vec<(String, f64)> = Vec::new();
        if let Some(t) = &train_pref {
            entries.extend(t.values(""));
        }
        if let Some(e) = &eval_pref {
            entries.extend(e.values("eval_"));
        }
        let metrics =
            |digits: Option<i32>| -> std::collections::BTreeMap<String, serde_json::Value> {
                entries
                    .iter()
                    .map(|(k, v)| {
                        let v = digits.map_or(*v, |d| round_to(*v, d));
                        (k.clone(), serde_json::json!(v))
                    })
                    .collect()
            };
        #[allow(clippy::cast_precision_loss)]
        let line = LogLine {
            current_steps: m.step,
            total_steps: m.total_steps,
            loss: mean_loss.map(|l| round_to(l, 4)),
            eval_loss: eval_loss.map(|l| round_to(l, 4)),
            lr: Some(m.lr),
            epoch: round_to(m.epoch, 2),
            percentage: round_to(m.step as f64 / m.total_steps as f64 * 100.0, 2),
            elapsed_time: format_duration(elapsed),
            remaining_time: format_duration(m.eta.as_secs_f64()),
            throughput: Some(round_to(m.tokens_seen as f64 / elapsed.max(1e-9), 2)),
            total_tokens: Some(m.tokens_seen),
            grad_norm: Some(round_to(m.grad_norm, 4)),
            rss_gib: peak_rss_gib(),
            vram_allocated: crate::engine::device::peak_memory(&self.model.device)
                .map(|(used, _)| round_to(used as f64 / f64::from(1u32 << 30), 2)),
            device: Some(crate::engine::device::short_name(&self.model.device)),
            accuracy: train_pref
                .and_then(|t| t.get("rewards/accuracies"))
                .map(|a| round_to(a, 4)),
            metrics: metrics(Some(4)),
        };
        append_log_line(&self.out, &line).map_err(io_err("writing trainer_log.jsonl"))?;
        self.history.push(HistoryEntry {
            step: m.step,
            epoch: round_to(m.epoch, 4),
            loss: line.loss,
            eval_loss: line.eval_loss,
            eval_accuracy: None,
            learning_rate: Some(m.lr),
            grad_norm: Some(m.grad_norm),
            num_input_tokens_seen: Some(m.tokens_seen),
            metrics: metrics(None),
        });
        Ok(())
    }

    fn trainer_state(&self) -> TrainerState {
        #[allow(clippy::cast_precision_loss)]
        TrainerState {
            best_metric: self.best.map(|(v, _)| v),
            best_model_checkpoint: self.best.map(|(_, s)| {
                self.out
                    .join(super::checkpoint::checkpoint_name(s))
                    .display()
                    .to_string()
            }),
            epoch: self.step as f64 / self.updates_per_epoch as f64,
            eval_steps: self.p.eval_steps_resolved(),
            global_step: self.step,
            is_hyper_param_search: false,
            is_local_process_zero: true,
            is_world_process_zero: true,
            log_history: self.history.clone(),
            logging_steps: self.p.logging_steps,
            max_steps: self.total_steps,
            num_input_tokens_seen: self.tokens_seen,
            num_train_epochs: self.p.num_train_epochs,
            save_steps: self.p.save_steps,
            total_flos: 0.0,
            train_batch_size: self.p.per_device_train_batch_size,
            trial_name: None,
            trial_params: None,
            termtune: ResumeState {
                micro_batches_done: self.step * self.p.gradient_accumulation_steps as u64,
                elapsed_secs: self.elapsed_before.as_secs_f64(),
                dropout_seed: self.p.seed,
                early_stopping_patience_counter: self.patience,
            },
        }
    }

    /// Writes the trained weights (PEFT adapter, or the full model for freeze/full) into `dir`.
    fn write_weights(&self, dir: &Path) -> Result<(), TrainError> {
        if self.model.lora.is_some() {
            save_adapter(&self.model, dir, &self.base_name)?;
        } else {
            let tensors: HashMap<String, Tensor> = self.model.merged_tensors()?;
            save_safetensors(&tensors, &dir.join("model.safetensors"))?;
            // A model folder, as save_pretrained writes it: config.json in the weights' dtype, generation_config.json.
            let dt = tensors
                .get("model.embed_tokens.weight")
                .map_or(DType::F32, Tensor::dtype);
            let json = |v: &serde_json::Value| {
                serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into())
            };
            write_file(
                &dir.join("config.json"),
                json(&crate::engine::weights::saved_config(
                    &self.folder_files.config,
                    dt,
                )),
            )
            .map_err(io_err("writing config.json"))?;
            write_file(
                &dir.join("generation_config.json"),
                json(&self.folder_files.generation_config),
            )
            .map_err(io_err("writing generation_config.json"))?;
        }
        if let Some(Preference {
            objective: Objective::Rm(head),
            ..
        }) = &self.pref
        {
            head.save(dir)?;
        }
        if let Some(tok) = &self.folder_files.tokenizer_json {
            write_file(&dir.join("tokenizer.json"), tok)
                .map_err(io_err("writing tokenizer.json"))?;
        }
        let cfg = serde_json::to_string_pretty(&self.folder_files.tokenizer_config)
            .unwrap_or_else(|_| "{}".into());
        write_file(&dir.join("tokenizer_config.json"), cfg)
            .map_err(io_err("writing tokenizer_config.json"))?;
        Ok(())
    }

    /// The size of the trained weights as saved: the LoRA adapter in f32, or the whole model in its dtype.
    fn weights_bytes(&self) -> u64 {
        let (trainable, total) = self.model.param_counts();
        if self.model.lora.is_some() {
            trainable as u64 * 4
        } else {
            let dtype_bytes = self
                .model
                .trainable_vars()
                .first()
                .map_or(4, |(_, v)| v.dtype().size_in_bytes());
            (total * dtype_bytes) as u64
        }
    }

    /// The estimated size of one checkpoint of this run.
    fn checkpoint_bytes(&self) -> u64 {
        let (trainable, _) = self.model.param_counts();
        let tokenizer = self
            .folder_files
            .tokenizer_json
            .as_ref()
            .map_or(0, |t| t.len() as u64);
        estimate_checkpoint_bytes(self.weights_bytes(), trainable as u64, tokenizer)
    }

    /// A full disk met while saving `what` (of about `needed_bytes`), told with the file, the sizes and
    /// what to do; other errors unchanged.
    fn explain_full_disk(&self, e: TrainError, what: String, needed_bytes: u64) -> TrainError {
        let Some((file, file_bytes)) = disk_full_cause(&e) else {
            return e;
        };
        let kept = latest_checkpoint(&self.out).map_or_else(
            || "no checkpoint had been written yet".to_string(),
            |(s, d)| {
                format!(
                    "the last good checkpoint {} (step {s}) is intact",
                    d.display()
                )
            },
        );
        let limit = match self.p.save_total_limit {
            Some(n) if n > 1 => format!(
                ", or lower `save_total_limit` (now {n}) so that fewer checkpoints are kept"
            ),
            Some(_) => String::new(),
            None => ", or set `save_total_limit` (e.g. 2) so that older checkpoints are removed"
                .to_string(),
        };
        TrainError::DiskFull(Box::new(DiskFullError {
            file: file.unwrap_or_else(|| self.out.join(&what)),
            file_bytes: file_bytes.unwrap_or(needed_bytes),
            what,
            needed_bytes,
            out: self.out.clone(),
            free_bytes: crate::fsutil::free_bytes(&self.out),
            kept,
            limit,
        }))
    }

    /// Saves a checkpoint; on a full disk the run pauses with its state in memory and tries
    /// again when told to resume (or save), and by itself every [`DISK_FULL_RETRY`], for at most
    /// [`DISK_FULL_WAIT`]. A stop, or the end of the wait, ends the run with the full-disk error
    /// (the last good checkpoint is intact).
    fn save_checkpoint_waiting(
        &mut self,
        commands: &Receiver<TrainCommand>,
        emit: &mut dyn FnMut(TrainEvent),
    ) -> Result<PathBuf, TrainError> {
        let mut waiting: Option<Instant> = None;
        loop {
            let e = match self.save_checkpoint() {
                Ok(dir) => {
                    if waiting.is_some() {
                        emit(TrainEvent::Resumed);
                    }
                    return Ok(dir);
                }
                Err(TrainError::DiskFull(e)) => e,
                Err(other) => return Err(other),
            };
            let since = match waiting {
                Some(t) => t,
                None => {
                    emit(TrainEvent::Warning(format!(
                        "{e}. The run is paused with its state in memory: make room, then resume (p in the TUI, `termtune attach --resume`) to save again; it also tries by itself every {} s for {}. Stopping ends it with the last good checkpoint.",
                        DISK_FULL_RETRY.as_secs(),
                        super::runlog::format_duration(DISK_FULL_WAIT.as_secs_f64())
                    )));
                    emit(TrainEvent::Paused);
                    *waiting.insert(Instant::now())
                }
            };
            if since.elapsed() >= DISK_FULL_WAIT {
                return Err(TrainError::DiskFull(e));
            }
            match commands.recv_timeout(DISK_FULL_RETRY) {
                Ok(TrainCommand::Stop { .. }) => return Err(TrainError::DiskFull(e)),
                // Resume, save, pause, or the retry interval: try again.
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(DISK_FULL_RETRY),
            }
        }
    }

    fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        // The partial folder is gone (dropped uncommitted) before the free space is measured.
        self.write_checkpoint().map_err(|e| {
            self.explain_full_disk(
                e,
                super::checkpoint::checkpoint_name(self.step),
                self.checkpoint_bytes(),
            )
        })
    }

    fn write_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let pending = PendingCheckpoint::begin(&self.out, self.step)
            .map_err(io_err(format!("starting checkpoint-{}", self.step)))?;
        self.write_weights(pending.dir())?;
        self.opt
            .save(&pending.dir().join("optimizer.safetensors"))?;
        let sched = serde_json::json!({
            "lr_scheduler_type": format!("{:?}", self.schedule.kind),
            "learning_rate": self.schedule.peak_lr,
            "total_steps": self.schedule.total_steps,
            "warmup_steps": self.schedule.warmup_steps,
            "last_step": self.step,
        });
        write_file(
            &pending.dir().join("scheduler.json"),
            serde_json::to_string_pretty(&sched).unwrap_or_default(),
        )
        .map_err(io_err("writing scheduler.json"))?;
        let mut state = self.trainer_state();
        state.termtune.elapsed_secs = state.termtune.elapsed_secs.max(0.0);
        state
            .save(&pending.dir().join("trainer_state.json"))
            .map_err(io_err("writing trainer_state.json"))?;
        let dir = pending
            .commit()
            .map_err(io_err(format!("finishing checkpoint-{}", self.step)))?;
        if let Some(limit) = self.p.save_total_limit {
            let best = self
                .best
                .map(|(_, s)| self.out.join(super::checkpoint::checkpoint_name(s)));
            rotate(&self.out, limit, best.as_deref())
                .map_err(io_err("removing old checkpoints"))?;
        }
        Ok(dir)
    }

    fn save_final(&self) -> Result<(), TrainError> {
        self.write_weights(&self.out)
            .and_then(|()| {
                self.trainer_state()
                    .save(&self.out.join("trainer_state.json"))
                    .map_err(io_err("writing trainer_state.json"))
            })
            .map_err(|e| {
                self.explain_full_disk(e, "the final weights".into(), self.weights_bytes())
            })
    }

    fn summary(&self, started: Instant, stopped_early: bool) -> RunSummary {
        let elapsed = self.elapsed_before + started.elapsed();
        #[allow(clippy::cast_precision_loss)]
        RunSummary {
            steps: self.step,
            final_loss: self.history.iter().rev().find_map(|h| h.loss),
            eval_loss: self.last_eval,
            elapsed,
            tokens_seen: self.tokens_seen,
            tokens_per_sec: self.tokens_seen as f64 / elapsed.as_secs_f64().max(1e-9),
            output_dir: self.out.clone(),
            stopped_early,
        }
    }

    fn write_results(&self, s: &RunSummary) -> Result<(), TrainError> {
        let losses: Vec<f64> = self.history.iter().filter_map(|h| h.loss).collect();
        #[allow(clippy::cast_precision_loss)]
        let train_loss = if losses.is_empty() {
            0.0
        } else {
            losses.iter().sum::<f64>() / losses.len() as f64
        };
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let train = serde_json::json!({
            "epoch": round_to(self.step as f64 / self.updates_per_epoch as f64, 4),
            "num_input_tokens_seen": self.tokens_seen,
            "total_flos": 0.0,
            "train_loss": train_loss,
            "train_runtime": round_to(secs, 4),
            "train_samples_per_second": round_to(self.data.train_examples() as f64 * self.p.num_train_epochs / secs, 3),
            "train_steps_per_second": round_to(self.step as f64 / secs, 3),
            "train_tokens_per_second": round_to(s.tokens_per_sec, 3),
            "device": crate::engine::device::describe(&self.model.device),
        });
        let mut all = train.clone();
        if let (Some(e), Some(obj)) = (s.eval_loss, all.as_object_mut()) {
            obj.insert("eval_loss".into(), serde_json::json!(e));
            let mut eval = serde_json::json!({"epoch": train["epoch"], "eval_loss": e});
            if let Some(a) = self.last_accuracy {
                obj.insert("eval_accuracy".into(), serde_json::json!(a));
                eval["eval_accuracy"] = serde_json::json!(a);
            }
            write_file(
                &self.out.join("eval_results.json"),
                serde_json::to_string_pretty(&eval).unwrap_or_default(),
            )
            .map_err(io_err("writing eval_results.json"))?;
        }
        for (name, v) in [("train_results.json", &train), ("all_results.json", &all)] {
            write_file(
                &self.out.join(name),
                serde_json::to_string_pretty(v).unwrap_or_default(),
            )
            .map_err(io_err(format!("writing {name}")))?;
        }
        Ok(())
    }
}

/// Whether to save a checkpoint after optimizer step `step` of `total_steps`. As the Hugging Face Trainer
/// (`DefaultFlowCallback.on_step_end`): every `save_steps` steps (`steps`) or at each epoch's end (`epoch`), and
/// with either strategy also after the last step, so that `checkpoint-{max_steps}` exists. Once per step, even
/// when the last step is also a multiple of `save_steps`.
pub fn save_due(
    strategy: IntervalStrategy,
    step: u64,
    save_steps: u64,
    updates_per_epoch: u64,
    total_steps: u64,
) -> bool {
    match strategy {
        IntervalStrategy::Steps => step.is_multiple_of(save_steps) || step >= total_steps,
        IntervalStrategy::Epoch => step.is_multiple_of(updates_per_epoch) || step >= total_steps,
        IntervalStrategy::No | IntervalStrategy::Best => false,
    }
}

/// The file and size of a full disk behind `e`: `Some((Some(file), Some(size)))` when a writer of
/// [`crate::fsutil`] met it, `Some((None, None))` for another disk-full error (creating or renaming a
/// folder), `None` when the disk was not full.
fn disk_full_cause(e: &TrainError) -> Option<(Option<PathBuf>, Option<u64>)> {
    if let Some(full) = crate::fsutil::find_disk_full(e) {
        return Some((Some(full.path.clone()), Some(full.size_bytes)));
    }
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && crate::fsutil::is_disk_full(io)
        {
            return Some((None, None));
        }
        next = err.source();
    }
    None
}

/// The tokenizer_config.json a run folder and its checkpoints carry, as LLaMA-Factory saves its patched tokenizer:
/// the model's own (add_bos_token, model_max_length, … kept), with the preset's template written in as Jinja as an
/// export writes it (so PEFT, vLLM and transformers users chat with the template the weights were trained with),
/// the special tokens the template fixed, and training's right padding.
fn run_tokenizer_config(
    p: &config::Preset,
    encoder: &Encoder,
    files: &crate::engine::ModelFiles,
) -> serde_json::Value {
    let mut cfg = crate::export::hf::tokenizer_config_with_template(p, encoder, files);
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert("eos_token".into(), serde_json::json!(encoder.eos.0));
        if let Some((bos, _)) = &encoder.bos {
            obj.insert("bos_token".into(), serde_json::json!(bos));
        }
        obj.insert("padding_side".into(), serde_json::json!("right"));
    }
    cfg
}

/// A batch as the model takes it: its tensors and the host copy of its padding mask (with the batch, the host
/// inputs that spare the model reading the tensors back).
struct ModelInputs {
    ids: Tensor,
    labels: Tensor,
    mask: AttnMask,
    attention_mask: Vec<u32>,
}

impl ModelInputs {
    fn new(b: &Batch, device: &Device) -> Result<Self, TrainError> {
        let (ids, labels, mask) = batch_tensors(b, device)?;
        Ok(Self {
            ids,
            labels,
            mask,
            attention_mask: u32_mask(b),
        })
    }

    fn host<'a>(&'a self, b: &'a Batch) -> crate::engine::HostInputs<'a> {
        host_inputs(b, &self.attention_mask)
    }

    /// `model`'s summed token loss of batch `b` (these are its inputs) and the tokens counted.
    fn forward_loss(
        &self,
        model: &Model,
        b: &Batch,
        train: bool,
    ) -> Result<(Tensor, usize), TrainError> {
        Ok(model.forward_loss_with(
            &self.ids,
            &self.mask,
            &self.labels,
            Some(&self.host(b)),
            train,
        )?)
    }

    /// `model`'s per-sequence label log-probabilities of batch `b` (these are its inputs): one per row, or with
    /// shared prompts ([`Batch::share_prompts`]) the k chosen answers', then the k rejected ones'.
    fn sequence_logps(
        &self,
        model: &Model,
        b: &Batch,
        train: bool,
    ) -> Result<SequenceLogps, TrainError> {
        let mut out = model.sequence_logps(
            &self.ids,
            &self.mask,
            &self.labels,
            Some(&self.host(b)),
            train,
        )?;
        regroup_shared_prompts(&mut out, b)?;
        Ok(out)
    }
}

/// The reference's per-row log-probabilities of batch `b` (`None` without a reference): from the cache when every
/// row is there, else computed and remembered (the reference never changes during a run). `eval`: the batch is from
/// the evaluation split.
fn cached_reference_logps(
    pref: &Preference,
    model: &mut Model,
    b: &Batch,
    x: &ModelInputs,
    eval: bool,
) -> Result<Option<Vec<f64>>, TrainError> {
    let keys: Vec<(bool, usize)> = b.seq_index.iter().map(|&i| (eval, i)).collect();
    if keys.len() == b.sequences() {
        let cache = pref.ref_cache.borrow();
        if let Some(v) = keys
            .iter()
            .map(|k| cache.get(k).copied())
            .collect::<Option<Vec<f64>>>()
        {
            return Ok(Some(v));
        }
    }
    let v = match &pref.reference {
        Reference::None => return Ok(None),
        Reference::Frozen(m) => x.sequence_logps(m, b, false)?.logps,
        Reference::AdapterOff => {
            model
                .with_adapter_disabled(|m| x.sequence_logps(m, b, false))?
                .logps
        }
    };
    if keys.len() == v.len() {
        pref.ref_cache
            .borrow_mut()
            .extend(keys.into_iter().zip(v.iter().copied()));
    }
    Ok(Some(v))
}

/// For a batch of pairs sharing their prompts ([`Batch::share_prompts`]), gives row r's chosen answer tokens to
/// sequence r and its rejected answer tokens to sequence k + r (the layout of an unshared pairwise batch); nothing
/// for other batches.
pub fn regroup_shared_prompts(logps: &mut SequenceLogps, b: &Batch) -> Result<(), TrainError> {
    let chosen = b.chosen_label_counts();
    if chosen.is_empty() {
        return Ok(());
    }
    let k = b.batch_size;
    logps.regroup(2 * k, |r, i| if i < chosen[r] { r } else { k + r })?;
    Ok(())
}

/// Tensors for one batch: input ids (b, t) u32, labels (b, t) i64, and the attention layout.
pub fn batch_tensors(b: &Batch, device: &Device) -> Result<(Tensor, Tensor, AttnMask), TrainError> {
    let shape = (b.batch_size, b.seq_len);
    let ids = Tensor::from_vec(b.input_ids.clone(), shape, device)?;
    let labels = Tensor::from_vec(b.labels.clone(), shape, device)?;
    let mask = if b.block_diagonal {
        AttnMask::Packed {
            seq_ids: Tensor::from_vec(b.sequence_ids.clone(), shape, device)?,
            position_ids: Tensor::from_vec(b.position_ids.clone(), shape, device)?,
            branch_ids: if b.branch_ids.is_empty() {
                None
            } else {
                Some(Tensor::from_vec(b.branch_ids.clone(), shape, device)?)
            },
        }
    } else {
        AttnMask::Padding {
            attention_mask: Tensor::from_vec(u32_mask(b), shape, device)?,
        }
    };
    Ok((ids, labels, mask))
}

/// LLaMA-Factory's `ComputeAccuracy` for one batch: per row, the share of label tokens (labels shifted by
/// one, −100 ignored) whose prediction (argmax of the logits one position earlier) equals the label. `preds`
/// is the argmax of each position, row-major. Rows without a label token give nothing (numpy's mean of an
/// empty slice is NaN; LF's data never has such rows).
pub fn token_accuracy(preds: &[u32], b: &Batch) -> Vec<f64> {
    let t = b.seq_len;
    (0..b.batch_size)
        .filter_map(|r| {
            let row = r * t;
            let (mut hit, mut total) = (0usize, 0usize);
            for j in 1..t {
                let label = b.labels[row + j];
                if label == crate::data::process::IGNORE_INDEX {
                    continue;
                }
                total += 1;
                hit += usize::from(i64::from(preds[row + j - 1]) == label);
            }
            #[allow(clippy::cast_precision_loss)]
            (total > 0).then(|| hit as f64 / total as f64)
        })
        .collect()
}

/// The host copies of `b` for [`Model::forward_loss_with`] (`attention_mask` as u32, from [`u32_mask`]): the
/// model then reads nothing back from the device.
pub fn host_inputs<'a>(b: &'a Batch, attention_mask: &'a [u32]) -> crate::engine::HostInputs<'a> {
    crate::engine::HostInputs {
        input_ids: &b.input_ids,
        labels: &b.labels,
        attention_mask: (!b.block_diagonal).then_some(attention_mask),
        sequence_ids: b.block_diagonal.then_some(b.sequence_ids.as_slice()),
        branch_ids: (!b.branch_ids.is_empty()).then_some(b.branch_ids.as_slice()),
        position_ids: b.block_diagonal.then_some(b.position_ids.as_slice()),
    }
}

/// A batch's padding mask as u32 (the dtype of its tensor).
pub fn u32_mask(b: &Batch) -> Vec<u32> {
    b.attention_mask.iter().map(|&x| u32::from(x)).collect()
}

/// Peak resident memory of this process so far, in GiB (Linux `VmHWM`).
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round_to(kib / (1024.0 * 1024.0), 3))
}

/// Adds `g` into the accumulated gradients of `params`.
fn accumulate(
    acc: &mut Option<GradStore>,
    g: GradStore,
    params: &[Param],
) -> Result<(), TrainError> {
    match acc.as_mut() {
        None => *acc = Some(g),
        Some(acc) => {
            for p in params {
                if let Some(gi) = g.get(p.var.as_tensor()) {
                    let sum = match acc.get(p.var.as_tensor()) {
                        Some(prev) => (prev + gi)?,
                        None => gi.clone(),
                    };
                    acc.insert(p.var.as_tensor(), sum);
                }
            }
        }
    }
    Ok(())
}
