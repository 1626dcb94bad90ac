//! The command line (clap). `main.rs` parses it and calls [`crate::commands::run`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Fine-tune LLMs (LoRA, freeze, full) from a terminal: LLaMA-Factory's presets, datasets and
/// run folders, PEFT adapters, on candle.
///
/// Run without a command to open the terminal UI.
#[derive(Debug, Parser)]
#[command(name = "termtune", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The preset the terminal UI opens (default: presets/quickstart.yaml).
    #[arg(value_name = "PRESET")]
    pub preset: Option<PathBuf>,

    /// Terminal UI theme: default, light, high-contrast, or a theme YAML file.
    #[arg(long, global = true, value_name = "NAME|FILE")]
    pub theme: Option<String>,

    /// Compute device: auto (the first CUDA GPU when this build has CUDA and one is present, else the CPU),
    /// cpu, cuda or cuda:N (N counts the GPUs that CUDA_VISIBLE_DEVICES shows).
    #[arg(
        long,
        global = true,
        value_name = "auto|cpu|cuda|cuda:N",
        default_value = "auto",
        env = "TERMTUNE_DEVICE"
    )]
    pub device: crate::engine::device::DeviceSpec,

    /// Write the log here instead of termtune's cache folder (stdout belongs to the TUI).
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train headless from a preset, e.g. `termtune train presets/quickstart.yaml learning_rate=2e-4`.
    ///
    /// The preset is LLaMA-Factory's YAML (the same file `llamafactory-cli train` reads). Overrides
    /// use LLaMA-Factory's command-line form KEY=VALUE and win over the file.
    Train(TrainArgs),
    /// Chat with a base model, an adapter or a checkpoint: a REPL, or one answer with --prompt.
    Chat(ChatArgs),
    /// Score answers with a reward model trained with `stage: rm` (its value head on the last token).
    ///
    /// e.g. `termtune score --model M --adapter saves/rm --prompt "Q" --response "A1" --response "A2"` prints
    /// one line per answer: its reward, then the answer's first words. Higher is preferred.
    Score(ScoreArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (like `llamafactory-cli api`).
    ///
    /// `GET /v1/models` and `POST /v1/chat/completions` (streamed or whole) on 127.0.0.1:8000 by default;
    /// listening beyond the loopback needs an API key. One request is answered at a time, the next ones wait
    /// in a queue of --queue places, and more are answered 503.
    Api(ApiArgs),
    /// Generate an answer for every example of the evaluation data and score it, as LLaMA-Factory's
    /// `do_predict` + `predict_with_generate` does.
    ///
    /// Reads `eval_dataset` (or the `val_size` split of `dataset`), generates in batches of
    /// `per_device_eval_batch_size` with the preset's generation keys, and writes generated_predictions.jsonl,
    /// predict_results.json (ROUGE-1/2/L and BLEU-4 ×100, runtime) and all_results.json into output_dir.
    Predict(PredictArgs),
    /// Merge adapters into the base and write a Hugging Face folder or a GGUF file.
    Export(ExportArgs),
    /// Validate a preset and print the fully resolved configuration.
    ///
    /// Every problem is reported at once with file, line and column; keys that have no effect in
    /// termtune are listed. Exit status 2 when the preset has problems.
    Check(CheckArgs),
    /// Show the version, build features, CPU features, threads, GPU (NVML) and cache locations.
    Env,
    /// Measure LoRA training speed and memory, beside PyTorch + PEFT on the same batches.
    ///
    /// The reference runs when a Python with torch, transformers and peft is found
    /// (TERMTUNE_BENCH_PYTHON, else python3); without it termtune's figures are printed alone.
    Bench(BenchArgs),
    /// List your runs: state (running, paused, finished, stopped, failed, died), step, loss, tokens/s, device, pid.
    ///
    /// A run whose process is gone without finishing shows as "died at step N, resumable from checkpoint-M":
    /// `termtune train` of the same preset resumes it.
    Runs(RunsArgs),
    /// Follow a run started with `termtune train --detach`, or pause, resume, checkpoint or stop it.
    ///
    /// Without a flag it prints the run's progress and reads p (pause), r (resume), s (save a checkpoint),
    /// x (stop with a checkpoint) or q (detach; the run goes on) from stdin.
    Attach(AttachArgs),
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Print the runs as a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("action").multiple(false))]
pub struct AttachArgs {
    /// The run folder (its output_dir); default: your only live run.
    pub output_dir: Option<PathBuf>,
    /// Stop the run after the current step, with a checkpoint, and wait until it has ended.
    #[arg(long, group = "action")]
    pub stop: bool,
    /// Pause the run after the current step.
    #[arg(long, group = "action")]
    pub pause: bool,
    /// Resume a paused run.
    #[arg(long, group = "action")]
    pub resume: bool,
    /// Save a checkpoint after the current step.
    #[arg(long, group = "action")]
    pub save: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model: hub id, folder or .gguf file.
    #[arg(long, default_value = "HuggingFaceTB/SmolLM2-135M-Instruct")]
    pub model: String,
    /// Dataset names in --dataset-dir's dataset_info.json.
    #[arg(long, default_value = "identity,demo_instructions")]
    pub dataset: String,
    #[arg(long, default_value = "data")]
    pub dataset_dir: std::path::PathBuf,
    /// Chat template (default: the tokenizer's own).
    #[arg(long)]
    pub template: Option<String>,
    /// Examples taken from each dataset.
    #[arg(long, default_value_t = 200)]
    pub examples: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub cutoff_len: usize,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: u32,
    /// DoRA (`use_dora: true`) instead of plain LoRA, on both sides.
    #[arg(long)]
    pub dora: bool,
    /// Measured optimizer steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Skip the PyTorch + PEFT reference.
    #[arg(long)]
    pub no_reference: bool,
    /// CPU threads for termtune and the reference (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Base-weight dtype: auto (bf16 on a GPU, f32 on the CPU), bf16 or f32.
    #[arg(long, default_value = "auto", value_parser = ["auto", "bf16", "bfloat16", "f32", "float32"])]
    pub dtype: String,
    /// Pack examples into full cutoff_len rows (LLaMA-Factory's `packing: true`; causal attention over the row,
    /// as the reference computes it) instead of padding each batch to its longest example. The dataset is
    /// repeated when one pass gives too few batches.
    #[arg(long)]
    pub packing: bool,
    /// The GPU's dense bf16 peak in TFLOP/s, for the MFU row (default: 790, measured on an H100/H200).
    #[arg(long, default_value_t = 790.0)]
    pub peak_tflops: f64,
    /// Also time each kind of kernel (norm, linear, attention, …) in one extra step per setting; the device
    /// waits around each, so that step is slower than the measured ones.
    #[arg(long)]
    pub profile: bool,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The preset YAML file.
    pub preset: PathBuf,
    /// Overrides in LLaMA-Factory's form: KEY=VALUE (e.g. lora_rank=16 max_steps=50).
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// CPU threads for training (same as num_threads=N; 0 = all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Train in a process of its own that outlives this terminal (and SSH session): print its
    /// output_dir, pid and how to attach, and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Internal: this process is the run started by `--detach`.
    #[arg(long, hide = true)]
    pub run_child: bool,
}

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The preset YAML file (LLaMA-Factory's predict YAML works as is).
    pub preset: PathBuf,
    /// Overrides in LLaMA-Factory's form: KEY=VALUE (e.g. eval_dataset=alpaca_en_demo max_samples=50).
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The preset YAML file.
    pub preset: PathBuf,
    /// Overrides in LLaMA-Factory's form: KEY=VALUE.
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Also show example N of the training data: raw record, rendered text, trained/masked tokens.
    #[arg(long, value_name = "N")]
    pub preview: Option<usize>,
    /// Check the preset only: skip loading the tokenizer and the dataset statistics.
    #[arg(long)]
    pub no_data: bool,
}

