//! The TUI's state and its only mutator, [`App::update`]: `Msg` in, `Effect`s out, no I/O, no
//! clock. Rendering (`crate::ui`) reads `&App`.

pub mod chat;
pub mod evaluate;
pub mod export;
pub mod form;
pub mod keymap;
pub mod mouse;
pub mod msg;
pub mod run;

use std::path::PathBuf;

use crossterm::event::KeyEvent;
use ratatui_textarea::TextArea;

use crate::config::{ConfigIssue, Group};
use crate::data::stats::Preview;
use crate::trainer::protocol::TrainCommand;
pub use evaluate::{EvalPhase, EvalSort, EvalState, PredictMsg};
pub use export::{ExportPhase, ExportState};
pub use form::{Field, FieldKind, Form};
pub use keymap::{Action, Context, Keymap};
pub use mouse::Target;
pub use msg::{Effect, Msg};
pub use run::{Phase, RunState};

/// The tabs, in order (keys 1–8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tab {
    Model,
    Dataset,
    Method,
    Training,
    Run,
    Chat,
    Export,
    Evaluate,
}

impl Tab {
    pub const ALL: [Tab; 8] = [
        Tab::Model,
        Tab::Dataset,
        Tab::Method,
        Tab::Training,
        Tab::Run,
        Tab::Chat,
        Tab::Export,
        Tab::Evaluate,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Model => "Model",
            Tab::Dataset => "Dataset",
            Tab::Method => "LoRA / Method",
            Tab::Training => "Training",
            Tab::Run => "Run",
            Tab::Chat => "Chat",
            Tab::Export => "Export",
            Tab::Evaluate => "Evaluate",
        }
    }

    /// The title on a narrow tab line.
    pub fn short_title(self) -> &'static str {
        match self {
            Tab::Method => "Method",
            other => other.title(),
        }
    }

    pub fn index(self) -> usize {
        Tab::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }

    /// The preset groups a form tab edits (none for the Run dashboard).
    pub fn groups(self) -> &'static [Group] {
        match self {
            Tab::Model => &[Group::Model],
            Tab::Dataset => &[Group::Dataset],
            Tab::Method => &[Group::Method],
            Tab::Training => &[Group::Output, Group::Train, Group::Eval],
            Tab::Run => &[],
            Tab::Chat => &[Group::Generation],
            Tab::Export => &[Group::Export],
            Tab::Evaluate => &[],
        }
    }

    /// The keys the tab's form shows.
    pub fn keys(self) -> Vec<&'static str> {
        let mut keys = form::keys_of(self.groups());
        if self == Tab::Chat {
            // The sampling seed is the preset's `seed` (as `termtune chat --seed` sets it).
            keys.push("seed");
        }
        if self == Tab::Evaluate {
            // LLaMA-Factory's Evaluate & Predict tab: the data, the batch, the generation keys, and the
            // adapter being evaluated (also on the Model tab).
            keys.extend(EVALUATE_KEYS);
        }
        keys
    }

    /// The tab whose form holds `key`.
    pub fn of_key(key: &str) -> Option<Tab> {
        Tab::ALL.into_iter().find(|t| t.keys().contains(&key))
    }
}

/// The keys the Evaluate pane's form shows.
pub const EVALUATE_KEYS: [&str; 8] = [
    "eval_dataset",
    "max_samples",
    "per_device_eval_batch_size",
    "adapter_name_or_path",
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
];

/// A question the user must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// Quit while a run is active: save a checkpoint first?
    QuitDuringRun,
    /// Stop the run: save a checkpoint?
    StopRun,
    /// Quit with unsaved preset edits.
    DiscardChanges,
    /// Write the export (the dialog names the folder: [`App::export_question`]).
    StartExport,
    /// Quit while an export is writing: cancel it?
    QuitDuringExport,
}

impl Question {
    pub fn text(self) -> &'static str {
        match self {
            Question::QuitDuringRun => {
                "A run is in progress in its own process. Stop the run, or leave it running? (y: stop it with a checkpoint and quit, n: leave it running and quit, Esc: stay)"
            }
            Question::StopRun => {
                "Stop the run. Save a checkpoint? (y: save and stop, n: stop without saving, Esc: keep training)"
            }
            Question::DiscardChanges => {
                "The preset has unsaved edits. Quit anyway? (y: quit, n/Esc: stay; Ctrl-s saves)"
            }
            Question::StartExport => "Write the export? (y: export, n/Esc: cancel)",
            Question::QuitDuringExport => {
                "An export is being written. Cancel it and quit? Nothing partial is kept. (y: cancel and quit, n/Esc: keep exporting)"
            }
        }
    }
}

