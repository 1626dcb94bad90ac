//! The Chat pane's state and how keys and chat worker events change it (pure: commands for the
//! worker come out as [`Effect::Chat`]).
//!
//! Focus: the pane opens outside the input (so digits, Tab and `q` work as on every tab); `i` or
//! Enter starts typing. The message input takes every key but Enter (send), Ctrl-j / Alt-Enter
//! (new line), Ctrl-x (stop), Esc (leave the input), Tab, Ctrl-c. Outside the input, single keys
//! act on the conversation (see the keymap's `Chat` context); `g` moves to the generation settings.

use std::path::PathBuf;

use crossterm::event::KeyEvent;
use ratatui_textarea::TextArea;

use super::{Action, App, Context, Effect, Overlay, Tab};
use crate::chat::targets::{ChatTarget, TargetEntry};
use crate::chat::worker::{AnswerStats, ChatCommand, ChatEvent, LoadedTarget, SLOTS};
use crate::config::{Preset, Purpose};
use crate::engine::generate::GenerationParams;

/// Where the keyboard is inside the Chat pane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFocus {
    /// Typing a message.
    Input,
    /// Single keys act on the conversation (scroll, regenerate, copy, …).
    Conversation,
    /// The generation settings (the preset's generation keys, edited like any form).
    Settings,
}

/// A one-line field being typed in the Chat pane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEdit {
    System,
    AdapterPath {
        slot: usize,
    },
    /// Another run's `output_dir`, whose adapter and checkpoints the picker then lists.
    RunFolder {
        slot: usize,
    },
}

/// Rows the picker shows after the listed targets: type an adapter folder, type a run folder.
pub const PICKER_EXTRA_ROWS: [&str; 2] = [
    "other adapter or model folder… (type its path)",
    "another run's output_dir… (list its checkpoints)",
];

/// One question and its answer in a slot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Turn {
    pub user: String,
    pub answer: String,
    /// Set when the answer ended.
    pub stats: Option<AnswerStats>,
    pub error: Option<String>,
    pub streaming: bool,
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum SlotStatus {
    #[default]
    Empty,
    Loading(String),
    Ready(LoadedTarget),
    Failed(String),
}

/// One loaded model and its conversation (A; B in the compare view).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatSlot {
    pub status: SlotStatus,
    pub turns: Vec<Turn>,
    pub generating: bool,
}

/// The target picker.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPicker {
    pub slot: usize,
    /// Base, final adapter, checkpoints newest first; one more row after them types a path.
    pub items: Vec<TargetEntry>,
    pub selected: usize,
}

/// The Chat pane.
#[derive(Debug, Clone)]
pub struct ChatState {
    pub focus: ChatFocus,
    pub input: TextArea<'static>,
    /// The system prompt typed in the pane (empty: the preset's `default_system`).
    pub system: String,
    pub line_edit: Option<(LineEdit, TextArea<'static>)>,
    pub slots: [ChatSlot; SLOTS],
    /// Side by side (stacked at 80 columns): every message goes to A and B.
    pub compare: bool,
    /// Conversation lines scrolled up from the bottom (0 follows the answer).
    pub scroll: usize,
    /// The exact prompt text of slot A, when shown.
    pub prompt_view: Option<String>,
    pub prompt_scroll: usize,
    pub picker: Option<ChatPicker>,
    /// The slot a requested target list is for.
    pub picking: Option<usize>,
}

fn new_input() -> TextArea<'static> {
    let mut t = TextArea::default();
    t.set_placeholder_text("type a message");
    t.set_cursor_line_style(ratatui::style::Style::default());
    t
}

impl Default for ChatState {
    fn default() -> Self {
        Self {
            // Not typing at first: digits, Tab and q keep working when passing through the tab.
            focus: ChatFocus::Conversation,
            input: new_input(),
            system: String::new(),
            line_edit: None,
            slots: Default::default(),
            compare: false,
            scroll: 0,
            prompt_view: None,
            prompt_scroll: 0,
            picker: None,
            picking: None,
        }
    }
}

impl ChatState {
    /// The slots a message goes to.
    pub fn active_slots(&self) -> Vec<usize> {
        if self.compare { vec![0, 1] } else { vec![0] }
    }

    pub fn generating(&self) -> bool {
        self.slots.iter().any(|s| s.generating)
    }

    /// The last answer of slot A with text in it.
    pub fn last_answer(&self) -> Option<&str> {
        self.slots[0]
            .turns
            .iter()
            .rev()
            .map(|t| t.answer.trim())
            .find(|a| !a.is_empty())
    }

