//! What each subcommand does. Output for people goes to stdout (results) and stderr (progress,
//! problems); the detailed log goes to the log file.

use std::fmt::Write as _;
use std::process::ExitCode;

use crate::cli::{
    ApiArgs, AttachArgs, ChatArgs, CheckArgs, Cli, Command, ExportArgs, PredictArgs, RunsArgs,
    TrainArgs,
};
use crate::config::{self, Group, Purpose};

/// Exit status for a preset or argument problem (clap uses 2 for usage errors too).
pub const EXIT_CONFIG: u8 = 2;

pub fn run(cli: Cli) -> ExitCode {
    crate::engine::device::set_preferred(cli.device);
    match cli.command {
        None => tui(cli.preset.clone(), cli.theme.clone()),
        Some(Command::Check(args)) => check(&args),
        Some(Command::Env) => {
            print!("{}", env_report());
            ExitCode::SUCCESS
        }
        Some(Command::Train(args)) => train(&args),
        Some(Command::Chat(args)) => chat(&args),
        Some(Command::Score(args)) => score(&args),
        Some(Command::Api(args)) => api(&args),
        Some(Command::Predict(args)) => predict(&args),
        Some(Command::Export(args)) => export(&args),
        Some(Command::Bench(args)) => bench(&args),
        Some(Command::Runs(args)) => runs(&args),
        Some(Command::Attach(args)) => attach(&args),
    }
}

/// The preset the TUI opens when none is named.
pub const DEFAULT_PRESET: &str = "presets/quickstart.yaml";