/// What covers the panes.
#[derive(Debug, Clone, PartialEq)]
pub enum Overlay {
    None,
    Help {
        scroll: usize,
    },
    Command,
    Picker {
        items: Vec<PathBuf>,
        selected: usize,
    },
    /// The runs of this machine to follow (`a` on the Run pane).
    Runs {
        items: Vec<crate::runs::RunView>,
        selected: usize,
    },
    Confirm(Question),
}

/// A text field being edited.
#[derive(Debug, Clone)]
pub struct Editing {
    pub key: &'static str,
    pub area: TextArea<'static>,
    /// The edit before editing began (restored on Esc).
    pub before: Option<String>,
    /// Editing the save-as path rather than a preset key.
    pub save_as: bool,
}

/// What the Model pane's memory estimate needs besides the preset: the model's shape, how its source holds the
/// weights, and the device a run would use (probed off the UI thread, as `cpu` or `cuda:N`: naming it starts no
/// CUDA context in the TUI's process, whose GPU memory the run would lose).
#[derive(Debug, Clone)]
pub struct MemoryBasis {
    pub config: crate::engine::ModelConfig,
    pub source_storage: crate::engine::memory::BaseStorage,
    pub device: String,
}

impl MemoryBasis {
    /// One line for an 80-column pane: the estimated peak of a training run of `p` and its parts, with the base's
    /// format (what `quantization_bit` buys shows here before a run starts).
    pub fn line(&self, p: &crate::config::Preset) -> Result<String, String> {
        let base = crate::resolve::base_storage_over(p, self.source_storage);
        let (dtype, est) = crate::resolve::memory_estimate(
            p,
            &self.config,
            self.device == "cpu",
            base,
            None,
            None,
        )?;
        let h = |b: u64| crate::fsutil::human_bytes(b);
        let held = match base {
            crate::engine::memory::BaseStorage::Bnb4(k, double) => {
                format!("{}{}", k.name(), if double { "+dq" } else { "" })
            }
            other => other
                .format_name()
                .unwrap_or_else(|| format!("{dtype:?}").to_lowercase()),
        };
        // A reference model (ref_model, assumed the base's size here, or a frozen copy) counts with the base.
        let reference = if est.reference > 0 {
            format!(" + ref {}", h(est.reference))
        } else {
            String::new()
        };
        Ok(format!(
            "memory ≈ {}: base {} {held}{reference} · train {} · activations {} ({})",
            h(est.total()),
            h(est.weights),
            h(est.trainable),
            h(est.activations + est.attention + est.logits),
            self.device,
        ))
    }
}

/// The Dataset pane's preview.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreviewState {
    pub index: usize,
    pub loading: bool,
    pub data: Option<Box<Preview>>,
    pub error: Option<String>,
    pub stats: Option<Result<Box<crate::data::stats::DatasetStats>, String>>,
}

/// A one-line message in the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// The whole UI state.
#[derive(Debug, Clone)]
pub struct App {
    pub tab: Tab,
    /// The focused field of each form tab.
    pub cursors: [usize; 8],
    /// The focused option of a checklist field.
    pub check_cursor: usize,
    pub form: Form,
    pub run: RunState,
    pub overlay: Overlay,
    pub editing: Option<Editing>,
    pub keymap: Keymap,
    pub theme_names: Vec<String>,
    pub theme_index: usize,
    pub status: Option<Status>,
    pub preview: PreviewState,
    /// The device the engine trains on, for the status bar.
    pub device: String,
    /// Quit asked during a run: leave once the engine has exited.
    pub quitting: bool,
    /// What the model field resolved to: (name probed, description or problem).
    pub model_info: Option<(String, Result<String, String>)>,
    /// The probed model's memory basis (same name as `model_info`).
    pub memory_basis: Option<Box<MemoryBasis>>,
    /// The entries of `dataset_dir/dataset_info.json` (None until read).
    pub dataset_entries: Option<Result<Vec<String>, String>>,
    /// The log file, named in the error panel.
    pub log_path: Option<String>,
    /// The Chat pane.
    pub chat: chat::ChatState,
    /// The Export pane.
    pub export: ExportState,
    /// The Evaluate pane.
    pub eval: EvalState,
    /// Printed when termtune has restored the terminal (a run left running says where it is).
    pub farewell: Option<String>,
    dirty: bool,
}

