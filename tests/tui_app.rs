//! `App::update` without a terminal: keys go through the real keymap, effects are asserted.

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use termtune::app::{App, Effect, Msg, Overlay, Phase, Question, Tab};
use termtune::resolve::ModelRef;
use termtune::runs::{RunRecord, RunState, RunView};
use termtune::trainer::protocol::{TrainCommand, TrainEvent};
use termtune::trainer::runlog::LogLine;

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
        device: "cpu".into(),
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
    let hub = termtune::engine::hub::HubOptions::from_env();
    let describe = |name: &str| termtune::engine::source::describe(name, &hub);
    let info = describe(&model.display().to_string()).unwrap();
    assert!(info.starts_with("folder: llama · 2 layers"), "{info}");
    let missing = describe("no/such/dir/x").unwrap_err();
    assert!(missing.contains("no such file or folder"), "{missing}");
    assert!(describe("").is_err());
    // The app asks for it at start and again when the field is edited, with the hub keys.
    let probe = |name: &str, cache_dir: Option<&str>| {
        Effect::ProbeModel(ModelRef {
            name_or_path: name.into(),
            revision: "main".into(),
            cache_dir: cache_dir.map(Into::into),
            hf_hub_token: None,
            gguf: termtune::engine::source::GgufWeights::Quantized,
        })
    };
    let mut a = app();
    assert!(
        a.initial_effects()
            .contains(&probe("HuggingFaceTB/SmolLM2-135M-Instruct", None))
    );
    a.update(code(KeyCode::Enter));
    a.update(ctrl('u'));
    for c in "m.gguf".chars() {
        a.update(key(c));
    }
    assert_eq!(a.update(code(KeyCode::Enter)), vec![probe("m.gguf", None)]);
    // A moved hub cache is probed again: the description reads that cache.
    a.focus_key("cache_dir");
    a.update(code(KeyCode::Enter));
    for c in "/tmp/hub".chars() {
        a.update(key(c));
    }
    assert_eq!(
        a.update(code(KeyCode::Enter)),
        vec![probe("m.gguf", Some("/tmp/hub"))]
    );
}

#[test]
fn a_hang_up_during_a_run_leaves_it_running_and_says_where() {
    let mut a = app();
    started(&mut a);
    a.update(Msg::RunAttached {
        output_dir: PathBuf::from("/abs/saves/qwen"),
        record: Box::new(record(RunState::Running, 4242)),
        history: Vec::new(),
    });
    // The run is its own process: the TUI leaves at once and sends it nothing.
    assert_eq!(a.update(Msg::Terminate), vec![Effect::Quit]);
    let farewell = a.farewell.clone().unwrap();
    assert!(
        farewell.contains("goes on (pid 4242)") && farewell.contains("termtune attach"),
        "{farewell}"
    );
    let mut idle = app();
    assert_eq!(idle.update(Msg::Terminate), vec![Effect::Quit]);
    assert_eq!(idle.farewell, None);
}

fn record(state: RunState, pid: u32) -> RunRecord {
    RunRecord {
        output_dir: PathBuf::from("/abs/saves/qwen"),
        state,
        pid,
        process_start: 1,
        started: 1,
        preset: PathBuf::from("/abs/saves/qwen/termtune-run.yaml"),
        device: Some("cuda:0 (NVIDIA H200)".into()),
        total_steps: Some(40),
        message: None,
    }
}

fn logged(step: u64, loss: f64) -> LogLine {
    serde_json::from_value(serde_json::json!({
        "current_steps": step, "total_steps": 40, "loss": loss, "lr": 1e-4, "epoch": 0.1,
        "percentage": 2.5, "elapsed_time": "0:00:01", "remaining_time": "0:00:39"
    }))
    .unwrap()
}

#[test]
fn quit_during_a_run_asks_stop_or_leave_and_n_leaves_it_running() {
    let mut a = app();
    started(&mut a);
    a.update(key('q'));
    assert_eq!(a.overlay, Overlay::Confirm(Question::QuitDuringRun));
    assert!(Question::QuitDuringRun.text().contains("leave it running"));
    assert_eq!(a.update(key('n')), vec![Effect::Quit]);
    assert!(a.farewell.unwrap().contains("goes on"));
}

