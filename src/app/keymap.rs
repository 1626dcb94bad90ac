//! Key bindings as data: every binding has a context, a key, an [`Action`] and a description, so
//! the help bar and the `?` overlay are generated from the same table that `resolve` reads.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key asks the app to do (an intent; `update` decides what it means in the current state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Quit,
    NextTab,
    PrevTab,
    GoTab(usize),
    ToggleHelp,
    StartRun,
    PauseResume,
    StopRun,
    SavePreset,
    SavePresetAs,
    LoadPreset,
    ShowCommand,
    CycleTheme,
    Up,
    Down,
    PageUp,
    PageDown,
    Left,
    Right,
    Edit,
    Toggle,
    ResetField,
    ClearField,
    ToggleLogScale,
    OpenRunFolder,
    /// List the runs of this machine to follow one (the Run pane).
    PickRun,
    PreviewNext,
    PreviewPrev,
    LoadPreview,
    Confirm,
    Deny,
    Cancel,
    // The Chat pane.
    ChatSend,
    ChatNewline,
    ChatFocusInput,
    ChatLeave,
    ChatSettings,
    ChatStop,
    ChatRegenerate,
    ChatClear,
    ChatCopy,
    ChatPrompt,
    ChatCompare,
    ChatPickTarget,
    ChatPickCompare,
    ChatAdapterPath,
    ChatSystem,
    /// Export the current form (asks to confirm the target folder first).
    StartExport,
    /// Cancel the running export (without one: stop the run, like `StopRun`).
    CancelExport,
    /// Switch the export between a merged model and the adapter alone.
    ToggleExportMode,
    /// Point `adapter_name_or_path` at the run's latest saved checkpoint.
    UseLatestCheckpoint,
    /// Scroll a pane's log (the export log) up / down.
    ScrollUp,
    ScrollDown,
    /// The Evaluate pane: predict on the evaluation data, cancel it, sort the examples, move between them.
    StartPredict,
    CancelPredict,
    CycleEvalSort,
    NextExample,
    PrevExample,
}

/// Where the keyboard is: decides which bindings apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// Applies everywhere except while a text field is being edited or a dialog is open.
    Global,
    /// A form pane (Model, Dataset, Method, Training, Chat, Export).
    Form,
    /// The Dataset pane (in addition to its form).
    Dataset,
    /// The Run dashboard.
    Run,
    /// The Export pane (in addition to its form).
    Export,
    /// The Evaluate pane (in addition to its form).
    Evaluate,
    /// A text field is being edited: only these keys are taken, the rest go to the field.
    Editing,
    /// A yes/no/cancel question.
    Confirm,
    /// A list or text overlay (help, preset picker, command).
    Overlay,
    /// The Chat pane outside its message input.
    Chat,
    /// Typing a chat message: only these keys are taken, the rest type.
    ChatInput,
    /// The Chat pane's generation settings (in addition to the form keys).
    ChatSettings,
}

/// One binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub context: Context,
    pub code: KeyCode,
    pub modifiers: KeyModifiers,
    pub action: Action,
    /// Short label for the help bar and overlay ("start", "save preset").
    pub desc: &'static str,
    /// Shown in the one-line help bar (the overlay lists every binding).
    pub in_bar: bool,
}

const fn b(
    context: Context,
    code: KeyCode,
    modifiers: KeyModifiers,
    action: Action,
    desc: &'static str,
    in_bar: bool,
) -> Binding {
    Binding {
        context,
        code,
        modifiers,
        action,
        desc,
        in_bar,
    }
}

const NONE: KeyModifiers = KeyModifiers::NONE;
const CTRL: KeyModifiers = KeyModifiers::CONTROL;
const SHIFT: KeyModifiers = KeyModifiers::SHIFT;
const ALT: KeyModifiers = KeyModifiers::ALT;

use Action as A;
use Context as C;
use KeyCode as K;