    /// Applies a fact from the chat worker.
    pub fn on_event(&mut self, ev: ChatEvent) -> Option<String> {
        match ev {
            ChatEvent::Loading { slot, what } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.status = SlotStatus::Loading(what);
                }
                None
            }
            ChatEvent::Loaded { slot, info } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.status = SlotStatus::Ready(info);
                }
                None
            }
            ChatEvent::Token { slot, text } => {
                if let Some(t) = self.slots.get_mut(slot).and_then(|s| s.turns.last_mut()) {
                    t.answer.push_str(&text);
                }
                None
            }
            ChatEvent::Done { slot, stats } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    s.generating = false;
                    if let Some(t) = s.turns.last_mut() {
                        t.streaming = false;
                        t.stats = Some(stats);
                    }
                }
                None
            }
            ChatEvent::Prompt { slot: _, text } => {
                self.prompt_view = Some(text);
                self.prompt_scroll = 0;
                None
            }
            ChatEvent::Failed { slot, message } => {
                if let Some(s) = self.slots.get_mut(slot) {
                    if matches!(s.status, SlotStatus::Loading(_)) {
                        s.status = SlotStatus::Failed(message.clone());
                    } else if s.generating {
                        s.generating = false;
                        if let Some(t) = s.turns.last_mut() {
                            t.streaming = false;
                            t.error = Some(message.clone());
                        }
                    }
                }
                Some(message)
            }
        }
    }
}

/// The slot's letter in headers and messages.
pub fn slot_name(slot: usize) -> char {
    if slot == 0 { 'A' } else { 'B' }
}

impl App {
    /// A fact from the chat worker.
    pub(super) fn on_chat_event(&mut self, ev: ChatEvent) {
        let settled = matches!(ev, ChatEvent::Loaded { .. } | ChatEvent::Done { .. });
        if settled && self.status.as_ref().is_some_and(|s| !s.error) {
            // "loading…", "stopping…" are over.
            self.status = None;
        }
        if let Some(message) = self.chat.on_event(ev) {
            self.complain(message);
        }
    }

    /// The keymap contexts of the Chat pane (no dialog open, no form field being edited).
    pub(super) fn chat_contexts(&self) -> Vec<Context> {
        let c = &self.chat;
        if c.line_edit.is_some() {
            return vec![Context::Editing];
        }
        if c.picker.is_some() || c.prompt_view.is_some() {
            return vec![Context::Overlay];
        }
        match c.focus {
            ChatFocus::Input => vec![Context::ChatInput],
            ChatFocus::Conversation => vec![Context::Chat, Context::Global],
            ChatFocus::Settings => vec![Context::ChatSettings, Context::Form, Context::Global],
        }
    }

    /// Keys that type into the Chat pane's text fields; None lets the action run.
    pub(super) fn chat_key(
        &mut self,
        key: KeyEvent,
        action: Option<Action>,
    ) -> Option<Vec<Effect>> {
        if self.tab != Tab::Chat || self.overlay != Overlay::None {
            return None;
        }
        if let Some((kind, area)) = self.chat.line_edit.as_mut() {
            let kind = *kind;
            return Some(match action {
                Some(Action::Confirm) => {
                    let text = area.lines().join("");
                    self.chat.line_edit = None;
                    self.finish_line_edit(kind, text.trim())
                }
                Some(Action::Cancel) => {
                    self.chat.line_edit = None;
                    Vec::new()
                }
                Some(Action::ClearField) => {
                    *area = TextArea::default();
                    Vec::new()
                }
                _ => {
                    area.input(crossterm::event::Event::Key(key));
                    Vec::new()
                }
            });
        }
        if self.chat.focus == ChatFocus::Input
            && self.chat.picker.is_none()
            && self.chat.prompt_view.is_none()
            && action.is_none()
        {
            self.chat.input.input(crossterm::event::Event::Key(key));
            return Some(Vec::new());
        }
        None
    }

    /// Pasted text: into the form field or one-line field being edited (newlines become
    /// spaces), or into the chat message (newlines kept: a paste never sends).
    pub(super) fn paste(&mut self, text: &str) {
        let one_line = text.replace("\r\n", " ").replace(['\n', '\r'], " ");
        if let Some(ed) = self.editing.as_mut() {
            ed.area.insert_str(&one_line);
            if !ed.save_as {
                let (k, v) = (ed.key, ed.area.lines().join(""));
                self.form.set(k, &v);
            }
        } else if self.tab == Tab::Chat && self.overlay == Overlay::None {
            if let Some((_, area)) = self.chat.line_edit.as_mut() {
                area.insert_str(&one_line);
            } else if self.chat.picker.is_none() && self.chat.prompt_view.is_none() {
                self.chat.focus = ChatFocus::Input;
                self.chat
                    .input
                    .insert_str(text.replace("\r\n", "\n").replace('\r', "\n"));
            }
        }
    }