#[test]
fn the_run_pane_lists_the_runs_and_follows_the_one_picked_with_its_history() {
    let mut a = app();
    a.update(key('5'));
    assert_eq!(a.update(key('a')), vec![Effect::ListRuns]);
    let view = |dir: &str, state| RunView {
        output_dir: PathBuf::from(dir),
        state,
        step: 3,
        total_steps: Some(40),
        loss: Some(1.5),
        tokens_per_sec: None,
        device: None,
        pid: 4242,
        started: 1,
        checkpoint: None,
        note: None,
    };
    a.update(Msg::RunList(vec![
        view("/abs/other", RunState::Finished),
        view("/abs/saves/qwen", RunState::Running),
    ]));
    assert!(matches!(a.overlay, Overlay::Runs { .. }));
    a.update(code(KeyCode::Down));
    assert_eq!(
        a.update(code(KeyCode::Enter)),
        vec![Effect::OpenRunFolder(PathBuf::from("/abs/saves/qwen"))]
    );
    // The history from trainer_log.jsonl first, then the replayed last step (shown once), then live.
    a.update(Msg::RunAttached {
        output_dir: PathBuf::from("/abs/saves/qwen"),
        record: Box::new(record(RunState::Paused, 4242)),
        history: vec![logged(1, 2.0), logged(2, 1.8), logged(3, 1.7)],
    });
    assert_eq!(a.tab, Tab::Run);
    assert_eq!(a.run.phase, Phase::Paused);
    assert_eq!(a.device, "cuda:0");
    assert_eq!(a.run.run_pid, Some(4242));
    assert_eq!(a.run.total_steps, 40);
    let mut m = termtune::trainer::protocol::StepMetrics {
        step: 3,
        total_steps: 40,
        epoch: 0.1,
        loss: 1.7,
        lr: 1e-4,
        grad_norm: 1.0,
        tokens: 10,
        label_tokens: 5,
        tokens_seen: 30,
        step_time: std::time::Duration::from_millis(10),
        elapsed: std::time::Duration::from_secs(1),
        eta: std::time::Duration::from_secs(1),
        tokens_per_sec: 100.0,
        samples_per_sec: 1.0,
        metrics: Default::default(),
    };
    a.update(Msg::Engine(TrainEvent::StepFinished(m.clone())));
    m.step = 4;
    m.loss = 1.6;
    a.update(Msg::Engine(TrainEvent::Resumed));
    a.update(Msg::Engine(TrainEvent::StepFinished(m)));
    let steps: Vec<u64> = a.run.points.iter().map(|p| p.step).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert_eq!(a.run.phase, Phase::Running);
    // x stops it with a checkpoint through the socket; the run's last word says "stopped".
    a.update(key('x'));
    assert_eq!(
        a.update(key('y')),
        vec![Effect::Engine(TrainCommand::Stop { save: true })]
    );
    a.update(Msg::RunFinal(Box::new(RunView {
        note: Some("stopped at step 4, resumable from checkpoint-4".into()),
        ..view("/abs/saves/qwen", RunState::Stopped)
    })));
    assert!(a.update(Msg::EngineExited).is_empty());
    assert_eq!(a.run.phase, Phase::Stopped);
    assert!(
        a.run
            .log
            .iter()
            .any(|l| l.contains("resumable from checkpoint-4"))
    );
}

#[test]
fn a_followed_run_whose_process_died_is_a_failure_that_says_so() {
    let mut a = app();
    a.update(Msg::RunAttached {
        output_dir: PathBuf::from("/abs/saves/qwen"),
        record: Box::new(record(RunState::Running, 4242)),
        history: Vec::new(),
    });
    a.update(Msg::RunFinal(Box::new(RunView {
        output_dir: PathBuf::from("/abs/saves/qwen"),
        state: RunState::Died,
        step: 9,
        total_steps: Some(40),
        loss: None,
        tokens_per_sec: None,
        device: None,
        pid: 4242,
        started: 1,
        checkpoint: None,
        note: Some("died at step 9, resumable from checkpoint-5".into()),
    })));
    a.update(Msg::EngineExited);
    match &a.run.phase {
        Phase::Failed(m) => assert!(m.contains("died at step 9"), "{m}"),
        p => panic!("{p:?}"),
    }
}

