//! The Export pane end to end without a terminal, on the tiny seeded llama (CPU, seconds): the
//! TUI's `s` starts a real training whose events go through `App::update`; while it "runs",
//! the pane refuses its `output_dir` and exports its latest checkpoint (`L`, `e`, `y`) through
//! `export::job::run`, the function the TUI's export thread calls; after it ends, the final
//! adapter exports alone; a second export into the same folder is refused and leaves nothing.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use crate::tiny_util::*;
use candle_core::{DType, Device, Tensor};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use termtune::app::{App, Effect, ExportPhase, Msg, Overlay, Question, Tab};
use termtune::engine::hub::HubOptions;
use termtune::engine::source::load_model;
use termtune::engine::weights::load_hf_folder;
use termtune::engine::{AttnMask, Finetune, Model, adapter};
use termtune::export::job::{self, ExportEvent, ExportRequest};
use termtune::trainer::protocol::TrainEvent;
use termtune::trainer::run::run_training;

const CPU: Device = Device::Cpu;

fn key(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

/// A tiny model, a toy dataset of 8 rows and the preset text that trains 4 steps on it with a
/// checkpoint every 2 steps and exports to `root/merged` in f32.
fn fixture(root: &Path) -> String {
    let rows: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({"instruction": format!("say {i}"), "input": "", "output": format!("ok {}", i * 7)})
        })
        .collect();
    tiny_model_and_toy_data(root, &rows);
    format!(
        "model_name_or_path: {}\ndataset: toy\ndataset_dir: {}\ntemplate: chatml\ncutoff_len: 64\n\
         output_dir: {}\nlogging_steps: 1\nsave_steps: 2\nmax_steps: 4\nper_device_train_batch_size: 2\n\
         learning_rate: 5.0e-2\nlora_rank: 4\nlr_scheduler_type: constant\ntokenized_path: {}\nseed: 3\n\
         export_dir: {}\ninfer_dtype: float32\n",
        root.join("model").display(),
        root.join("data").display(),
        root.join("run").display(),
        root.join("tokcache").display(),
        root.join("merged").display(),
    )
}

/// `e` then `y` on the Export pane: the export the app asks the terminal loop to run.
fn confirm_export(a: &mut App) -> ExportRequest {
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.overlay, Overlay::Confirm(Question::StartExport));
    match a.update(key('y')).as_slice() {
        [Effect::Export(r)] => (**r).clone(),
        other => panic!("{other:?}"),
    }
}

/// Runs the export as the TUI's thread does and feeds its events to the app.
fn run_export(a: &mut App, request: &ExportRequest) -> Vec<ExportEvent> {
    let mut events = Vec::new();
    job::run(request, &CPU, &AtomicBool::new(false), &mut |ev| {
        events.push(ev)
    });
    for ev in &events {
        a.update(Msg::Export(ev.clone()));
    }
    events
}