impl App {
    /// The app on a preset (its file path and text).
    pub fn new(path: Option<PathBuf>, text: &str) -> Self {
        let mut app = Self {
            tab: Tab::Model,
            cursors: [0; 8],
            check_cursor: 0,
            form: Form::new(path, text),
            run: RunState::default(),
            overlay: Overlay::None,
            editing: None,
            keymap: Keymap::default(),
            theme_names: vec!["default".into()],
            theme_index: 0,
            status: None,
            preview: PreviewState::default(),
            device: "cpu".into(),
            quitting: false,
            log_path: None,
            dataset_entries: None,
            model_info: None,
            memory_basis: None,
            chat: chat::ChatState::default(),
            export: ExportState::default(),
            eval: EvalState::default(),
            farewell: None,
            dirty: true,
        };
        app.announce_problems();
        app
    }

    /// True once after any change: the loop redraws only then.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::replace(&mut self.dirty, false)
    }

    fn say(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: false,
        });
    }

    fn complain(&mut self, text: impl Into<String>) {
        self.status = Some(Status {
            text: text.into(),
            error: true,
        });
    }

    /// `what` is refused over the preset's problems: the first one's field gets the focus and the
    /// status bar names it (and how many more there are).
    fn refuse(&mut self, what: &str, issues: &[ConfigIssue]) {
        let Some(issue) = issues.first() else {
            return;
        };
        if !issue.key.is_empty() {
            self.focus_key(&issue.key);
        }
        let more = match issues.len() {
            0 | 1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        self.complain(format!("cannot {what}: {}{more}", issue.message));
    }

    fn announce_problems(&mut self) {
        let n = self.form.issues.len();
        if n > 0 {
            let first = self.form.issues[0].message.clone();
            self.complain(format!(
                "{n} problem{} in the preset; first: {first}",
                if n == 1 { "" } else { "s" }
            ));
        }
    }

    /// The keymap contexts in force, most specific first.
    pub fn contexts(&self) -> Vec<Context> {
        if self.editing.is_some() {
            return vec![Context::Editing];
        }
        match self.overlay {
            Overlay::Confirm(_) => return vec![Context::Confirm],
            Overlay::None => {}
            _ => return vec![Context::Overlay],
        }
        match self.tab {
            Tab::Chat => self.chat_contexts(),
            Tab::Run => vec![Context::Run, Context::Global],
            Tab::Dataset => vec![Context::Dataset, Context::Form, Context::Global],
            Tab::Export => vec![Context::Export, Context::Form, Context::Global],
            Tab::Evaluate => vec![Context::Evaluate, Context::Form, Context::Global],
            _ => vec![Context::Form, Context::Global],
        }
    }

    /// The keys of the current tab's form.
    pub fn keys(&self) -> Vec<&'static str> {
        self.keys_of(self.tab)
    }

    /// The keys `tab`'s form shows now: a preference key only for the stages it applies to, unless it is set (a
    /// value in the file or an edit stays in sight, with its problem if it has one).
    pub fn keys_of(&self, tab: Tab) -> Vec<&'static str> {
        let stage = self.form.value("stage");
        tab.keys()
            .into_iter()
            .filter(|k| {
                crate::config::keys::stages_of(k).is_none_or(|stages| {
                    stages.contains(&stage.as_str()) || !self.form.field(k).is_default
                })
            })
            .collect()
    }

    /// The focused field of the current tab.
    pub fn focused_key(&self) -> Option<&'static str> {
        let keys = self.keys();
        keys.get(self.cursors[self.tab.index()].min(keys.len().saturating_sub(1)))
            .copied()
    }

    /// Moves the focus to `key`: on the current tab when it shows the key, else on the tab that holds it.
    pub fn focus_key(&mut self, key: &str) {
        let here = self.keys().contains(&key).then_some(self.tab);
        if let Some(tab) = here.or_else(|| Tab::of_key(key)) {
            self.tab = tab;
            if let Some(i) = self.keys_of(tab).iter().position(|k| *k == key) {
                self.cursors[tab.index()] = i;
            }
        }
    }

    /// The one state transition.
    pub fn update(&mut self, msg: Msg) -> Vec<Effect> {
        if !matches!(msg, Msg::Tick) {
            self.dirty = true;
        }
        match msg {
            Msg::Key(key) => self.on_key(key),
            Msg::Resize => Vec::new(),
            Msg::Paste(text) => {
                self.paste(&text);
                Vec::new()
            }
            Msg::Tick => Vec::new(),
            Msg::Terminate => {
                // A run is its own process: losing the terminal never stops it.
                self.leave_run_running();
                if self.export.is_running() {
                    if self.export.quit_when_done {
                        return Vec::new();
                    }
                    return self.cancel_export_and_quit();
                }
                vec![Effect::Quit]
            }
            Msg::Engine(ev) => {
                self.on_engine_event(&ev);
                Vec::new()
            }
            Msg::EngineExited => self.on_engine_exited(),
            Msg::RunAttached {
                output_dir,
                record,
                history,
            } => {
                if let Some(d) = &record.device {
                    self.device = d.split(" (").next().unwrap_or(d).to_string();
                }
                self.run.attach(output_dir, &record, &history);
                self.tab = Tab::Run;
                self.status = None;
                Vec::new()
            }
            Msg::RunLog { dir, polled } => {
                if self.run.from_folder.as_ref() == Some(&dir) {
                    if polled.restarted {
                        self.run.load_folder(dir, &polled.lines);
                    } else {
                        self.run.add_log_lines(&polled.lines);
                    }
                }
                Vec::new()
            }
            Msg::RunFinal(view) => {
                if self.run.phase.is_active() {
                    self.status = None;
                }
                self.run.on_final(&view);
                Vec::new()
            }
            Msg::RunList(items) => {
                if items.is_empty() {
                    self.say("no runs yet: s starts one (it runs in its own process)");
                } else {
                    self.overlay = Overlay::Runs { items, selected: 0 };
                }
                Vec::new()
            }
            Msg::Telemetry(s) => {
                self.run.on_telemetry(&s);
                Vec::new()
            }
            Msg::PresetLoaded { path, text } => {
                self.form = Form::new(Some(path.clone()), &text);
                self.status = None;
                self.say(format!("preset {}", path.display()));
                self.announce_problems();
                self.initial_effects()
            }
            Msg::PresetFailed(e) => {
                self.complain(e);
                Vec::new()
            }
            Msg::PresetList(items) => {
                if items.is_empty() {
                    self.complain("no presets found in presets/ or the user presets folder");
                } else {
                    self.overlay = Overlay::Picker { items, selected: 0 };
                }
                Vec::new()
            }
            Msg::RunFolder(result) => {
                match result {
                    Ok((dir, lines)) => {
                        self.run.load_folder(dir, &lines);
                        self.tab = Tab::Run;
                        self.status = None;
                    }
                    Err(e) => self.complain(e),
                }
                Vec::new()
            }
            Msg::ModelInfo { name, info, memory } => {
                self.model_info = Some((name, info));
                self.memory_basis = memory;
                Vec::new()
            }
            Msg::Chat(ev) => {
                self.on_chat_event(ev);
                Vec::new()
            }
            Msg::ChatTargets(items) => {
                self.on_chat_targets(items);
                Vec::new()
            }
            Msg::DatasetStats(result) => {
                self.preview.stats = Some(result);
                Vec::new()
            }
            Msg::Datasets(result) => {
                self.dataset_entries = Some(result);
                Vec::new()
            }
            Msg::Export(ev) => self.on_export(ev),
            Msg::Predict(m) => {
                self.on_predict(m);
                Vec::new()
            }
            Msg::Click(target) => self.on_click(target),
            Msg::Wheel { target, down } => self.on_wheel(target, down),
            Msg::Preview(result) => {
                self.preview.loading = false;
                match result {
                    Ok(p) => {
                        self.preview.error = None;
                        self.preview.data = Some(p);
                    }
                    Err(e) => {
                        self.preview.error = Some(e);
                    }
                }
                Vec::new()
            }
        }
    }

    fn on_key(&mut self, key: KeyEvent) -> Vec<Effect> {
        let contexts = self.contexts();
        let action = self.keymap.resolve(&contexts, &key);
        if self.editing.is_some() {
            return match action {
                Some(Action::Confirm) => self.finish_edit(true),
                Some(Action::Cancel) => self.finish_edit(false),
                Some(Action::ClearField) => {
                    self.clear_field();
                    Vec::new()
                }
                _ => {
                    self.type_into_field(key);
                    Vec::new()
                }
            };
        }
        if let Some(effects) = self.chat_key(key, action) {
            return effects;
        }
        match action {
            Some(a) => self.act(a),
            None => Vec::new(),
        }
    }

    fn type_into_field(&mut self, key: KeyEvent) {
        let Some(ed) = self.editing.as_mut() else {
            return;
        };
        ed.area.input(crossterm::event::Event::Key(key));
        if !ed.save_as {
            let k = ed.key;
            let text = ed.area.lines().join("");
            self.form.set(k, &text);
        }
    }

    fn clear_field(&mut self) {
        let Some(ed) = self.editing.as_mut() else {
            return;
        };
        ed.area = TextArea::default();
        if !ed.save_as {
            let k = ed.key;
            self.form.set(k, "");
        }
    }

    fn finish_edit(&mut self, apply: bool) -> Vec<Effect> {
        let Some(ed) = self.editing.take() else {
            return Vec::new();
        };
        let text = ed.area.lines().join("");
        if ed.save_as {
            if apply && !text.trim().is_empty() {
                return self.save_to(PathBuf::from(text.trim()));
            }
            return Vec::new();
        }
        if apply {
            self.form.set(ed.key, &text);
            if ed.key == "dataset_dir" {
                return vec![self.list_datasets()];
            }
            if ed.key == "model_name_or_path" {
                return vec![self.probe_model()];
            }
            if let Some(issue) = self.form.issue(ed.key) {
                let m = issue.message.clone();
                self.complain(m);
            } else {
                self.status = None;
            }
            if matches!(ed.key, "model_revision" | "cache_dir") {
                // The probe reads the hub cache of this revision.
                return vec![self.probe_model()];
            }
        } else {
            match ed.before {
                Some(b) => self.form.set(ed.key, &b),
                None => self.form.reset(ed.key),
            }
        }
        Vec::new()
    }

    fn start_edit(&mut self, key: &'static str, save_as: bool, initial: &str) {
        let mut area = TextArea::new(vec![initial.to_string()]);
        area.move_cursor(ratatui_textarea::CursorMove::End);
        self.editing = Some(Editing {
            key,
            area,
            before: self.form.edits.get(key).cloned(),
            save_as,
        });
    }

    fn act(&mut self, action: Action) -> Vec<Effect> {
        let tab_before = self.tab;
        let mut effects = self.act_inner(action);
        if self.tab == Tab::Dataset && tab_before != Tab::Dataset {
            effects.push(self.list_datasets());
        }
        effects
    }

    /// The effects to run once at start: resolve the model, read the dataset registry.
    pub fn initial_effects(&self) -> Vec<Effect> {
        vec![self.probe_model(), self.list_datasets()]
    }

    fn probe_model(&self) -> Effect {
        Effect::ProbeModel(self.form.model_ref())
    }

    /// Asks for the dataset registry of the current `dataset_dir`.
    fn list_datasets(&self) -> Effect {
        let dir = self.form.value("dataset_dir");
        Effect::ListDatasets(PathBuf::from(if dir.is_empty() { "data" } else { &dir }))
    }

    fn act_inner(&mut self, action: Action) -> Vec<Effect> {
        match &self.overlay {
            Overlay::Confirm(q) => {
                let q = *q;
                self.overlay = Overlay::None;
                return self.answer(q, action);
            }
            Overlay::None => {}
            _ => return self.overlay_action(action),
        }
        // The panes first: each handles its own actions (the Chat pane only while shown; the
        // run's keys work on every tab) and passes on the rest.
        if let Some(effects) = self.chat_action(action) {
            return effects;
        }
        if let Some(effects) = self.evaluate_action(action) {
            return effects;
        }
        if let Some(effects) = self.export_action(action) {
            return effects;
        }
        if let Some(effects) = self.run_action(action) {
            return effects;
        }
        self.app_action(action)
    }

    /// Actions of the app as a whole: tabs, overlays, themes, presets, form fields, the preview.
    fn app_action(&mut self, action: Action) -> Vec<Effect> {
        match action {
            Action::Quit => self.quit(),
            Action::NextTab => {
                self.tab = Tab::ALL[(self.tab.index() + 1) % Tab::ALL.len()];
                Vec::new()
            }
            Action::PrevTab => {
                self.tab = Tab::ALL[(self.tab.index() + Tab::ALL.len() - 1) % Tab::ALL.len()];
                Vec::new()
            }
            Action::GoTab(i) => {
                if let Some(t) = Tab::ALL.get(i) {
                    self.tab = *t;
                }
                Vec::new()
            }
            Action::ToggleHelp => {
                self.overlay = Overlay::Help { scroll: 0 };
                Vec::new()
            }
            Action::ShowCommand => {
                self.overlay = Overlay::Command;
                Vec::new()
            }
            Action::CycleTheme => {
                self.theme_index = (self.theme_index + 1) % self.theme_names.len().max(1);
                let name = self
                    .theme_names
                    .get(self.theme_index)
                    .cloned()
                    .unwrap_or_default();
                self.say(format!("theme: {name}"));
                Vec::new()
            }
            Action::SavePreset => match self.form.path.clone() {
                Some(p) => self.save_to(p),
                None => {
                    self.start_edit("", true, "presets/my-preset.yaml");
                    Vec::new()
                }
            },
            Action::SavePresetAs => {
                let initial = self.form.path.as_ref().map_or_else(
                    || "presets/my-preset.yaml".into(),
                    |p| p.display().to_string(),
                );
                self.start_edit("", true, &initial);
                Vec::new()
            }
            Action::LoadPreset => vec![Effect::ListPresets],
            Action::LoadPreview => self.request_preview(self.preview.index, true),
            Action::PreviewNext => self.request_preview(self.preview.index + 1, false),
            Action::PreviewPrev => {
                self.request_preview(self.preview.index.saturating_sub(1), false)
            }
            Action::Up | Action::Down | Action::PageUp | Action::PageDown => {
                self.move_focus(action);
                Vec::new()
            }
            Action::Left | Action::Right | Action::Toggle | Action::Edit => {
                self.field_action(action);
                Vec::new()
            }
            Action::ResetField => {
                if let Some(k) = self.focused_key() {
                    self.form.reset(k);
                }
                Vec::new()
            }
            // Answers and field keys outside a dialog or an edit, and the panes' own actions
            // outside their pane, do nothing.
            _ => Vec::new(),
        }
    }

    fn overlay_action(&mut self, action: Action) -> Vec<Effect> {
        match (&mut self.overlay, action) {
            (_, Action::Cancel) => {
                self.overlay = Overlay::None;
                Vec::new()
            }
            (Overlay::Help { scroll }, Action::Down) => {
                *scroll += 1;
                Vec::new()
            }
            (Overlay::Help { scroll }, Action::Up) => {
                *scroll = scroll.saturating_sub(1);
                Vec::new()
            }
            (Overlay::Picker { items, selected }, Action::Down) => {
                *selected = (*selected + 1).min(items.len().saturating_sub(1));
                Vec::new()
            }
            (Overlay::Picker { selected, .. }, Action::Up) => {
                *selected = selected.saturating_sub(1);
                Vec::new()
            }
            (Overlay::Picker { items, selected }, Action::Confirm) => {
                let path = items.get(*selected).cloned();
                self.overlay = Overlay::None;
                path.map(Effect::LoadPreset).into_iter().collect()
            }
            (Overlay::Runs { items, selected }, Action::Down) => {
                *selected = (*selected + 1).min(items.len().saturating_sub(1));
                Vec::new()
            }
            (Overlay::Runs { selected, .. }, Action::Up) => {
                *selected = selected.saturating_sub(1);
                Vec::new()
            }
            (Overlay::Runs { items, selected }, Action::Confirm) => {
                let dir = items.get(*selected).map(|r| r.output_dir.clone());
                self.overlay = Overlay::None;
                dir.map(|d| self.attach_run(d)).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    fn answer(&mut self, q: Question, action: Action) -> Vec<Effect> {
        let yes = action == Action::Confirm;
        let no = action == Action::Deny;
        match q {
            Question::QuitDuringRun if yes => self.stop_run(true, true),
            Question::QuitDuringRun if no => {
                self.leave_run_running();
                vec![Effect::Quit]
            }
            Question::StopRun if yes || no => self.stop_run(yes, false),
            Question::DiscardChanges if yes => vec![Effect::Quit],
            Question::StartExport => self.answer_export(yes),
            Question::QuitDuringExport if yes => self.cancel_export_and_quit(),
            _ => Vec::new(),
        }
    }

    fn quit(&mut self) -> Vec<Effect> {
        if self.quitting {
            // Asked again while waiting for the engine: abandon the checkpoint.
            self.complain("quitting without waiting for a checkpoint…");
            return vec![Effect::Engine(TrainCommand::Stop { save: false })];
        }
        if let Some(effects) = self.quit_during_export() {
            return effects;
        }
        if self.run.phase.is_active() {
            self.overlay = Overlay::Confirm(Question::QuitDuringRun);
            Vec::new()
        } else if self.form.is_dirty() {
            self.overlay = Overlay::Confirm(Question::DiscardChanges);
            Vec::new()
        } else {
            vec![Effect::Quit]
        }
    }

    fn save_to(&mut self, path: PathBuf) -> Vec<Effect> {
        match self.form.loaded.clone() {
            Some(loaded) => vec![Effect::SavePreset {
                loaded: Box::new(loaded),
                path,
            }],
            None => {
                let first = self
                    .form
                    .issues
                    .first()
                    .map(|i| i.message.clone())
                    .unwrap_or_default();
                self.complain(format!("not saved: fix the preset first: {first}"));
                Vec::new()
            }
        }
    }

    fn request_preview(&mut self, index: usize, stats: bool) -> Vec<Effect> {
        if self.preview.loading {
            return Vec::new();
        }
        let Some(loaded) = self.form.loaded.as_ref() else {
            self.complain("the preview needs a preset without problems");
            return Vec::new();
        };
        self.preview.index = index;
        self.preview.loading = true;
        if stats {
            self.preview.stats = None;
        }
        vec![Effect::LoadPreview {
            preset: Box::new(loaded.preset.clone()),
            index,
            stats,
        }]
    }

    fn move_focus(&mut self, action: Action) {
        let n = self.keys().len();
        let c = &mut self.cursors[self.tab.index()];
        *c = match action {
            Action::Up => c.saturating_sub(1),
            Action::Down => (*c + 1).min(n.saturating_sub(1)),
            Action::PageUp => c.saturating_sub(10),
            Action::PageDown => (*c + 10).min(n.saturating_sub(1)),
            _ => *c,
        };
        self.check_cursor = 0;
    }

    fn field_action(&mut self, action: Action) {
        let Some(key) = self.focused_key() else {
            return;
        };
        let value = self.form.value(key);
        match (self.form.kind(key), action) {
            (FieldKind::Text | FieldKind::Number | FieldKind::Datasets, Action::Edit) => {
                self.start_edit(key, false, &value);
            }
            (FieldKind::Toggle, Action::Edit | Action::Toggle | Action::Left | Action::Right) => {
                let next = if value == "true" { "false" } else { "true" };
                self.form.set(key, next);
            }
            (FieldKind::Select(options), Action::Edit | Action::Toggle | Action::Right) => {
                self.form.set(key, &form::cycle(options, &value, false));
            }
            (FieldKind::Select(options), Action::Left) => {
                self.form.set(key, &form::cycle(options, &value, true));
            }
            (FieldKind::Checklist(_), Action::Left) => {
                self.check_cursor = self.check_cursor.saturating_sub(1);
            }
            (FieldKind::Checklist(options), Action::Right) => {
                self.check_cursor = (self.check_cursor + 1).min(options.len().saturating_sub(1));
            }
            (FieldKind::Checklist(options), Action::Edit | Action::Toggle) => {
                if let Some(item) = options.get(self.check_cursor) {
                    self.form.set(key, &form::toggle_item(&value, item));
                }
            }
            (FieldKind::Datasets, Action::Left) => {
                self.check_cursor = self.check_cursor.saturating_sub(1);
            }
            (FieldKind::Datasets, Action::Right) => {
                let n = self.entries().len();
                self.check_cursor = (self.check_cursor + 1).min(n.saturating_sub(1));
            }
            (FieldKind::Datasets, Action::Toggle) => {
                if let Some(name) = self.entries().get(self.check_cursor).cloned() {
                    self.form.set(key, &form::toggle_name(&value, &name));
                }
            }
            _ => {}
        }
    }

    /// The dataset registry's entry names (empty when not read or unreadable).
    pub fn entries(&self) -> Vec<String> {
        match &self.dataset_entries {
            Some(Ok(v)) => v.clone(),
            _ => Vec::new(),
        }
    }
}
