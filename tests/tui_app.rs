//! `App::update` without a terminal: keys go through the real keymap, effects are asserted.

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use termtune::app::{App, Effect, Msg, Overlay, Phase, Question, Tab};
use termtune::trainer::protocol::{TrainCommand, TrainEvent};

const QUICKSTART: &str = include_str!("../presets/quickstart.yaml");

fn key(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

fn code(c: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn app() -> App {
    App::new(Some(PathBuf::from("presets/quickstart.yaml")), QUICKSTART)
}

fn started(a: &mut App) {
    let fx = a.update(key('s'));
    assert!(matches!(fx.as_slice(), [Effect::StartRun(_)]), "{fx:?}");
    a.update(Msg::Engine(TrainEvent::Started {
        total_steps: 10,
        examples: 80,
        eval_examples: 0,
        trainable_params: 1,
        total_params: 2,
        start_step: 0,
    }));
}

#[test]
fn start_on_an_invalid_form_sends_nothing_and_focuses_the_first_problem() {
    let text = QUICKSTART.replace("lora_rank: 8", "lora_rank: 0");
    let mut a = App::new(None, &text);
    assert_eq!(a.tab, Tab::Model);
    let fx = a.update(key('s'));
    assert!(fx.is_empty(), "{fx:?}");
    assert_eq!(a.tab, Tab::Method);
    assert_eq!(a.focused_key(), Some("lora_rank"));
    let status = a.status.clone().unwrap();
    assert!(status.error);
    assert!(status.text.contains("lora_rank"), "{}", status.text);
    assert_eq!(a.run.phase, Phase::Idle);
}

#[test]
fn start_on_a_valid_form_starts_the_engine_on_the_edited_preset() {
    let mut a = app();
    a.update(key('4'));
    for _ in 0..11 {
        a.update(code(KeyCode::Down));
    }
    assert_eq!(a.focused_key(), Some("max_steps"));
    a.update(code(KeyCode::Enter));
    a.update(ctrl('u'));
    a.update(key('7'));
    a.update(code(KeyCode::Enter));
    let fx = a.update(key('s'));
    match fx.as_slice() {
        [Effect::StartRun(loaded)] => assert_eq!(loaded.preset.max_steps, 7),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.tab, Tab::Run);
    assert!(a.run.phase.is_active());
    // A second start while running is refused.
    assert!(a.update(key('s')).is_empty());
}

#[test]
fn typing_validates_each_keystroke_and_esc_restores() {
    let mut a = app();
    a.update(key('3'));
    let rank = a.tab.keys().iter().position(|k| *k == "lora_rank").unwrap();
    for _ in 0..rank {
        a.update(code(KeyCode::Down));
    }
    a.update(code(KeyCode::Enter));
    a.update(code(KeyCode::Backspace));
    // "8" deleted: the field is empty, which is a problem right away.
    assert!(a.form.issue("lora_rank").is_some());
    a.update(key('x'));
    assert!(a.form.issue("lora_rank").is_some());
    a.update(code(KeyCode::Esc));
    assert!(a.form.issue("lora_rank").is_none());
    assert!(!a.form.is_dirty());
}

#[test]
fn selects_cycle_and_toggles_flip() {
    let mut a = app();
    a.update(key('3'));
    let ft = a
        .tab
        .keys()
        .iter()
        .position(|k| *k == "finetuning_type")
        .unwrap();
    for _ in 0..ft {
        a.update(code(KeyCode::Down));
    }
    a.update(code(KeyCode::Right));
    assert_eq!(a.form.value("finetuning_type"), "freeze");
    a.update(code(KeyCode::Left));
    assert_eq!(a.form.value("finetuning_type"), "lora");
    assert!(!a.form.is_dirty());
}

#[test]
fn stop_asks_and_sends_stop_with_save() {
    let mut a = app();
    started(&mut a);
    assert!(a.update(key('x')).is_empty());
    assert_eq!(a.overlay, Overlay::Confirm(Question::StopRun));
    let fx = a.update(key('y'));
    assert_eq!(fx, vec![Effect::Engine(TrainCommand::Stop { save: true })]);
    assert_eq!(a.run.phase, Phase::Stopping { save: true });
}

#[test]
fn quit_during_a_run_saves_then_waits_for_the_engine() {
    let mut a = app();
    started(&mut a);
    a.update(ctrl('c'));
    assert_eq!(a.overlay, Overlay::Confirm(Question::QuitDuringRun));
    let fx = a.update(key('y'));
    assert_eq!(fx, vec![Effect::Engine(TrainCommand::Stop { save: true })]);
    // Not gone yet: the checkpoint is being written.
    assert!(
        a.update(Msg::Engine(TrainEvent::CheckpointSaved {
            step: 3,
            dir: PathBuf::from("out/checkpoint-3")
        }))
        .is_empty()
    );
    assert_eq!(a.update(Msg::EngineExited), vec![Effect::Quit]);
}

#[test]
fn quit_when_idle_and_clean_is_immediate_and_dirty_asks() {
    let mut a = app();
    assert_eq!(a.update(key('q')), vec![Effect::Quit]);
    let mut b = app();
    b.update(key('3'));
    b.focus_key("finetuning_type");
    b.update(code(KeyCode::Right)); // an edit
    assert!(b.form.is_dirty());
    assert!(b.update(key('q')).is_empty());
    assert_eq!(b.overlay, Overlay::Confirm(Question::DiscardChanges));
    assert_eq!(b.update(key('y')), vec![Effect::Quit]);
}

#[test]
fn pause_and_resume_go_to_the_engine() {
    let mut a = app();
    started(&mut a);
    assert_eq!(
        a.update(key('p')),
        vec![Effect::Engine(TrainCommand::Pause)]
    );
    a.update(Msg::Engine(TrainEvent::Paused));
    assert_eq!(
        a.update(key('p')),
        vec![Effect::Engine(TrainCommand::Resume)]
    );
}

#[test]
fn engine_dying_silently_is_shown_as_a_failure() {
    let mut a = app();
    started(&mut a);
    assert!(a.update(Msg::EngineExited).is_empty());
    assert!(matches!(a.run.phase, Phase::Failed(_)));
}

#[test]
fn save_writes_the_edited_preset_and_an_invalid_one_is_refused() {
    let mut a = app();
    let fx = a.update(ctrl('s'));
    assert!(
        matches!(&fx[..], [Effect::SavePreset { path, .. }] if path == &PathBuf::from("presets/quickstart.yaml"))
    );
    let mut b = App::new(None, "lora_rank: 0\n");
    assert!(b.update(ctrl('s')).is_empty() || b.editing.is_some());
}

#[test]
fn theme_cycles_through_the_names() {
    let mut a = app();
    a.theme_names = vec!["default".into(), "light".into(), "high-contrast".into()];
    a.update(key('t'));
    assert_eq!(a.theme_index, 1);
    a.update(key('t'));
    a.update(key('t'));
    assert_eq!(a.theme_index, 0);
}

#[test]
fn the_dirty_flag_drives_redraws() {
    let mut a = app();
    assert!(a.take_dirty());
    a.update(Msg::Tick);
    assert!(!a.take_dirty());
    a.update(key('2'));
    a.update(Msg::Tick);
    assert!(a.take_dirty());
}

#[test]
fn the_model_field_says_what_it_resolves_to() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    termtune::engine::testing::tiny_llama(
        &model,
        7,
        &termtune::engine::testing::TinyOpts::default(),
    )
    .unwrap();
    let info = termtune::tui::describe_model(&model.display().to_string()).unwrap();
    assert!(info.starts_with("folder: llama · 2 layers"), "{info}");
    let missing = termtune::tui::describe_model("no/such/dir/x").unwrap_err();
    assert!(missing.contains("no such file or folder"), "{missing}");
    assert!(termtune::tui::describe_model("").is_err());
    // The app asks for it at start and again when the field is edited.
    let mut a = app();
    assert!(a.initial_effects().contains(&Effect::ProbeModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct".into()
    )));
    a.update(code(KeyCode::Enter));
    a.update(ctrl('u'));
    for c in "m.gguf".chars() {
        a.update(key(c));
    }
    assert_eq!(
        a.update(code(KeyCode::Enter)),
        vec![Effect::ProbeModel("m.gguf".into())]
    );
}

#[test]
fn a_hang_up_during_a_run_stops_with_a_checkpoint_then_quits() {
    let mut a = app();
    started(&mut a);
    assert_eq!(
        a.update(Msg::Terminate),
        vec![Effect::Engine(TrainCommand::Stop { save: true })]
    );
    // A second signal does not abandon the checkpoint.
    assert!(a.update(Msg::Terminate).is_empty());
    assert_eq!(a.update(Msg::EngineExited), vec![Effect::Quit]);
    let mut idle = app();
    assert_eq!(idle.update(Msg::Terminate), vec![Effect::Quit]);
}