/// The default bindings, in the order the help shows them.
pub const DEFAULT_BINDINGS: &[Binding] = &[
    // Dialogs and overlays first: they shadow everything else.
    b(C::Confirm, K::Char('y'), NONE, A::Confirm, "yes", true),
    b(C::Confirm, K::Char('n'), NONE, A::Deny, "no", true),
    b(C::Confirm, K::Esc, NONE, A::Cancel, "cancel", true),
    b(C::Overlay, K::Esc, NONE, A::Cancel, "close", true),
    b(C::Overlay, K::Char('q'), NONE, A::Cancel, "close", false),
    b(C::Overlay, K::Char('?'), NONE, A::Cancel, "close", false),
    b(C::Overlay, K::Up, NONE, A::Up, "up", true),
    b(C::Overlay, K::Down, NONE, A::Down, "down", true),
    b(C::Overlay, K::Char('k'), NONE, A::Up, "up", false),
    b(C::Overlay, K::Char('j'), NONE, A::Down, "down", false),
    b(C::Overlay, K::Enter, NONE, A::Confirm, "choose", true),
    b(C::Editing, K::Enter, NONE, A::Confirm, "apply", true),
    b(C::Editing, K::Esc, NONE, A::Cancel, "cancel edit", true),
    b(C::Editing, K::Char('u'), CTRL, A::ClearField, "clear", true),
    // Global.
    b(C::Global, K::Char('q'), NONE, A::Quit, "quit", true),
    b(C::Global, K::Char('c'), CTRL, A::Quit, "quit", false),
    b(C::Global, K::Tab, NONE, A::NextTab, "next tab", true),
    b(
        C::Global,
        K::BackTab,
        SHIFT,
        A::PrevTab,
        "previous tab",
        false,
    ),
    b(
        C::Global,
        K::Char('1'),
        NONE,
        A::GoTab(0),
        "Model tab",
        false,
    ),
    b(
        C::Global,
        K::Char('2'),
        NONE,
        A::GoTab(1),
        "Dataset tab",
        false,
    ),
    b(
        C::Global,
        K::Char('3'),
        NONE,
        A::GoTab(2),
        "LoRA / Method tab",
        false,
    ),
    b(
        C::Global,
        K::Char('4'),
        NONE,
        A::GoTab(3),
        "Training tab",
        false,
    ),
    b(C::Global, K::Char('5'), NONE, A::GoTab(4), "Run tab", false),
    b(
        C::Global,
        K::Char('6'),
        NONE,
        A::GoTab(5),
        "Chat tab",
        false,
    ),
    b(
        C::Global,
        K::Char('7'),
        NONE,
        A::GoTab(6),
        "Export tab",
        false,
    ),
    b(
        C::Global,
        K::Char('8'),
        NONE,
        A::GoTab(7),
        "Evaluate tab",
        false,
    ),
    b(C::Global, K::Char('s'), NONE, A::StartRun, "start", true),
    b(
        C::Global,
        K::Char('p'),
        NONE,
        A::PauseResume,
        "pause/resume",
        false,
    ),
    b(C::Global, K::Char('x'), NONE, A::StopRun, "stop", false),
    b(
        C::Global,
        K::Char('s'),
        CTRL,
        A::SavePreset,
        "save preset",
        true,
    ),
    b(
        C::Global,
        K::Char('a'),
        CTRL,
        A::SavePresetAs,
        "save preset as",
        false,
    ),
    b(
        C::Global,
        K::Char('o'),
        CTRL,
        A::LoadPreset,
        "load preset",
        false,
    ),
    b(
        C::Global,
        K::Char('c'),
        NONE,
        A::ShowCommand,
        "show as command",
        false,
    ),
    b(
        C::Global,
        K::Char('t'),
        NONE,
        A::CycleTheme,
        "next theme",
        false,
    ),
    b(
        C::Global,
        K::Char('?'),
        NONE,
        A::ToggleHelp,
        "all keys",
        true,
    ),
    // Forms.
    b(C::Form, K::Up, NONE, A::Up, "previous field", false),
    b(C::Form, K::Down, NONE, A::Down, "next field", false),
    b(C::Form, K::Char('k'), NONE, A::Up, "previous field", false),
    b(C::Form, K::Char('j'), NONE, A::Down, "next field", false),
    b(C::Form, K::PageUp, NONE, A::PageUp, "page up", false),
    b(C::Form, K::PageDown, NONE, A::PageDown, "page down", false),
    b(C::Form, K::Enter, NONE, A::Edit, "edit", true),
    b(
        C::Form,
        K::Char(' '),
        NONE,
        A::Toggle,
        "toggle/choose",
        false,
    ),
    b(C::Form, K::Left, NONE, A::Left, "previous option", false),
    b(C::Form, K::Right, NONE, A::Right, "next option", false),
    b(
        C::Form,
        K::Char('h'),
        NONE,
        A::Left,
        "previous option",
        false,
    ),
    b(C::Form, K::Char('l'), NONE, A::Right, "next option", false),
    b(
        C::Form,
        K::Delete,
        NONE,
        A::ResetField,
        "reset to file value",
        false,
    ),
    // Dataset preview.
    b(
        C::Dataset,
        K::Char('v'),
        NONE,
        A::LoadPreview,
        "preview",
        true,
    ),
    b(
        C::Dataset,
        K::Char(']'),
        NONE,
        A::PreviewNext,
        "next example",
        false,
    ),
    b(
        C::Dataset,
        K::Char('['),
        NONE,
        A::PreviewPrev,
        "previous example",
        false,
    ),
    // Run dashboard.
    b(
        C::Run,
        K::Char('p'),
        NONE,
        A::PauseResume,
        "pause/resume",
        true,
    ),
    b(C::Run, K::Char('x'), NONE, A::StopRun, "stop", true),
    b(
        C::Run,
        K::Char('g'),
        NONE,
        A::ToggleLogScale,
        "log scale",
        true,
    ),
    b(
        C::Run,
        K::Char('o'),
        NONE,
        A::OpenRunFolder,
        "open output_dir",
        true,
    ),
    b(C::Run, K::Char('a'), NONE, A::PickRun, "runs", true),
    b(C::Run, K::Up, NONE, A::Up, "scroll log", false),
    b(C::Run, K::Down, NONE, A::Down, "scroll log", false),
    // Chat: typing a message. Ctrl-j and Alt-Enter both reach termtune through tmux and SSH
    // (Shift-Enter does not: most terminals send it as a plain Enter).
    b(C::ChatInput, K::Enter, NONE, A::ChatSend, "send", true),
    b(
        C::ChatInput,
        K::Char('j'),
        CTRL,
        A::ChatNewline,
        "new line",
        true,
    ),
    b(
        C::ChatInput,
        K::Enter,
        ALT,
        A::ChatNewline,
        "new line",
        false,
    ),
    b(
        C::ChatInput,
        K::Char('x'),
        CTRL,
        A::ChatStop,
        "stop answer",
        true,
    ),
    b(
        C::ChatInput,
        K::Esc,
        NONE,
        A::ChatLeave,
        "leave input (keys)",
        true,
    ),
    b(C::ChatInput, K::Tab, NONE, A::NextTab, "next tab", false),
    b(
        C::ChatInput,
        K::BackTab,
        SHIFT,
        A::PrevTab,
        "previous tab",
        false,
    ),
    b(C::ChatInput, K::Char('c'), CTRL, A::Quit, "quit", false),
    // Chat: outside the input.
    b(C::Chat, K::Char('i'), NONE, A::ChatFocusInput, "type", true),
    b(C::Chat, K::Enter, NONE, A::ChatFocusInput, "type", false),
    b(C::Chat, K::Char('x'), NONE, A::ChatStop, "stop", true),
    b(
        C::Chat,
        K::Char('r'),
        NONE,
        A::ChatRegenerate,
        "regenerate",
        true,
    ),
    b(C::Chat, K::Char('n'), NONE, A::ChatClear, "new chat", true),
    b(C::Chat, K::Char('o'), NONE, A::ChatPickTarget, "load", true),
    b(
        C::Chat,
        K::Char('a'),
        NONE,
        A::ChatAdapterPath,
        "adapter path",
        false,
    ),
    b(C::Chat, K::Char('m'), NONE, A::ChatCompare, "compare", true),
    b(
        C::Chat,
        K::Char('b'),
        NONE,
        A::ChatPickCompare,
        "pick B (compare)",
        false,
    ),
    b(C::Chat, K::Char('y'), NONE, A::ChatCopy, "copy", true),
    b(
        C::Chat,
        K::Char('v'),
        NONE,
        A::ChatPrompt,
        "rendered prompt",
        false,
    ),
    b(
        C::Chat,
        K::Char('e'),
        NONE,
        A::ChatSystem,
        "system prompt",
        false,
    ),
    b(
        C::Chat,
        K::Char('g'),
        NONE,
        A::ChatSettings,
        "generation settings",
        false,
    ),
    b(C::Chat, K::Up, NONE, A::Up, "scroll up", false),
    b(C::Chat, K::Down, NONE, A::Down, "scroll down", false),
    b(C::Chat, K::Char('k'), NONE, A::Up, "scroll up", false),
    b(C::Chat, K::Char('j'), NONE, A::Down, "scroll down", false),
    b(C::Chat, K::PageUp, NONE, A::PageUp, "page up", false),
    b(C::Chat, K::PageDown, NONE, A::PageDown, "page down", false),
    // Chat: generation settings.
    b(
        C::ChatSettings,
        K::Esc,
        NONE,
        A::ChatSettings,
        "back to chat",
        true,
    ),
    b(
        C::ChatSettings,
        K::Char('g'),
        NONE,
        A::ChatSettings,
        "back to chat",
        false,
    ),
    // Export pane.
    b(
        C::Export,
        K::Char('e'),
        NONE,
        A::StartExport,
        "export",
        true,
    ),
    b(
        C::Export,
        K::Char('m'),
        NONE,
        A::ToggleExportMode,
        "merged/adapter",
        true,
    ),
    b(
        C::Export,
        K::Char('x'),
        NONE,
        A::CancelExport,
        "cancel export / stop run",
        false,
    ),
    b(
        C::Export,
        // Not `l`: on a form, `l` moves to the next option (vi keys), and this key edits a field.
        K::Char('L'),
        NONE,
        A::UseLatestCheckpoint,
        "use latest checkpoint",
        false,
    ),
    b(
        C::Export,
        K::PageUp,
        NONE,
        A::ScrollUp,
        "scroll log up",
        false,
    ),
    b(
        C::Export,
        K::PageDown,
        NONE,
        A::ScrollDown,
        "scroll log down",
        false,
    ),
    // Evaluate pane.
    b(
        C::Evaluate,
        K::Char('e'),
        NONE,
        A::StartPredict,
        "predict",
        true,
    ),
    b(
        C::Evaluate,
        K::Char('x'),
        NONE,
        A::CancelPredict,
        "cancel predict / stop run",
        false,
    ),
    b(
        C::Evaluate,
        K::Char('o'),
        NONE,
        A::CycleEvalSort,
        "sort examples",
        true,
    ),
    b(
        C::Evaluate,
        K::Char(']'),
        NONE,
        A::NextExample,
        "next example",
        true,
    ),
    b(
        C::Evaluate,
        K::Char('['),
        NONE,
        A::PrevExample,
        "previous example",
        false,
    ),
    b(
        C::Evaluate,
        K::Char('L'),
        NONE,
        A::UseLatestCheckpoint,
        "use latest checkpoint",
        false,
    ),
];