fn logits(model: &Model) -> Tensor {
    // Arbitrary ids inside the tiny vocabulary.
    let ids = Tensor::from_vec(vec![5u32, 71, 200, 13, 17, 33], (1, 6), &CPU).unwrap();
    model
        .forward(&ids, &AttnMask::Causal, false)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

#[test]
fn export_from_the_tui_during_and_after_a_real_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let text = fixture(root);
    let mut a = App::new(Some(root.join("preset.yaml")), &text);
    assert!(a.form.issues.is_empty(), "{:?}", a.form.issues);

    // Train through the TUI's start; keep the events to replay them as the engine thread would.
    let loaded = match a.update(key('s')).as_slice() {
        [Effect::StartRun(l)] => (**l).clone(),
        other => panic!("{other:?}"),
    };
    let (_cmd_tx, cmd_rx) = mpsc::channel();
    let mut events = Vec::new();
    run_training(&loaded, &CPU, &cmd_rx, &mut |ev| events.push(ev)).unwrap();
    let first_checkpoint = events
        .iter()
        .position(|e| matches!(e, TrainEvent::CheckpointSaved { .. }))
        .unwrap();
    // The run is mid-way for the app: up to its first checkpoint.
    for ev in &events[..=first_checkpoint] {
        a.update(Msg::Engine(ev.clone()));
    }
    assert!(a.run.phase.is_active());
    let checkpoint = a.run.last_checkpoint.clone().unwrap().1;
    assert!(checkpoint.ends_with("checkpoint-2"), "{checkpoint:?}");

    // Its output_dir is refused while it trains (the final adapter is not written yet).
    a.update(key('7'));
    a.form.set(
        "adapter_name_or_path",
        &root.join("run").display().to_string(),
    );
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.overlay, Overlay::None);
    assert_eq!(a.focused_key(), Some("adapter_name_or_path"));
    let status = a.status.clone().unwrap();
    assert!(
        status.error && status.text.contains("while its run is training"),
        "{status:?}"
    );

    // `L` picks the saved checkpoint, which exports while the run goes on.
    a.update(key('7'));
    a.update(key('L'));
    assert_eq!(
        a.form.value("adapter_name_or_path"),
        checkpoint.display().to_string()
    );
    a.update(key('e'));
    assert!(
        a.export_question()
            .contains(&root.join("merged").display().to_string()),
        "{}",
        a.export_question()
    );
    a.update(key('n'));
    assert!(a.export.pending.is_none());
    let request = confirm_export(&mut a);
    assert!(!request.adapter_only);
    assert!(a.export.is_running());
    let ev = run_export(&mut a, &request);
    assert!(
        ev.iter()
            .any(|e| matches!(e, ExportEvent::Progress(l) if l.contains("merging adapter 1/1"))),
        "{ev:?}"
    );
    let ExportPhase::Finished(report) = &a.export.phase else {
        panic!("{:?}", a.export.phase);
    };
    assert_eq!(report.weights_type, "float32");
    assert_eq!(report.merged_adapters, vec![checkpoint.clone()]);
    assert!(
        report.files.contains(&"model.safetensors".to_string()),
        "{:?}",
        report.files
    );

    // The exported folder is base + checkpoint: same logits as merging in memory (f32).
    let base = load_hf_folder(&root.join("model"), DType::F32, &CPU).unwrap();
    let mut reference = Model::from_files(&base, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    adapter::merge_adapter(&mut reference, &checkpoint).unwrap();
    let src = load_model(
        root.join("merged").to_str().unwrap(),
        &HubOptions::from_vars(|_| None),
        DType::F32,
        &CPU,
        &mut |_| {},
    )
    .unwrap();
    let exported = Model::from_files(&src.files, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    let diff = max_abs_diff(&logits(&reference), &logits(&exported));
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    // The trained adapter matters (lr 5e-2 for 2 steps moves the logits).
    let plain = Model::from_files(&base, DType::F32, &CPU, &Finetune::Frozen).unwrap();
    assert!(max_abs_diff(&logits(&plain), &logits(&exported)) > 1e-3);

    // The run ends; now its final adapter exports alone (m), with a model card.
    for ev in &events[first_checkpoint + 1..] {
        a.update(Msg::Engine(ev.clone()));
    }
    a.update(Msg::EngineExited);
    assert!(!a.run.phase.is_active());
    a.update(key('7'));
    a.form.set(
        "adapter_name_or_path",
        &root.join("run").display().to_string(),
    );
    a.form.set(
        "export_dir",
        &root.join("adapter-out").display().to_string(),
    );
    a.update(key('m'));
    let request = confirm_export(&mut a);
    assert!(request.adapter_only);
    run_export(&mut a, &request);
    let ExportPhase::Finished(report) = &a.export.phase else {
        panic!("{:?}", a.export.phase);
    };
    assert_eq!(report.weights_type, "adapter");
    for f in [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ] {
        assert!(report.files.contains(&f.to_string()), "{:?}", report.files);
    }

    // Exporting into the same (now full) folder again is refused, and nothing partial is left.
    let before: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let request = confirm_export(&mut a);
    run_export(&mut a, &request);
    let ExportPhase::Failed(message) = &a.export.phase else {
        panic!("{:?}", a.export.phase);
    };
    assert!(message.contains("not empty"), "{message}");
    assert!(a.status.as_ref().unwrap().error);
    let after: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    assert_eq!(a.tab, Tab::Export);

    // A cancel (x) while the model is being merged: the export stops at its next step, nothing
    // is left, the pane says so.
    a.form
        .set("export_dir", &root.join("cancelled").display().to_string());
    a.update(key('m'));
    assert!(!a.export.adapter_only);
    let request = confirm_export(&mut a);
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    job::run(&request, &CPU, &cancel, &mut |ev| {
        if matches!(&ev, ExportEvent::Progress(l) if l.starts_with("merging adapter")) {
            // What the TUI does on x: the app asks for it, the loop sets the flag.
            assert_eq!(a.update(key('x')), vec![Effect::CancelExport]);
            cancel.store(true, Ordering::SeqCst);
        }
        events.push(ev);
    });
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ExportEvent::Progress(l) if l.starts_with("merging adapter"))),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&ExportEvent::Cancelled));
    for ev in events {
        a.update(Msg::Export(ev));
    }
    assert_eq!(a.export.phase, ExportPhase::Cancelled);
    let after_cancel: Vec<_> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after_cancel, "a cancelled export leaves nothing");
}

// ---- Pure `update` tests of the pane (no export runs). ----

const QUICKSTART: &str = include_str!("../presets/quickstart.yaml");

fn quickstart() -> App {
    App::new(
        Some(std::path::PathBuf::from("presets/quickstart.yaml")),
        QUICKSTART,
    )
}

#[test]
fn export_with_problems_sends_nothing_and_focuses_the_problem() {
    let mut a = quickstart();
    a.update(key('7'));
    // The quickstart has no export_dir: an export needs one (a training does not).
    assert!(a.form.issues.is_empty());
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.overlay, Overlay::None);
    assert_eq!(a.tab, Tab::Export);
    assert_eq!(a.focused_key(), Some("export_dir"));
    let status = a.status.clone().unwrap();
    assert!(
        status.error && status.text.contains("export_dir"),
        "{status:?}"
    );
    assert_eq!(a.export.phase, ExportPhase::Idle);

    // A problem on another tab moves there.
    let mut b = quickstart();
    b.form.set("export_dir", "out/merged");
    b.form.set("lora_rank", "0");
    b.update(key('7'));
    assert!(b.update(key('e')).is_empty());
    assert_eq!(b.focused_key(), Some("lora_rank"));
}