// ---- The Chat pane: keys through the real keymap, chat worker commands as effects. ----

mod chat {
    use super::*;
    use termtune::app::chat::{ChatFocus, SlotStatus};
    use termtune::chat::targets::{ChatTarget, TargetEntry};
    use termtune::chat::worker::{AnswerStats, ChatCommand, ChatEvent, LoadedTarget};
    use termtune::engine::generate::StopReason;

    fn chat_app() -> App {
        let mut a = app();
        a.update(key('6'));
        assert_eq!(a.tab, Tab::Chat);
        a
    }

    fn type_text(a: &mut App, text: &str) {
        for c in text.chars() {
            a.update(key(c));
        }
    }

    fn base_loaded(slot: usize) -> Msg {
        Msg::Chat(ChatEvent::Loaded {
            slot,
            info: LoadedTarget {
                model: "m".into(),
                source: "folder".into(),
                template: "chatml".into(),
                adapter: None,
                run_model: None,
            },
        })
    }

    fn done(slot: usize) -> Msg {
        Msg::Chat(ChatEvent::Done {
            slot,
            stats: AnswerStats {
                tokens: 3,
                prompt_tokens: 9,
                cached_tokens: 0,
                tokens_per_s: 10.0,
                stop: StopReason::MaxTokens,
            },
        })
    }