/// How much a help-bar hint matters when the bar is too narrow for all of them (higher stays
/// longer). Dialog answers and quit always fit; actions not listed weigh [`DEFAULT_PRIORITY`].
pub const BAR_PRIORITY: &[(Action, u8)] = &[
    (A::Confirm, 10),
    (A::Deny, 10),
    (A::Cancel, 10),
    (A::Quit, 9),
    (A::PauseResume, 8),
    (A::StopRun, 8),
    (A::StartExport, 8),
    (A::StartPredict, 8),
    (A::ChatSend, 8),
    (A::ChatLeave, 7),
    (A::ChatFocusInput, 7),
    (A::ChatStop, 7),
    (A::ChatNewline, 6),
    (A::ChatPickTarget, 6),
    (A::ChatCompare, 6),
    (A::ChatCopy, 6),
    (A::ChatRegenerate, 6),
    (A::StartRun, 7),
    (A::Edit, 7),
    (A::LoadPreview, 6),
    (A::ToggleExportMode, 6),
    (A::NextTab, 5),
    (A::SavePreset, 4),
    (A::ToggleLogScale, 4),
    (A::OpenRunFolder, 3),
    (A::PickRun, 3),
];

/// The weight of an action missing from [`BAR_PRIORITY`].
pub const DEFAULT_PRIORITY: u8 = 5;