#[test]
fn export_asks_first_and_only_yes_starts_it() {
    let mut a = quickstart();
    a.form.set("export_dir", "out/merged");
    a.update(key('7'));
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.overlay, Overlay::Confirm(Question::StartExport));
    assert!(a.export_question().contains("out/merged"));
    // Esc cancels: nothing written, nothing pending.
    assert!(
        a.update(Msg::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)))
            .is_empty()
    );
    assert!(a.export.pending.is_none());
    a.update(key('e'));
    let fx = a.update(key('y'));
    match fx.as_slice() {
        [Effect::Export(r)] => {
            assert_eq!(r.preset.export_dir.as_deref(), Some("out/merged"));
            assert!(!r.adapter_only);
        }
        other => panic!("{other:?}"),
    }
    assert!(a.export.is_running());
    // A second start while it runs is refused.
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.overlay, Overlay::None);
}

#[test]
fn adapter_only_needs_an_adapter() {
    let mut a = quickstart();
    a.form.set("export_dir", "out/adapter");
    a.update(key('7'));
    a.update(key('m'));
    assert!(a.export.adapter_only);
    assert!(a.update(key('e')).is_empty());
    assert_eq!(a.focused_key(), Some("adapter_name_or_path"));
    assert_eq!(a.overlay, Overlay::None);
}

fn exporting() -> App {
    let mut a = quickstart();
    a.form.set("export_dir", "out/merged");
    a.update(key('7'));
    a.update(key('e'));
    a.update(key('y'));
    assert!(a.export.is_running());
    a
}

#[test]
fn quit_during_an_export_asks_then_cancels_it_and_leaves_when_it_stopped() {
    let mut a = exporting();
    assert!(a.update(key('q')).is_empty());
    assert_eq!(a.overlay, Overlay::Confirm(Question::QuitDuringExport));
    // n: keep exporting.
    assert!(a.update(key('n')).is_empty());
    assert!(!a.export.quit_when_done);
    a.update(key('q'));
    assert_eq!(a.update(key('y')), vec![Effect::CancelExport]);
    assert!(a.export.quit_when_done);
    assert_eq!(
        a.update(Msg::Export(ExportEvent::Cancelled)),
        vec![Effect::Quit]
    );
    // Waiting for the cancel, a second q leaves at once.
    let mut b = exporting();
    b.update(key('q'));
    b.update(key('y'));
    assert_eq!(b.update(key('q')), vec![Effect::Quit]);
    // A hang-up cancels and leaves when the export has stopped.
    let mut c = exporting();
    assert_eq!(c.update(Msg::Terminate), vec![Effect::CancelExport]);
    assert!(c.update(Msg::Terminate).is_empty());
    assert_eq!(
        c.update(Msg::Export(ExportEvent::Cancelled)),
        vec![Effect::Quit]
    );
}

#[test]
fn quitting_during_a_run_and_an_export_stops_both_before_leaving() {
    let mut a = exporting();
    a.update(key('s'));
    a.update(Msg::Engine(TrainEvent::Started {
        total_steps: 10,
        examples: 80,
        eval_examples: 0,
        trainable_params: 1,
        total_params: 2,
        start_step: 0,
        device: "cpu".into(),
    }));
    // The run's question comes first (save a checkpoint?), then the export is cancelled.
    a.update(key('q'));
    assert_eq!(a.overlay, Overlay::Confirm(Question::QuitDuringRun));
    a.update(key('y'));
    assert_eq!(a.update(Msg::EngineExited), vec![Effect::CancelExport]);
    assert_eq!(
        a.update(Msg::Export(ExportEvent::Cancelled)),
        vec![Effect::Quit]
    );
}

#[test]
fn x_cancels_a_running_export_once() {
    let mut a = exporting();
    assert_eq!(a.update(key('x')), vec![Effect::CancelExport]);
    assert!(a.export.cancelling);
    assert!(a.update(key('x')).is_empty());
    a.update(Msg::Export(ExportEvent::Cancelled));
    assert_eq!(a.export.phase, ExportPhase::Cancelled);
    assert!(!a.export.cancelling);
    // Without an export, x on the Export pane is the usual stop (nothing runs: nothing to stop).
    assert!(a.update(key('x')).is_empty());
    assert_eq!(a.overlay, Overlay::None);
}

#[test]
fn show_as_command_on_the_export_tab_gives_the_export_lines() {
    let mut a = quickstart();
    a.form.set("export_dir", "out/merged");
    assert_eq!(
        a.form.export_commands(false),
        vec![
            "termtune export presets/quickstart.yaml export_dir=out/merged",
            "llamafactory-cli export presets/quickstart.yaml export_dir=out/merged",
        ]
    );
    assert!(a.form.export_commands(true)[0].contains("--adapter-only"));
    a.update(key('7'));
    a.update(key('c'));
    assert_eq!(a.overlay, Overlay::Command);
}