    fn chat_cmds(fx: &[Effect]) -> Vec<&ChatCommand> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Chat(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn digits_pass_through_the_chat_tab_until_typing_starts() {
        let mut a = chat_app();
        a.update(key('7'));
        assert_eq!(a.tab, Tab::Export, "the pane opens outside the input");
        a.update(key('6'));
        a.update(key('i'));
        a.update(key('7'));
        assert_eq!(a.tab, Tab::Chat, "typing: 7 is text");
        assert_eq!(a.chat.input.lines(), ["7"]);
        a.update(code(KeyCode::Esc));
        assert_eq!(a.chat.focus, ChatFocus::Conversation);
        a.update(key('q'));
        assert_eq!(
            a.chat.input.lines(),
            ["7"],
            "q is not typed outside the input"
        );
    }

    #[test]
    fn send_while_nothing_is_loaded_loads_first_then_sends() {
        let mut a = chat_app();
        a.update(key('i'));
        type_text(&mut a, "hi");
        a.update(ctrl('j'));
        type_text(&mut a, "there");
        let fx = a.update(code(KeyCode::Enter));
        let cmds = chat_cmds(&fx);
        assert_eq!(cmds.len(), 2, "{fx:?}");
        match cmds[0] {
            ChatCommand::Load {
                slot: 0,
                preset,
                target: ChatTarget::Base,
            } => assert_eq!(
                preset.model_name_or_path,
                "HuggingFaceTB/SmolLM2-135M-Instruct"
            ),
            other => panic!("{other:?}"),
        }
        match cmds[1] {
            ChatCommand::Send {
                slot: 0,
                user,
                params,
                ..
            } => {
                assert_eq!(user, "hi\nthere", "Ctrl-j made a new line");
                // quickstart sets no generation keys: LLaMA-Factory's defaults.
                assert_eq!(params.max_new_tokens, 1024);
            }
            other => panic!("{other:?}"),
        }
        assert!(a.status.as_ref().unwrap().text.contains("loading"));
        assert!(
            a.chat.input.is_empty(),
            "the input is cleared after sending"
        );
        // A second Enter while answering is refused.
        type_text(&mut a, "again");
        assert!(chat_cmds(&a.update(code(KeyCode::Enter))).is_empty());
        assert!(a.status.as_ref().unwrap().error);
    }

    #[test]
    fn stop_sends_the_stop_command_from_the_input_and_outside_it() {
        let mut a = chat_app();
        a.update(base_loaded(0));
        a.update(key('i'));
        type_text(&mut a, "hello");
        let fx = a.update(code(KeyCode::Enter));
        assert_eq!(chat_cmds(&fx).len(), 1, "loaded already: just Send");
        assert_eq!(a.update(ctrl('x')), vec![Effect::Chat(ChatCommand::Stop)]);
        a.update(code(KeyCode::Esc));
        assert_eq!(a.update(key('x')), vec![Effect::Chat(ChatCommand::Stop)]);
        a.update(Msg::Chat(ChatEvent::Token {
            slot: 0,
            text: "partial".into(),
        }));
        a.update(done(0));
        assert!(!a.chat.generating());
        assert!(a.update(key('x')).is_empty(), "nothing to stop");
        assert_eq!(a.chat.slots[0].turns[0].answer, "partial");
    }

    #[test]
    fn regenerate_drops_the_last_answer_and_asks_again() {
        let mut a = chat_app();
        a.update(base_loaded(0));
        a.update(key('i'));
        type_text(&mut a, "q1");
        a.update(code(KeyCode::Enter));
        a.update(Msg::Chat(ChatEvent::Token {
            slot: 0,
            text: "a1".into(),
        }));
        a.update(done(0));
        a.update(code(KeyCode::Esc));
        let fx = a.update(key('r'));
        assert!(
            matches!(
                chat_cmds(&fx).as_slice(),
                [ChatCommand::Regenerate { slot: 0, .. }]
            ),
            "{fx:?}"
        );
        let t = &a.chat.slots[0].turns;
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].user.as_str(), t[0].answer.as_str()), ("q1", ""));
        assert!(t[0].streaming && a.chat.generating());
    }

    #[test]
    fn compare_loads_the_base_into_b_and_sends_to_both() {
        let mut a = chat_app();
        a.update(base_loaded(0));
        let fx = a.update(key('m'));
        assert!(
            matches!(
                chat_cmds(&fx).as_slice(),
                [ChatCommand::Load {
                    slot: 1,
                    target: ChatTarget::Base,
                    ..
                }]
            ),
            "{fx:?}"
        );
        a.update(base_loaded(1));
        a.update(key('i'));
        type_text(&mut a, "same prompt");
        let fx = a.update(code(KeyCode::Enter));
        let slots: Vec<usize> = chat_cmds(&fx)
            .iter()
            .map(|c| match c {
                ChatCommand::Send { slot, user, .. } => {
                    assert_eq!(user, "same prompt");
                    *slot
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots, [0, 1]);
    }

    #[test]
    fn the_wheel_scrolls_the_conversation() {
        use termtune::app::mouse::Target;
        let mut a = chat_app();
        a.update(Msg::Wheel {
            target: Target::Chat,
            down: false,
        });
        assert_eq!(a.chat.scroll, 3, "up: three lines back");
        a.update(Msg::Wheel {
            target: Target::Chat,
            down: true,
        });
        assert_eq!(a.chat.scroll, 0);
        // The pane's area is one target (no form field under the pointer).
        let target =
            termtune::ui::mouse::target_at(&a, ratatui::layout::Rect::new(0, 0, 80, 24), 10, 10);
        assert_eq!(target, Target::Chat);
    }

    #[test]
    fn a_pasted_newline_never_sends() {
        let mut a = chat_app();
        a.update(base_loaded(0));
        let fx = a.update(Msg::Paste("line one\r\nline two\n".into()));
        assert!(fx.is_empty());
        assert_eq!(a.chat.focus, ChatFocus::Input, "a paste starts typing");
        assert_eq!(a.chat.input.lines(), ["line one", "line two", ""]);
        // Into a one-line field, newlines become spaces.
        a.update(code(KeyCode::Esc));
        a.update(key('e'));
        a.update(Msg::Paste("be\nbrief".into()));
        a.update(code(KeyCode::Enter));
        assert_eq!(a.chat_system().as_deref(), Some("be brief"));
    }

    #[test]
    fn turning_compare_on_starts_both_conversations_afresh() {
        let mut a = chat_app();
        a.update(base_loaded(0));
        a.update(key('i'));
        type_text(&mut a, "q1");
        a.update(code(KeyCode::Enter));
        a.update(done(0));
        a.update(code(KeyCode::Esc));
        let fx = a.update(key('m'));
        assert!(
            matches!(
                chat_cmds(&fx).as_slice(),
                [ChatCommand::Clear, ChatCommand::Load { slot: 1, .. }]
            ),
            "{fx:?}"
        );
        assert!(a.chat.slots[0].turns.is_empty());
    }

    #[test]
    fn the_picker_loads_a_checkpoint_or_a_typed_folder() {
        let mut a = chat_app();
        let fx = a.update(key('o'));
        assert_eq!(
            fx,
            vec![Effect::ListChatTargets(PathBuf::from("saves/quickstart"))]
        );
        let ck = PathBuf::from("saves/quickstart/checkpoint-10");
        a.update(Msg::ChatTargets(vec![
            TargetEntry {
                label: "base".into(),
                target: ChatTarget::Base,
            },
            TargetEntry {
                label: "checkpoint-10".into(),
                target: ChatTarget::Adapter(ck.clone()),
            },
        ]));
        a.update(code(KeyCode::Down));
        let fx = a.update(code(KeyCode::Enter));
        assert!(
            matches!(chat_cmds(&fx).as_slice(), [ChatCommand::Load { slot: 0, target: ChatTarget::Adapter(p), .. }] if *p == ck),
            "{fx:?}"
        );
        assert!(matches!(a.chat.slots[0].status, SlotStatus::Loading(_)));
        // A bad folder: the worker's failure shows in the pane and the status bar, no panic.
        a.update(Msg::Chat(ChatEvent::Failed {
            slot: 0,
            message: "x: no such folder".into(),
        }));
        assert_eq!(
            a.chat.slots[0].status,
            SlotStatus::Failed("x: no such folder".into())
        );
        assert!(a.status.as_ref().unwrap().error);
        // After the list: type a run folder (listed in turn), or an adapter folder.
        a.update(key('o'));
        a.update(Msg::ChatTargets(vec![]));
        a.update(code(KeyCode::Down));
        a.update(code(KeyCode::Enter));
        type_text(&mut a, "saves/other-run");
        assert_eq!(
            a.update(code(KeyCode::Enter)),
            vec![Effect::ListChatTargets(PathBuf::from("saves/other-run"))]
        );
        a.update(Msg::ChatTargets(vec![]));
        a.update(code(KeyCode::Enter));
        type_text(&mut a, "my/adapter");
        let fx = a.update(code(KeyCode::Enter));
        assert!(
            matches!(chat_cmds(&fx).as_slice(), [ChatCommand::Load { target: ChatTarget::Adapter(p), .. }] if p.as_path() == std::path::Path::new("my/adapter")),
            "{fx:?}"
        );
    }

    #[test]
    fn copy_system_prompt_rendered_prompt_and_settings() {
        let mut a = chat_app();
        assert!(a.update(key('y')).is_empty(), "nothing to copy yet");
        a.update(base_loaded(0));
        a.update(key('e'));
        type_text(&mut a, "be brief");
        a.update(code(KeyCode::Enter));
        assert_eq!(a.chat_system().as_deref(), Some("be brief"));
        a.update(key('i'));
        type_text(&mut a, "hi");
        let fx = a.update(code(KeyCode::Enter));
        assert!(
            matches!(chat_cmds(&fx).as_slice(), [ChatCommand::Send { system: Some(s), .. }] if s == "be brief")
        );
        a.update(Msg::Chat(ChatEvent::Token {
            slot: 0,
            text: " hello!".into(),
        }));
        a.update(done(0));
        a.update(code(KeyCode::Esc));
        assert_eq!(
            a.update(key('y')),
            vec![Effect::CopyToClipboard("hello!".into())]
        );
        assert!(a.status.as_ref().unwrap().text.contains("OSC 52"));
        let fx = a.update(key('v'));
        assert!(matches!(
            chat_cmds(&fx).as_slice(),
            [ChatCommand::RenderPrompt { slot: 0, .. }]
        ));
        a.update(Msg::Chat(ChatEvent::Prompt {
            slot: 0,
            text: "<|im_start|>user\nhi<|im_end|>".into(),
        }));
        assert!(a.chat.prompt_view.is_some());
        a.update(code(KeyCode::Esc));
        assert!(a.chat.prompt_view.is_none());
        // g: the generation settings are the form's; an edit reaches the next Send.
        a.update(key('g'));
        for _ in 0..4 {
            a.update(code(KeyCode::Down));
        }
        assert_eq!(a.focused_key(), Some("max_new_tokens"));
        a.update(code(KeyCode::Enter));
        a.update(ctrl('u'));
        type_text(&mut a, "7");
        a.update(code(KeyCode::Enter));
        a.update(code(KeyCode::Esc));
        a.update(key('i'));
        type_text(&mut a, "next");
        let fx = a.update(code(KeyCode::Enter));
        assert!(
            matches!(chat_cmds(&fx).as_slice(), [ChatCommand::Send { params, .. }] if params.max_new_tokens == 7)
        );
        // n: a new conversation (stops the answer in progress first).
        let fx = a.update(code(KeyCode::Esc));
        assert!(fx.is_empty());
        assert_eq!(
            a.update(key('n')),
            vec![
                Effect::Chat(ChatCommand::Stop),
                Effect::Chat(ChatCommand::Clear)
            ]
        );
        assert!(a.chat.slots[0].turns.is_empty());
    }

    #[test]
    fn every_chat_key_is_listed_in_the_keymap() {
        use termtune::app::{Action, Context};
        let km = termtune::app::Keymap::default();
        for action in [
            Action::ChatSend,
            Action::ChatNewline,
            Action::ChatStop,
            Action::ChatRegenerate,
            Action::ChatClear,
            Action::ChatCopy,
            Action::ChatPrompt,
            Action::ChatCompare,
            Action::ChatPickTarget,
            Action::ChatPickCompare,
            Action::ChatAdapterPath,
            Action::ChatSystem,
            Action::ChatSettings,
            Action::ChatFocusInput,
            Action::ChatLeave,
        ] {
            assert!(
                km.bindings.iter().any(|b| b.action == action
                    && matches!(
                        b.context,
                        Context::Chat | Context::ChatInput | Context::ChatSettings
                    )),
                "{action:?} has no key"
            );
        }
        // Alt-Enter also adds a line (for terminals where Ctrl-j is taken).
        let alt_enter = KeyEvent::new(KeyCode::Enter, KeyModifiers::ALT);
        assert_eq!(
            km.resolve(&[Context::ChatInput], &alt_enter),
            Some(Action::ChatNewline)
        );
    }
}

/// The Method tab shows a preference key for the stages it applies to, and any key that is set whatever the stage.
#[test]
fn the_method_tab_shows_the_preference_keys_of_the_stage() {
    let mut a = app();
    a.update(key('3'));
    let keys = a.keys();
    assert!(
        !keys.contains(&"pref_beta") && !keys.contains(&"kto_chosen_weight"),
        "{keys:?}"
    );
    a.form.set("stage", "kto");
    let keys = a.keys();
    for k in [
        "pref_beta",
        "pref_ftx",
        "kto_chosen_weight",
        "kto_rejected_weight",
        "ref_model",
    ] {
        assert!(keys.contains(&k), "kto: {k} in {keys:?}");
    }
    assert!(
        !keys.contains(&"pref_loss") && !keys.contains(&"simpo_gamma"),
        "{keys:?}"
    );
    a.form.set("stage", "dpo");
    let keys = a.keys();
    assert!(
        keys.contains(&"pref_loss") && !keys.contains(&"kto_chosen_weight"),
        "{keys:?}"
    );
    // Back to sft with a preference key set: it stays in sight (with its problem, if any).
    a.form.set("simpo_gamma", "0.7");
    a.form.set("stage", "sft");
    let keys = a.keys();
    assert!(
        keys.contains(&"simpo_gamma") && !keys.contains(&"pref_beta"),
        "{keys:?}"
    );
    a.focus_key("simpo_gamma");
    assert_eq!(a.focused_key(), Some("simpo_gamma"));
}