    fn finish_line_edit(&mut self, kind: LineEdit, text: &str) -> Vec<Effect> {
        match kind {
            LineEdit::System => {
                self.chat.system = text.to_string();
                self.say(if text.is_empty() {
                    "system prompt: the preset's default_system (or the template's)"
                } else {
                    "system prompt set for the next message"
                });
                Vec::new()
            }
            LineEdit::AdapterPath { slot } => {
                if text.is_empty() {
                    return Vec::new();
                }
                self.load_target(slot, ChatTarget::Adapter(PathBuf::from(text)))
            }
            LineEdit::RunFolder { slot } => {
                if text.is_empty() {
                    return Vec::new();
                }
                self.chat.picking = Some(slot);
                vec![Effect::ListChatTargets(PathBuf::from(text))]
            }
        }
    }

    /// The preset for chatting: the form's file and edits, validated for chat (a dataset is not
    /// needed). Complains and returns None when it has problems.
    fn chat_preset(&mut self) -> Option<Preset> {
        match self.form.check(Purpose::Chat) {
            Ok(l) => Some(l.preset),
            Err(issues) => {
                let first = issues.first().map_or(String::new(), |i| i.message.clone());
                self.complain(format!("cannot chat: {first}"));
                None
            }
        }
    }

    /// What the system prompt is for the next message.
    pub fn chat_system(&self) -> Option<String> {
        if self.chat.system.is_empty() {
            let v = self.form.value("default_system");
            (!v.is_empty()).then_some(v)
        } else {
            Some(self.chat.system.clone())
        }
    }

    /// Stops the answers in progress (the worker answers in order, so a new command would
    /// otherwise wait for them). `generating` stays set until the worker's `Done`/`Failed` for
    /// each stopped answer arrives: clearing it here let a stale `Done` close the next answer.
    fn stop_answers(&mut self) -> Option<Effect> {
        if !self.chat.generating() {
            return None;
        }
        for s in &mut self.chat.slots {
            if let Some(t) = s.turns.last_mut() {
                t.streaming = false;
            }
        }
        Some(Effect::Chat(ChatCommand::Stop))
    }

    fn load_target(&mut self, slot: usize, target: ChatTarget) -> Vec<Effect> {
        let Some(preset) = self.chat_preset() else {
            return Vec::new();
        };
        let mut effects: Vec<Effect> = self.stop_answers().into_iter().collect();
        let s = &mut self.chat.slots[slot];
        s.turns.clear();
        s.status = SlotStatus::Loading("loading…".into());
        self.chat.scroll = 0;
        effects.push(Effect::Chat(ChatCommand::Load {
            slot,
            preset: Box::new(preset),
            target,
        }));
        effects
    }