/// The help bar's last hint when some were left out: `?` opens every key.
pub const MORE_LABEL: &str = "more";

/// The priority of `action` in the help bar.
pub fn bar_priority(action: Action) -> u8 {
    BAR_PRIORITY
        .iter()
        .find(|(a, _)| *a == action)
        .map_or(DEFAULT_PRIORITY, |(_, p)| *p)
}

/// Columns one hint takes in the help bar, drawn as `" {key}"` then `" {desc} "`.
pub fn hint_width(code: KeyCode, modifiers: KeyModifiers, desc: &str) -> usize {
    key_label(code, modifiers).chars().count() + desc.chars().count() + 3
}

/// The key table.
#[derive(Debug, Clone)]
pub struct Keymap {
    pub bindings: Vec<Binding>,
}

impl Default for Keymap {
    fn default() -> Self {
        Self {
            bindings: DEFAULT_BINDINGS.to_vec(),
        }
    }
}

/// Ignore SHIFT on characters (the character itself carries it: `?`, `S`).
fn normalise(key: &KeyEvent) -> (KeyCode, KeyModifiers) {
    let mut mods =
        key.modifiers & (KeyModifiers::CONTROL | KeyModifiers::ALT | KeyModifiers::SHIFT);
    if matches!(key.code, KeyCode::Char(_)) {
        mods.remove(KeyModifiers::SHIFT);
    }
    if key.code == KeyCode::BackTab {
        mods.insert(KeyModifiers::SHIFT);
    }
    (key.code, mods)
}