fn tui(preset: Option<std::path::PathBuf>, theme: Option<String>) -> ExitCode {
    let options = crate::tui::Options {
        preset: Some(preset.unwrap_or_else(|| DEFAULT_PRESET.into())),
        theme,
    };
    match crate::tui::run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("termtune: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    match config::load(&args.preset, &args.overrides, Purpose::Train) {
        Ok(loaded) => {
            print!(
                "{}",
                check_report(&args.preset.display().to_string(), &loaded)
            );
            if args.no_data && args.preview.is_none() {
                return ExitCode::SUCCESS;
            }
            print!("{}", context_report(&loaded.preset));
            print!("{}", memory_report(&loaded.preset));
            print!("{}", disk_report(&loaded.preset));
            match dataset_report(&loaded.preset, args.preview) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("termtune: the dataset could not be checked: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The text `termtune check` prints for a valid preset.
pub fn check_report(name: &str, loaded: &config::Loaded) -> String {
    let p = &loaded.preset;
    let mut out = String::new();
    let _ = writeln!(out, "{name}: valid\n");
    let _ = writeln!(
        out,
        "# resolved configuration (`# default` marks values not set in the file)"
    );
    let rows = config::resolved_entries(p);
    for group in Group::ALL {
        let in_group: Vec<_> = rows.iter().filter(|r| r.group == group).collect();
        if in_group.is_empty() {
            continue;
        }
        let _ = writeln!(out, "### {}", group.header());
        for row in in_group {
            let comment = match (&row.note, row.is_default) {
                (Some(n), true) => format!("  # {n} (default)"),
                (Some(n), false) => format!("  # {n}"),
                (None, true) => "  # default".to_string(),
                (None, false) => String::new(),
            };
            let _ = writeln!(out, "{}: {}{comment}", row.key, row.value);
        }
        out.push('\n');
    }
    let _ = writeln!(out, "# derived");
    let _ = writeln!(
        out,
        "#   examples per optimizer step: {} (batch {} x accumulation {})",
        p.examples_per_step(),
        p.per_device_train_batch_size,
        p.gradient_accumulation_steps
    );
    let _ = writeln!(
        out,
        "#   tokens per optimizer step: at most {} (x cutoff_len {})",
        p.max_tokens_per_step(),
        p.cutoff_len
    );
    if p.finetuning_type == config::FinetuningType::Lora
        && let Ok(lora) = crate::resolve::lora_spec(p)
    {
        let _ = writeln!(
            out,
            "#   LoRA scale: {:.4} (lora_alpha {} / {}{})",
            lora.scale(),
            p.lora_alpha_resolved(),
            if p.use_rslora {
                "sqrt of lora_rank "
            } else {
                "lora_rank "
            },
            p.lora_rank
        );
        if p.use_dora {
            let _ = writeln!(
                out,
                "#   DoRA: a trained magnitude per adapted output row (use_dora)"
            );
        }
        if p.pissa_init {
            let _ = writeln!(
                out,
                "#   PiSSA: A and B start as each adapted weight's {} principal singular directions ({}), the base keeps the residual{}",
                p.lora_rank,
                if p.pissa_iter == -1 {
                    "exact SVD".to_string()
                } else {
                    format!("randomized SVD, {} subspace iterations", p.pissa_iter)
                },
                if p.pissa_convert {
                    "; pissa_converted/ is a plain LoRA for the original base"
                } else {
                    ""
                }
            );
            if let Some(w) = p.pissa_warning() {
                let _ = writeln!(out, "# warning: {w}");
            }
        }
        if let Some(r) = p.loraplus_lr_ratio {
            let _ = writeln!(
                out,
                "#   LoRA+: lora_B learns at {:e} (learning_rate x loraplus_lr_ratio {r})",
                p.learning_rate * r
            );
        }
    }
    if p.use_muon {
        let _ = writeln!(
            out,
            "#   optimizer: Muon (use_muon) for the 2-D weights but embeddings and lm_head, at learning_rate x 0.2 x sqrt(larger side); AdamW for the rest; weight_decay on all"
        );
    }
    if p.load_best_model_at_end {
        let (metric, greater) = p.best_metric();
        let _ = writeln!(
            out,
            "#   best checkpoint: ranked by {metric} ({} is better), its weights kept at the end{}",
            if greater { "higher" } else { "lower" },
            p.early_stopping_steps
                .map(|n| format!("; early stopping after {n} evaluations without improvement"))
                .unwrap_or_default()
        );
    }
    if let Some(a) = p.neftune_noise_alpha {
        let _ = writeln!(
            out,
            "#   NEFTune: training embeddings get noise of {a} / sqrt(length x hidden) (neftune_noise_alpha)"
        );
    }
    if p.label_smoothing_factor > 0.0 {
        let _ = writeln!(
            out,
            "#   loss: label-smoothed by {} (transformers' LabelSmoother; label_smoothing_factor), eval_loss too",
            p.label_smoothing_factor
        );
    }
    if p.use_dft_loss {
        let _ = writeln!(
            out,
            "#   loss: DFT, each answer token's cross-entropy times its probability (use_dft_loss), eval_loss too"
        );
    }
    if p.use_eaft_loss {
        let _ = writeln!(
            out,
            "#   loss: EAFT, each answer token's cross-entropy times (entropy of its 20 largest logits / 3)^{} (use_eaft_loss, eaft_alpha), eval_loss too",
            p.eaft_alpha
        );
    }
    if !loaded.notes.is_empty() {
        let _ = writeln!(
            out,
            "\n# no effect in termtune (accepted for LLaMA-Factory compatibility):"
        );
        for note in &loaded.notes {
            let _ = writeln!(out, "#   {}: {}", note.key, note.reason);
        }
    }
    out
}

/// `# context`: what `rope_scaling` does to the model in training, or a warning when `cutoff_len` exceeds the
/// model's positions without it; empty when neither applies or the model's config.json is not at hand without a
/// download.
pub fn context_report(p: &config::Preset) -> String {
    let mut out = String::new();
    let hub = crate::resolve::ModelRef::of(p).hub_options();
    let Some(mut config) = crate::engine::source::config_json(&p.model_name_or_path, &hub) else {
        return out;
    };
    match crate::resolve::extend_context(p, Purpose::Train, &mut config) {
        Ok(Some(line)) => {
            let _ = writeln!(out, "\n# context\n#   {line}");
        }
        Ok(None) => {
            if let Ok(Some(positions)) = crate::engine::rope_ext::written_positions(&config)
                && p.cutoff_len > positions
            {
                let _ = writeln!(
                    out,
                    "\n# context\n# warning: cutoff_len {} exceeds the model's {positions} positions; set rope_scaling (linear, yarn or llama3) to extend them",
                    p.cutoff_len
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "\n# context\n# {e}");
        }
    }
    out
}

/// `# disk`: the estimated size of one checkpoint of `p` against the free space of `output_dir`'s file system,
/// with a warning when two checkpoints do not fit (a run writes the next one before it removes an old one);
/// empty when the model's config.json is not at hand without a download.
pub fn disk_report(p: &config::Preset) -> String {
    let mut out = String::new();
    let hub = crate::resolve::ModelRef::of(p).hub_options();
    let Some(config) = crate::engine::source::config_json(&p.model_name_or_path, &hub) else {
        return out;
    };
    let (Ok(cfg), Ok(ft)) = (
        crate::engine::ModelConfig::from_hf_config(&config),
        crate::resolve::finetune(p),
    ) else {
        return out;
    };
    let (trainable, total) = crate::engine::memory::param_counts(&cfg, &ft);
    let weights = if p.finetuning_type == config::FinetuningType::Lora {
        trainable * 4 // the adapter, saved in f32
    } else {
        // freeze/full checkpoints hold the whole model, in the training dtype.
        let dtype = crate::engine::device::chosen()
            .ok()
            .and_then(|d| crate::resolve::train_dtype(p, &d).ok())
            .map_or(candle_core::DType::F32, |(dt, _)| dt);
        total * dtype.size_in_bytes() as u64
    };
    let local = std::path::Path::new(&p.model_name_or_path);
    let tokenizer = if local.is_dir() {
        Some(local.to_path_buf())
    } else {
        crate::engine::hub::cached_snapshot(&p.model_name_or_path, &hub)
    }
    .and_then(|dir| std::fs::metadata(dir.join("tokenizer.json")).ok())
    .map_or(0, |m| m.len());
    let one = crate::trainer::checkpoint::estimate_checkpoint_bytes(weights, trainable, tokenizer);
    let dir = std::path::Path::new(&p.output_dir);
    let free = crate::fsutil::free_bytes(dir);
    out.push_str(&disk_text(&p.output_dir, one, weights, trainable * 8, free));
    out
}

/// The text of [`disk_report`] for a checkpoint of `one` bytes (`weights` + `optimizer` + the rest) and `free`
/// bytes on `output_dir`'s file system.
pub fn disk_text(
    output_dir: &str,
    one: u64,
    weights: u64,
    optimizer: u64,
    free: Option<u64>,
) -> String {
    use crate::fsutil::human_bytes;
    let mut out = String::new();
    let _ = writeln!(out, "\n# disk (estimate)");
    let _ = writeln!(
        out,
        "one checkpoint: about {} (weights {}, optimizer state {}, tokenizer and trainer state {})",
        human_bytes(one),
        human_bytes(weights),
        human_bytes(optimizer),
        human_bytes(one.saturating_sub(weights + optimizer))
    );
    match free {
        None => {
            let _ = writeln!(out, "free space of {output_dir}: unknown");
        }
        Some(free) if free < one.saturating_mul(2) => {
            let _ = writeln!(
                out,
                "warning: {output_dir} has {} free, less than two checkpoints ({}): the run will stop with a full disk at a save. Free some space there or choose another `output_dir`",
                human_bytes(free),
                human_bytes(one.saturating_mul(2))
            );
        }
        Some(free) => {
            let _ = writeln!(
                out,
                "{output_dir}: {} free, room for {} checkpoints",
                human_bytes(free),
                free / one.max(1)
            );
        }
    }
    out
}

/// Dataset statistics (and example `preview`) for `termtune check`: tokenises the training data
/// with the model's tokenizer and template (the tokenised cache makes the next run instant).
/// `# memory`: the estimated peak memory of a training run of `p` (see `engine::memory`) on the chosen device,
/// against a GPU's free memory; empty when the model's config.json is not at hand without a download.
fn memory_report(p: &config::Preset) -> String {
    let mut out = String::new();
    let hub = crate::resolve::ModelRef::of(p).hub_options();
    let Some(config) = crate::engine::source::config_json(&p.model_name_or_path, &hub) else {
        return out;
    };
    let cfg = match crate::engine::ModelConfig::from_hf_config(&config) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "\n# memory\n# cannot estimate: {e}");
            return out;
        }
    };
    let Ok(ft) = crate::resolve::finetune(p) else {
        return out;
    };
    let device = match crate::engine::device::chosen() {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(out, "\n# memory\n# {e}");
            return out;
        }
    };
    let Ok((dtype, _)) = crate::resolve::train_dtype(p, &device) else {
        return out;
    };
    let _ = writeln!(
        out,
        "\n# memory (estimate, {} in {dtype:?})",
        crate::engine::device::describe(&device)
    );
    let base = crate::resolve::base_storage(p);
    if let Some(t) = base.format_name() {
        let held = crate::engine::memory::base_weight_bytes(&cfg, &ft, dtype, base);
        let dense = crate::engine::memory::base_weight_bytes(
            &cfg,
            &ft,
            dtype,
            crate::engine::memory::BaseStorage::Dense,
        );
        let _ = writeln!(
            out,
            "base weights kept quantized ({t}): {} ({} in {dtype:?})",
            crate::fsutil::human_bytes(held),
            crate::fsutil::human_bytes(dense)
        );
    }
    let ref_cfg = crate::resolve::reference_config(p);
    for ckpt in [true, false] {
        let Ok((_, est)) = crate::resolve::memory_estimate(
            p,
            &cfg,
            device.is_cpu(),
            base,
            Some(ckpt),
            ref_cfg.as_ref(),
        ) else {
            return out;
        };
        let chosen = if ckpt != p.disable_gradient_checkpointing {
            " (this preset)"
        } else {
            ""
        };
        let fit = match crate::engine::device::memory_info(&device) {
            Some((free, _)) if est.fits(free as u64) => "fits".to_string(),
            #[allow(clippy::cast_precision_loss)]
            Some((free, _)) => format!(
                "does NOT fit in {:.1} GiB free: lower per_device_train_batch_size or cutoff_len",
                free as f64 / f64::from(1u32 << 30)
            ),
            None => "CPU: compare with the machine's RAM".into(),
        };
        let _ = writeln!(
            out,
            "gradient checkpointing {}{chosen}: {} at {} x cutoff_len {}; {fit}",
            if ckpt { "on" } else { "off" },
            est.describe(),
            p.micro_batch_words(),
            p.cutoff_len
        );
    }
    out
}

fn dataset_report(p: &config::Preset, preview: Option<usize>) -> Result<String, String> {
    let mut progress = |sp: crate::engine::source::SourceProgress| {
        if let crate::engine::source::SourceProgress::Note(line) = sp {
            eprintln!("termtune: {line}");
        }
    };
    let (opts, enc) = crate::resolve::load_encoder(p, &mut progress).map_err(|e| e.to_string())?;
    let mut out = String::new();
    for w in &enc.warnings {
        let _ = writeln!(out, "# warning: {w}");
    }
    if opts.dataset.is_empty() {
        return Ok(out);
    }
    let prepared = crate::data::prepare_dataset(&opts, &enc).map_err(|e| e.to_string())?;
    let _ = writeln!(out, "\n# dataset");
    out.push_str(&crate::data::stats::format_stats(&prepared.stats));
    for w in &prepared.warnings {
        let _ = writeln!(out, "# warning: {w}");
    }
    if let Some(index) = preview {
        let pv = crate::data::pipeline::preview(&opts, &enc, index).map_err(|e| e.to_string())?;
        let _ = writeln!(out, "\n# preview");
        out.push_str(&crate::data::stats::format_preview(&pv));
    }
    Ok(out)
}

fn load_or_report(
    preset: &std::path::Path,
    overrides: &[String],
    purpose: Purpose,
) -> Result<config::Loaded, ExitCode> {
    config::load(preset, overrides, purpose).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn train(args: &TrainArgs) -> ExitCode {
    let mut overrides = args.overrides.clone();
    if let Some(n) = args.threads {
        overrides.push(format!("num_threads={n}"));
    }
    let loaded = match load_or_report(&args.preset, &overrides, Purpose::Train) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    if args.run_child {
        return detached_run(loaded, args);
    }
    if args.detach {
        return detach(&loaded);
    }
    crate::headless::train(loaded)
}

#[cfg(unix)]
fn detached_run(loaded: config::Loaded, args: &TrainArgs) -> ExitCode {
    crate::runs::detach::run_child(loaded, &args.preset)
}

#[cfg(unix)]
fn detach(loaded: &config::Loaded) -> ExitCode {
    crate::runs::detach::start(loaded)
}

#[cfg(not(unix))]
fn detached_run(_: config::Loaded, _: &TrainArgs) -> ExitCode {
    detach_unsupported()
}

#[cfg(not(unix))]
fn detach(_: &config::Loaded) -> ExitCode {
    detach_unsupported()
}

#[cfg(not(unix))]
fn detach_unsupported() -> ExitCode {
    eprintln!(
        "termtune: detached runs need a Unix system (sessions and Unix sockets); run `termtune train` in the foreground"
    );
    ExitCode::FAILURE
}

fn predict(args: &PredictArgs) -> ExitCode {
    let loaded = match load_or_report(&args.preset, &args.overrides, Purpose::Predict) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    crate::headless::predict(&loaded.preset)
}

fn runs(args: &RunsArgs) -> ExitCode {
    let runs = crate::runs::list();
    if args.json {
        match serde_json::to_string_pretty(&runs) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("termtune: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if runs.is_empty() {
        eprintln!(
            "termtune: no runs yet (registered in {}); `termtune train PRESET --detach` starts one",
            crate::runs::registry_dir().display()
        );
    } else {
        print!("{}", crate::runs::table(&runs, crate::runs::now_unix()));
    }
    ExitCode::SUCCESS
}

#[cfg(unix)]
fn attach(args: &AttachArgs) -> ExitCode {
    use crate::runs::control::Request;
    let action = if args.stop {
        Some(Request::Stop)
    } else if args.pause {
        Some(Request::Pause)
    } else if args.resume {
        Some(Request::Resume)
    } else if args.save {
        Some(Request::Save)
    } else {
        None
    };
    crate::runs::attach::attach(args.output_dir.as_deref(), action)
}

#[cfg(not(unix))]
fn attach(_: &AttachArgs) -> ExitCode {
    detach_unsupported()
}

fn chat(args: &ChatArgs) -> ExitCode {
    let mut sampling = vec![
        ("default_system", args.system.clone()),
        ("temperature", args.temperature.map(|t| t.to_string())),
        ("top_p", args.top_p.map(|t| t.to_string())),
        ("top_k", args.top_k.map(|t| t.to_string())),
        ("max_new_tokens", args.max_new_tokens.map(|t| t.to_string())),
        (
            "repetition_penalty",
            args.repetition_penalty.map(|t| t.to_string()),
        ),
        ("seed", args.seed.map(|t| t.to_string())),
    ];
    if args.temperature == Some(0.0) {
        sampling.push(("do_sample", Some("false".into())));
    }
    let mut session = match chat_session(&args.source, &sampling) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Some(prompt) = &args.prompt {
        let mut stdout = std::io::stdout();
        let result = session.answer(prompt, None, |piece| {
            use std::io::Write as _;
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            std::ops::ControlFlow::Continue(())
        });
        println!();
        return match result {
            Ok(answer) => {
                eprintln!("termtune: {}", answer.timing.describe());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("termtune: {e}");
                ExitCode::FAILURE
            }
        };
    }
    repl(&mut session)
}

/// `termtune score`: a reward model's score of each answer.
fn score(args: &crate::cli::ScoreArgs) -> ExitCode {
    let (scorer, preset) = match load_for(&args.source, &[], crate::chat::score::Scorer::load) {
        Ok(s) => s,
        Err(code) => return code,
    };
    eprintln!(
        "termtune: {}; value head from {}",
        scorer.info,
        scorer.head_dir.display()
    );
    let system = args
        .system
        .clone()
        .or_else(|| preset.default_system.clone())
        .unwrap_or_default();
    for response in &args.responses {
        match scorer.score(&system, &args.prompt, response) {
            Ok(reward) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"reward": reward, "response": response})
                    );
                } else {
                    let head: String = response.chars().take(60).collect();
                    let more = if head.len() < response.len() {
                        "…"
                    } else {
                        ""
                    };
                    println!("{reward:>10.4}  {head}{more}");
                }
            }
            Err(e) => {
                eprintln!("termtune: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

/// `termtune api`: checks the address first (a refused bind costs no model load), loads the model,
/// then serves until interrupted.
fn api(args: &ApiArgs) -> ExitCode {
    if let Err(e) = crate::api::check_bind(&args.host, args.port, args.api_key.as_deref()) {
        eprintln!("termtune: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let session = match chat_session(&args.source, &[]) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let opts = crate::api::ApiOptions {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        model_name: args
            .model_name
            .clone()
            .unwrap_or_else(|| session.info.model.clone()),
        queue: args.queue,
        body_limit: args.max_body_bytes,
    };
    let server = match crate::api::ApiServer::start(session, &opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("termtune: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "termtune: serving `{}` on http://{}/v1 (POST /v1/chat/completions, GET /v1/models); Ctrl-C stops",
        opts.model_name,
        server.addr()
    );
    match server.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("termtune: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The model of `chat` or `api`, loaded on the chosen device (progress and the header on stderr).
fn chat_session(
    source: &crate::cli::ModelArgs,
    sampling: &[(&str, Option<String>)],
) -> Result<crate::chat::ChatSession, ExitCode> {
    let (session, _) = load_for(source, sampling, crate::chat::ChatSession::load)?;
    eprintln!("termtune: {}", session.info);
    Ok(session)
}

/// The preset of `source` and `sampling` (see [`chat_preset`]) and what `load` makes of it on the chosen device,
/// with progress notes and any failure on stderr.
fn load_for<T>(
    source: &crate::cli::ModelArgs,
    sampling: &[(&str, Option<String>)],
    load: impl FnOnce(
        &config::Preset,
        &candle_core::Device,
        &mut dyn FnMut(crate::engine::source::SourceProgress),
    ) -> Result<T, crate::chat::ChatError>,
) -> Result<(T, config::Preset), ExitCode> {
    let preset = chat_preset(source, sampling)?;
    let device = crate::engine::device::chosen().map_err(|e| {
        eprintln!("termtune: {e}");
        ExitCode::FAILURE
    })?;
    let mut progress = |p: crate::engine::source::SourceProgress| {
        if let crate::engine::source::SourceProgress::Note(line) = p {
            eprintln!("termtune: {line}");
        }
    };
    let loaded = load(&preset, &device, &mut progress).map_err(|e| {
        eprintln!("termtune: {e}");
        ExitCode::FAILURE
    })?;
    Ok((loaded, preset))
}

/// The preset for `termtune chat` / `api`: the file (if any), then the command-line flags (`sampling`: further
/// keys and values, `None` where the flag was not given).
fn chat_preset(
    args: &crate::cli::ModelArgs,
    sampling: &[(&str, Option<String>)],
) -> Result<config::Preset, ExitCode> {
    let mut overrides = Vec::new();
    let from_flags = [
        ("model_name_or_path", args.model.clone()),
        ("adapter_name_or_path", args.adapter.clone()),
        ("template", args.template.clone()),
    ];
    for (k, v) in from_flags.iter().chain(sampling) {
        if let Some(v) = v {
            overrides.push(format!("{k}={v}"));
        }
    }
    // Flags win over the file; values are passed as YAML strings so that text flags stay text.
    let overrides: Vec<String> = overrides
        .into_iter()
        .map(|o| match o.split_once('=') {
            Some((k, v))
                if matches!(
                    k,
                    "model_name_or_path" | "adapter_name_or_path" | "template" | "default_system"
                ) =>
            {
                format!("{k}={}", serde_json::Value::String(v.to_string()))
            }
            _ => o,
        })
        .collect();
    let result = match &args.preset {
        Some(path) => config::load(path, &overrides, Purpose::Chat),
        None => config::parse("", &overrides, Purpose::Chat)
            .map_err(|issues| config::ConfigErrors { path: None, issues }),
    };
    match result {
        Ok(loaded) => Ok(loaded.preset),
        Err(errors) => {
            eprint!("{errors}");
            if args.preset.is_none() && args.model.is_none() {
                eprintln!(
                    "termtune: pass --model (a hub id, a model folder or a .gguf file) or a preset"
                );
            }
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// The terminal REPL, like `llamafactory-cli chat`: `clear` resets the history, `exit` quits.
fn repl(session: &mut crate::chat::ChatSession) -> ExitCode {
    use std::io::{BufRead as _, Write as _};
    eprintln!("termtune: type a message; `clear` resets the history, `exit` quits.");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("\nUser: ");
        let _ = stdout.flush();
        let mut line = String::new();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return ExitCode::SUCCESS,
            Ok(_) => {}
        }
        let line = line.trim();
        match line {
            "" => continue,
            "exit" => return ExitCode::SUCCESS,
            "clear" => {
                session.clear();
                println!("History has been removed.");
                continue;
            }
            _ => {}
        }
        print!("Assistant: ");
        let _ = stdout.flush();
        let result = session.answer(line, None, |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            std::ops::ControlFlow::Continue(())
        });
        println!();
        if let Err(e) = result {
            eprintln!("termtune: {e}");
        }
    }
}

fn bench(args: &crate::cli::BenchArgs) -> ExitCode {
    let python = (!args.no_reference).then(|| {
        std::env::var_os("TERMTUNE_BENCH_PYTHON")
            .filter(|p| !p.is_empty())
            .map_or_else(
                || std::path::PathBuf::from("python3"),
                std::path::PathBuf::from,
            )
    });
    let opts = crate::bench::BenchOptions {
        model: args.model.clone(),
        dataset: args.dataset.clone(),
        dataset_dir: args.dataset_dir.clone(),
        template: args.template.clone(),
        examples: args.examples,
        batch_size: args.batch_size,
        cutoff_len: args.cutoff_len,
        lora_rank: args.lora_rank,
        dora: args.dora,
        steps: args.steps,
        warmup: 1,
        packing: args.packing,
        peak_tflops: args.peak_tflops,
        profile: args.profile,
        python,
        threads: args.threads,
        dtype: match args.dtype.as_str() {
            "bf16" | "bfloat16" => Some(candle_core::DType::BF16),
            "f32" | "float32" => Some(candle_core::DType::F32),
            _ => None,
        },
    };
    match crate::bench::run(&opts, &mut |line| eprintln!("termtune: {line}")) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("termtune: bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn export(args: &ExportArgs) -> ExitCode {
    let loaded = match load_or_report(&args.preset, &args.overrides, Purpose::Export) {
        Ok(l) => l,
        Err(code) => return code,
    };
    let mut progress = |line: &str| eprintln!("termtune: {line}");
    let result = if args.adapter_only {
        crate::export::export_adapter(&loaded.preset, &mut progress)
    } else {
        match crate::engine::device::chosen() {
            Ok(device) => crate::export::export(&loaded.preset, &device, &mut progress),
            Err(e) => {
                eprintln!("termtune: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    match result {
        Ok(report) => {
            println!("{}", report.dir.display());
            for f in &report.files {
                println!("  {f}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("termtune: export refused: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `termtune env`: what this build and machine offer.
pub fn env_report() -> String {
    let mut out = String::new();
    let _ = writeln!(out, "termtune {}", env!("CARGO_PKG_VERSION"));
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "nvml") {
        features.push("nvml");
    }
    let _ = writeln!(
        out,
        "build features: {}",
        if features.is_empty() {
            "none (CPU only)".to_string()
        } else {
            features.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "compute devices: {}",
        crate::engine::device::inventory()
    );
    let _ = writeln!(
        out,
        "device: {} (--device {}; CUDA_VISIBLE_DEVICES={})",
        crate::engine::device::chosen_label(),
        crate::engine::device::preferred(),
        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
    );
    let _ = writeln!(out, "cpu features: {}", cpu_features().join(" "));
    let _ = writeln!(
        out,
        "GGUF kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): {} (weights kept quantized)",
        crate::engine::legacy_quants::Kernel::detect().name()
    );
    let logical = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let _ = writeln!(
        out,
        "threads: {} for compute ({}), {} logical CPUs available",
        rayon::current_num_threads(),
        if THREADS_PINNED.load(std::sync::atomic::Ordering::Relaxed) {
            "one per physical core; RAYON_NUM_THREADS=N to change".to_string()
        } else {
            format!(
                "RAYON_NUM_THREADS={}",
                std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
            )
        },
        logical
    );
    match crate::telemetry::probe_gpus() {
        crate::telemetry::GpuProbe::Found { driver, gpus } => {
            let _ = writeln!(out, "nvml: found (driver {driver}), {} GPU(s)", gpus.len());
            for g in gpus {
                let _ = writeln!(
                    out,
                    "  gpu {}: {} ({:.1} GiB)",
                    g.index,
                    g.name,
                    bytes_to_gib(g.memory_total_bytes)
                );
            }
        }
        crate::telemetry::GpuProbe::Unavailable(why) => {
            let _ = writeln!(out, "nvml: {why}");
        }
        crate::telemetry::GpuProbe::NotBuilt => {
            let _ = writeln!(out, "nvml: not in this build (feature `nvml` off)");
        }
    }
    let _ = writeln!(
        out,
        "hf cache: {}",
        crate::engine::hub::HubOptions::from_env()
            .cache_dir
            .display()
    );
    let offline = std::env::var("HF_HUB_OFFLINE").unwrap_or_default();
    let _ = writeln!(
        out,
        "hf offline: {}",
        if matches!(
            offline.to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        ) {
            "yes (HF_HUB_OFFLINE)"
        } else {
            "no"
        }
    );
    let _ = writeln!(
        out,
        "termtune cache: {}",
        crate::fsutil::cache_dir().display()
    );
    let _ = writeln!(
        out,
        "log file: {}",
        crate::logging::log_path().map_or_else(
            || crate::logging::default_log_path().display().to_string(),
            |p| p.display().to_string()
        )
    );
    out
}

#[allow(clippy::cast_precision_loss)]
fn bytes_to_gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Whether [`pin_thread_count`] set `RAYON_NUM_THREADS` (the user had not).
static THREADS_PINNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// candle's CPU matmul asks for its thread count on every call, and on Linux that opens and parses
/// `/proc/cpuinfo` (`num_cpus::get_physical`) unless `RAYON_NUM_THREADS` is set: two reads per layer for every
/// decoded token (about 6 % of a SmolLM2 decode step, seen with `strace -e openat`). Setting the variable once to
/// candle's own answer keeps the count and drops the reads; a user's own value is left alone.
///
/// # Safety
/// Sets an environment variable: call it while no other thread exists (first thing in `main`).
#[allow(unsafe_code)]
pub unsafe fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller's contract: no other thread reads or writes the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        THREADS_PINNED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($name:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($name) { f.push($name); }
            )*};
        }
        detect!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512vnni"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        f.push("neon");
    }
    if f.is_empty() {
        f.push("(none detected)");
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_section_warns_below_two_checkpoints() {
        // One checkpoint of 3 MB (1 MB weights, 1.5 MB optimizer state, 0.5 MB the rest): 5.9 MB free holds one.
        let text = disk_text("out", 3_000_000, 1_000_000, 1_500_000, Some(5_900_000));
        assert!(
            text.contains("one checkpoint: about 3.0 MB (weights 1.0 MB, optimizer state 1.5 MB, tokenizer and trainer state 500.0 kB)"),
            "{text}"
        );
        assert!(
            text.contains("warning: out has 5.9 MB free, less than two checkpoints (6.0 MB)"),
            "{text}"
        );
        let text = disk_text("out", 3_000_000, 1_000_000, 1_500_000, Some(6_000_000));
        assert!(!text.contains("warning"), "{text}");
        assert!(
            text.contains("out: 6.0 MB free, room for 2 checkpoints"),
            "{text}"
        );
        let text = disk_text("out", 3_000_000, 1_000_000, 1_500_000, None);
        assert!(text.contains("free space of out: unknown"), "{text}");
    }
}