    /// Handles the actions of the Chat pane; None passes the action on (tabs, quit, the form).
    pub(super) fn chat_action(&mut self, action: Action) -> Option<Vec<Effect>> {
        if self.tab != Tab::Chat {
            return None;
        }
        if let Some(p) = self.chat.picker.as_mut() {
            let n = p.items.len() + PICKER_EXTRA_ROWS.len();
            match action {
                Action::Up => p.selected = p.selected.saturating_sub(1),
                Action::Down => p.selected = (p.selected + 1).min(n - 1),
                Action::Cancel => self.chat.picker = None,
                Action::Confirm => {
                    let (slot, selected) = (p.slot, p.selected);
                    let item = p.items.get(selected).cloned();
                    let typed_adapter = selected == p.items.len();
                    self.chat.picker = None;
                    return Some(match item {
                        Some(e) => self.load_target(slot, e.target),
                        None => {
                            let (kind, hint) = if typed_adapter {
                                (
                                    LineEdit::AdapterPath { slot },
                                    "an adapter folder (adapter_config.json + adapter_model.safetensors)",
                                )
                            } else {
                                (
                                    LineEdit::RunFolder { slot },
                                    "a run's output_dir (holding checkpoint-N folders)",
                                )
                            };
                            let mut area = TextArea::default();
                            area.set_placeholder_text(hint);
                            self.chat.line_edit = Some((kind, area));
                            Vec::new()
                        }
                    });
                }
                _ => {}
            }
            return Some(Vec::new());
        }
        if self.chat.prompt_view.is_some() {
            match action {
                Action::Up => self.chat.prompt_scroll = self.chat.prompt_scroll.saturating_sub(1),
                Action::Down => self.chat.prompt_scroll += 1,
                Action::Cancel | Action::Confirm => self.chat.prompt_view = None,
                _ => {}
            }
            return Some(Vec::new());
        }
        let effects = match action {
            Action::ChatSend => self.chat_send(),
            Action::ChatNewline => {
                self.chat.input.insert_newline();
                Vec::new()
            }
            Action::ChatFocusInput => {
                self.chat.focus = ChatFocus::Input;
                Vec::new()
            }
            Action::ChatLeave => {
                self.chat.focus = ChatFocus::Conversation;
                Vec::new()
            }
            Action::ChatSettings => {
                self.chat.focus = if self.chat.focus == ChatFocus::Settings {
                    ChatFocus::Conversation
                } else {
                    ChatFocus::Settings
                };
                Vec::new()
            }
            Action::ChatStop => {
                if self.chat.generating() {
                    self.say("stopping the answer…");
                    vec![Effect::Chat(ChatCommand::Stop)]
                } else {
                    self.say("no answer is being generated");
                    Vec::new()
                }
            }
            Action::ChatRegenerate => self.chat_regenerate(),
            Action::ChatClear => {
                let mut e: Vec<Effect> = self.stop_answers().into_iter().collect();
                for s in &mut self.chat.slots {
                    s.turns.clear();
                }
                self.chat.scroll = 0;
                self.say("new conversation (the models stay loaded)");
                e.push(Effect::Chat(ChatCommand::Clear));
                e
            }
            Action::ChatCopy => match self.chat.last_answer().map(String::from) {
                Some(text) => {
                    self.say("copied via OSC 52 (also over SSH; tmux: set -g set-clipboard on)");
                    vec![Effect::CopyToClipboard(text)]
                }
                None => {
                    self.say("no answer to copy yet");
                    Vec::new()
                }
            },
            Action::ChatPrompt => {
                if !matches!(self.chat.slots[0].status, SlotStatus::Ready(_)) {
                    self.complain("load a model first (o): the prompt is rendered by its template");
                    Vec::new()
                } else {
                    vec![Effect::Chat(ChatCommand::RenderPrompt {
                        slot: 0,
                        user: self.chat.input.lines().join("\n"),
                        system: self.chat_system(),
                    })]
                }
            }
            Action::ChatCompare => {
                self.chat.compare = !self.chat.compare;
                if self.chat.compare {
                    let mut effects = Vec::new();
                    if self.chat.slots.iter().any(|s| !s.turns.is_empty()) {
                        // The same prompt for both: start both conversations afresh.
                        effects.extend(self.stop_answers());
                        for s in &mut self.chat.slots {
                            s.turns.clear();
                        }
                        effects.push(Effect::Chat(ChatCommand::Clear));
                    }
                    self.say("compare (new chat): A and B answer each message in turn; b picks B");
                    if self.chat.slots[1].status == SlotStatus::Empty {
                        effects.extend(self.load_target(1, ChatTarget::Base));
                    }
                    return Some(effects);
                } else {
                    self.say("compare off: messages go to A only");
                }
                Vec::new()
            }
            Action::ChatPickTarget => self.request_targets(0),
            Action::ChatPickCompare => {
                self.chat.compare = true;
                self.request_targets(1)
            }
            Action::ChatAdapterPath => {
                let mut area = TextArea::default();
                area.set_placeholder_text(
                    "an adapter folder (adapter_config.json + adapter_model.safetensors)",
                );
                self.chat.line_edit = Some((LineEdit::AdapterPath { slot: 0 }, area));
                Vec::new()
            }
            Action::ChatSystem => {
                let mut area = TextArea::new(vec![self.chat.system.clone()]);
                area.move_cursor(ratatui_textarea::CursorMove::End);
                self.chat.line_edit = Some((LineEdit::System, area));
                Vec::new()
            }
            Action::Up | Action::Down | Action::PageUp | Action::PageDown
                if self.chat.focus == ChatFocus::Conversation =>
            {
                let s = &mut self.chat.scroll;
                *s = match action {
                    Action::Up => *s + 1,
                    Action::Down => s.saturating_sub(1),
                    Action::PageUp => *s + 10,
                    _ => s.saturating_sub(10),
                };
                Vec::new()
            }
            _ => return None,
        };
        Some(effects)
    }