impl Keymap {
    /// The action of `key` in `contexts` (most specific first): the first matching binding wins.
    pub fn resolve(&self, contexts: &[Context], key: &KeyEvent) -> Option<Action> {
        let (code, mods) = normalise(key);
        contexts.iter().find_map(|ctx| {
            self.bindings
                .iter()
                .find(|b| b.context == *ctx && b.code == code && b.modifiers == mods)
                .map(|b| b.action)
        })
    }

    /// The bindings shown in the one-line help bar for `contexts`, one per action.
    pub fn bar(&self, contexts: &[Context]) -> Vec<&Binding> {
        let mut out: Vec<&Binding> = Vec::new();
        for ctx in contexts {
            for b in self
                .bindings
                .iter()
                .filter(|b| b.context == *ctx && b.in_bar)
            {
                if !out.iter().any(|o| o.action == b.action) {
                    out.push(b);
                }
            }
        }
        out
    }
}

/// The help bar for `contexts` in `width` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar<'a> {
    /// The hints shown, in keymap order.
    pub hints: Vec<&'a Binding>,
    /// Hints were left out: the bar ends with the `?` binding labelled [`MORE_LABEL`].
    pub more: Option<&'a Binding>,
}

impl Keymap {
    /// The help bar fitted to `width` columns: every hint when they fit; otherwise the
    /// highest-priority hints ([`bar_priority`], ties in keymap order) that fit next to a
    /// trailing "? more", shown in keymap order.
    pub fn fit_bar(&self, contexts: &[Context], width: usize) -> Bar<'_> {
        let all = self.bar(contexts);
        let total: usize = all
            .iter()
            .map(|b| hint_width(b.code, b.modifiers, b.desc))
            .sum();
        if total <= width {
            return Bar {
                hints: all,
                more: None,
            };
        }
        let more = all.iter().copied().find(|b| b.action == Action::ToggleHelp);
        let mut room =
            width.saturating_sub(more.map_or(0, |m| hint_width(m.code, m.modifiers, MORE_LABEL)));
        let candidates: Vec<(usize, &Binding)> = all
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, b)| b.action != Action::ToggleHelp)
            .collect();
        let mut by_priority = candidates.clone();
        by_priority.sort_by_key(|(i, b)| (std::cmp::Reverse(bar_priority(b.action)), *i));
        let mut keep = Vec::new();
        for (i, b) in by_priority {
            let w = hint_width(b.code, b.modifiers, b.desc);
            if w <= room {
                room -= w;
                keep.push(i);
            }
        }
        Bar {
            hints: candidates
                .into_iter()
                .filter(|(i, _)| keep.contains(i))
                .map(|(_, b)| b)
                .collect(),
            more,
        }
    }
}