/// The model a chat-like command talks with: a preset, and flags that override it (`chat`, `api`).
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A preset to take the model, adapter, template and generation settings from.
    pub preset: Option<PathBuf>,
    /// Base model: hub id, local Hugging Face folder or .gguf file.
    #[arg(long)]
    pub model: Option<String>,
    /// Adapter folder(s), comma separated (merged into the base).
    #[arg(long)]
    pub adapter: Option<String>,
    /// Chat template name; default: the tokenizer's own chat template.
    #[arg(long)]
    pub template: Option<String>,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// The prompt (the user turn).
    #[arg(long)]
    pub prompt: String,
    /// An answer to score; repeat to compare several.
    #[arg(long = "response", required = true)]
    pub responses: Vec<String>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Print JSON lines (`{"reward": …, "response": …}`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Answer this one prompt, print only the answer on stdout and exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Sampling temperature; 0 means greedy.
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// Address to listen on; anything but a loopback address needs an API key.
    #[arg(long, env = "API_HOST", default_value = crate::api::DEFAULT_HOST)]
    pub host: String,
    /// Port to listen on (0: any free port).
    #[arg(long, env = "API_PORT", default_value_t = crate::api::DEFAULT_PORT)]
    pub port: u16,
    /// Key that clients must send as `Authorization: Bearer KEY`.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model id clients name in requests (default: the base model's name).
    #[arg(long, env = "API_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Requests that may wait while one is being answered; more are answered 503.
    #[arg(long, default_value_t = crate::api::DEFAULT_QUEUE)]
    pub queue: usize,
    /// The largest request body accepted, in bytes.
    #[arg(long, default_value_t = crate::api::DEFAULT_BODY_LIMIT)]
    pub max_body_bytes: usize,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The preset YAML file (model_name_or_path, adapter_name_or_path, export_dir, …).
    pub preset: PathBuf,
    /// Copy the (last) adapter of `adapter_name_or_path` as a PEFT folder with a model card instead of
    /// merging it into the base.
    #[arg(long)]
    pub adapter_only: bool,
    /// Overrides in LLaMA-Factory's form: KEY=VALUE.
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}