    /// One mouse-wheel notch over the Chat pane.
    pub(super) fn chat_wheel(&mut self, down: bool) {
        let lines = super::mouse::WHEEL_LINES;
        let c = &mut self.chat;
        if let Some(p) = c.picker.as_mut() {
            let n = p.items.len() + PICKER_EXTRA_ROWS.len();
            p.selected = if down {
                (p.selected + 1).min(n - 1)
            } else {
                p.selected.saturating_sub(1)
            };
        } else if c.prompt_view.is_some() {
            c.prompt_scroll = if down {
                c.prompt_scroll + lines
            } else {
                c.prompt_scroll.saturating_sub(lines)
            };
        } else {
            // `scroll` counts lines up from the bottom.
            c.scroll = if down {
                c.scroll.saturating_sub(lines)
            } else {
                c.scroll + lines
            };
        }
    }

    fn request_targets(&mut self, slot: usize) -> Vec<Effect> {
        // The run folder the Run pane shows (opened, or a run followed), else the preset's.
        let dir = match &self.run.output_dir {
            Some(d) if self.run.from_folder.is_some() || self.run.run_pid.is_some() => d.clone(),
            _ => PathBuf::from(self.form.value("output_dir")),
        };
        self.chat.picking = Some(slot);
        vec![Effect::ListChatTargets(dir)]
    }

    /// The target list arrived: open the picker.
    pub(super) fn on_chat_targets(&mut self, items: Vec<TargetEntry>) {
        let slot = self.chat.picking.take().unwrap_or(0);
        self.chat.picker = Some(ChatPicker {
            slot,
            items,
            selected: 0,
        });
    }

    fn chat_send(&mut self) -> Vec<Effect> {
        let text = self.chat.input.lines().join("\n");
        if text.trim().is_empty() {
            self.say("type a message first");
            return Vec::new();
        }
        let Some((preset, params, system)) = self.answer_settings("Ctrl-x") else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        for slot in self.chat.active_slots() {
            let s = &mut self.chat.slots[slot];
            if matches!(s.status, SlotStatus::Empty | SlotStatus::Failed(_)) {
                // Nothing loaded: load the preset's adapter (or the base model) first.
                let adapters = preset.adapters();
                let target = match adapters.as_slice() {
                    [one] => ChatTarget::Adapter(PathBuf::from(one)),
                    _ => ChatTarget::Base,
                };
                s.status = SlotStatus::Loading("loading…".into());
                s.turns.clear();
                effects.push(Effect::Chat(ChatCommand::Load {
                    slot,
                    preset: Box::new(preset.clone()),
                    target,
                }));
                if adapters.len() > 1 {
                    // `termtune chat` merges them all; the pane loads one at a time.
                    self.say(format!(
                        "{}: the preset names {} adapters and the pane loads one: base model for now (o picks one)",
                        slot_name(slot),
                        adapters.len()
                    ));
                } else {
                    self.say(format!(
                        "{}: loading the preset's model first (o picks an adapter or checkpoint)",
                        slot_name(slot)
                    ));
                }
            }
            let s = &mut self.chat.slots[slot];
            s.turns.push(Turn {
                user: text.clone(),
                streaming: true,
                ..Turn::default()
            });
            s.generating = true;
            effects.push(Effect::Chat(ChatCommand::Send {
                slot,
                user: text.clone(),
                system: system.clone(),
                params: params.clone(),
            }));
        }
        self.chat.input = new_input();
        self.chat.scroll = 0;
        effects
    }

    /// What the next answer is generated with: the chat preset, its sampling settings and the
    /// system prompt. None, with the reason in the status bar, while an answer is still being
    /// generated (`stop_key` stops it) or the preset has problems.
    fn answer_settings(
        &mut self,
        stop_key: &str,
    ) -> Option<(Preset, GenerationParams, Option<String>)> {
        if self.chat.generating() {
            self.complain(format!(
                "an answer is still being generated: {stop_key} stops it"
            ));
            return None;
        }
        let preset = self.chat_preset()?;
        let params = crate::resolve::generation_params(&preset);
        Some((preset, params, self.chat_system()))
    }

    fn chat_regenerate(&mut self) -> Vec<Effect> {
        let Some((_, params, system)) = self.answer_settings("x") else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        for slot in self.chat.active_slots() {
            let s = &mut self.chat.slots[slot];
            if let Some(t) = s.turns.last_mut() {
                *t = Turn {
                    user: std::mem::take(&mut t.user),
                    streaming: true,
                    ..Turn::default()
                };
                s.generating = true;
                effects.push(Effect::Chat(ChatCommand::Regenerate {
                    slot,
                    system: system.clone(),
                    params: params.clone(),
                }));
            }
        }
        if effects.is_empty() {
            self.say("nothing to regenerate yet");
        }
        self.chat.scroll = 0;
        effects
    }
}