/// How a key is written in help ("Ctrl-s", "Enter", "?").
pub fn key_label(code: KeyCode, modifiers: KeyModifiers) -> String {
    let base = match code {
        KeyCode::Char(' ') => "Space".to_string(),
        KeyCode::Char(c) => c.to_string(),
        KeyCode::Enter => "Enter".into(),
        KeyCode::Esc => "Esc".into(),
        KeyCode::Tab => "Tab".into(),
        KeyCode::BackTab => "Shift-Tab".into(),
        KeyCode::Up => "↑".into(),
        KeyCode::Down => "↓".into(),
        KeyCode::Left => "←".into(),
        KeyCode::Right => "→".into(),
        KeyCode::PageUp => "PgUp".into(),
        KeyCode::PageDown => "PgDn".into(),
        KeyCode::Delete => "Del".into(),
        other => format!("{other:?}"),
    };
    if modifiers.contains(KeyModifiers::CONTROL) {
        format!("Ctrl-{base}")
    } else if modifiers.contains(KeyModifiers::ALT) {
        format!("Alt-{base}")
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    #[test]
    fn most_specific_context_wins() {
        let km = Keymap::default();
        // `p` pauses on the Run pane and also globally; `x` likewise.
        assert_eq!(
            km.resolve(&[Context::Run, Context::Global], &key('p')),
            Some(Action::PauseResume)
        );
        // In a dialog, `n` is "no", never a global key.
        assert_eq!(
            km.resolve(&[Context::Confirm], &key('n')),
            Some(Action::Deny)
        );
        assert_eq!(km.resolve(&[Context::Confirm], &key('q')), None);
    }

    #[test]
    fn ctrl_c_quits_and_ctrl_s_saves() {
        let km = Keymap::default();
        let ctrl = |c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL);
        assert_eq!(
            km.resolve(&[Context::Global], &ctrl('c')),
            Some(Action::Quit)
        );
        assert_eq!(
            km.resolve(&[Context::Global], &ctrl('s')),
            Some(Action::SavePreset)
        );
        assert_eq!(
            km.resolve(&[Context::Global], &key('s')),
            Some(Action::StartRun)
        );
    }

    #[test]
    fn shifted_characters_match_their_character() {
        let km = Keymap::default();
        let q = KeyEvent::new(KeyCode::Char('?'), KeyModifiers::SHIFT);
        assert_eq!(km.resolve(&[Context::Global], &q), Some(Action::ToggleHelp));
        let back = KeyEvent::new(KeyCode::BackTab, KeyModifiers::NONE);
        assert_eq!(km.resolve(&[Context::Global], &back), Some(Action::PrevTab));
    }

    #[test]
    fn editing_takes_only_enter_and_esc() {
        let km = Keymap::default();
        assert_eq!(km.resolve(&[Context::Editing], &key('q')), None);
        assert_eq!(
            km.resolve(
                &[Context::Editing],
                &KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)
            ),
            Some(Action::Cancel)
        );
    }

    #[test]
    fn no_binding_is_shadowed_within_its_context() {
        let km = Keymap::default();
        for (i, a) in km.bindings.iter().enumerate() {
            for b2 in &km.bindings[..i] {
                assert!(
                    !(a.context == b2.context && a.code == b2.code && a.modifiers == b2.modifiers),
                    "{:?} {:?} bound twice",
                    a.context,
                    a.code
                );
            }
        }
    }

    #[test]
    fn a_narrow_help_bar_keeps_the_important_hints_and_ends_with_more() {
        let km = Keymap::default();
        let ctx = [Context::Run, Context::Global];
        let wide = km.fit_bar(&ctx, 500);
        assert!(wide.more.is_none());
        let bar = km.fit_bar(&ctx, 80);
        let used: usize = bar
            .hints
            .iter()
            .map(|b| hint_width(b.code, b.modifiers, b.desc))
            .sum::<usize>()
            + bar
                .more
                .map_or(0, |m| hint_width(m.code, m.modifiers, MORE_LABEL));
        assert!(used <= 80, "{used}");
        assert!(bar.more.is_some());
        let descs: Vec<&str> = bar.hints.iter().map(|b| b.desc).collect();
        for must in ["pause/resume", "stop", "quit"] {
            assert!(descs.contains(&must), "{descs:?}");
        }
        // Lower priority goes first: "open output_dir" (3) before "next tab" (5).
        assert!(!descs.contains(&"open output_dir"), "{descs:?}");
        // Keymap order is kept among the survivors.
        let pos = |d| descs.iter().position(|x| *x == d).unwrap();
        assert!(pos("pause/resume") < pos("quit"));
    }

    #[test]
    fn help_bar_lists_each_action_once() {
        let km = Keymap::default();
        let bar = km.bar(&[Context::Run, Context::Global]);
        let descs: Vec<&str> = bar.iter().map(|b| b.desc).collect();
        assert!(descs.contains(&"pause/resume"));
        assert_eq!(descs.iter().filter(|d| **d == "quit").count(), 1);
    }
}
