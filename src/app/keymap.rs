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
];

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
    fn help_bar_lists_each_action_once() {
        let km = Keymap::default();
        let bar = km.bar(&[Context::Run, Context::Global]);
        let descs: Vec<&str> = bar.iter().map(|b| b.desc).collect();
        assert!(descs.contains(&"pause/resume"));
        assert_eq!(descs.iter().filter(|d| **d == "quit").count(), 1);
    }
}
