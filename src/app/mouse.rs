//! Mouse input as intents: the terminal loop maps a click or wheel position to a [`Target`] with
//! `ui::mouse::target_at` (the renderer's own layout functions), and `update` acts on the target.
//! Everything the mouse does has a key too.

use super::{Action, App, Effect, Overlay, Tab};

/// What is under the mouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A tab title in the tab line.
    Tab(Tab),
    /// Field `index` of the current tab's form.
    Field(usize),
    /// The current tab's form area outside a field line.
    Form,
    /// The Run dashboard's event log (or anywhere on the dashboard: the wheel scrolls the log).
    RunLog,
    /// The Export pane's progress and report.
    ExportLog,
    /// The Dataset pane's list of `dataset_info.json` entries (shown for a focused dataset field).
    DatasetEntries,
    /// The Chat pane (the wheel scrolls its conversation, or the open prompt view or picker).
    Chat,
    /// Anything else (status bar, help bar, borders).
    Other,
}

/// Lines one wheel notch scrolls.
pub const WHEEL_LINES: usize = 3;

impl App {
    /// A left click on `target`: switch tab or focus a field. Ignored while a dialog, an overlay
    /// or a text edit has the keyboard (they are answered with keys).
    pub(super) fn on_click(&mut self, target: Target) -> Vec<Effect> {
        if self.editing.is_some() || self.overlay != Overlay::None {
            return Vec::new();
        }
        match target {
            Target::Tab(tab) => self.act(Action::GoTab(tab.index())),
            Target::Field(i) => {
                let n = self.keys().len();
                if i < n {
                    self.cursors[self.tab.index()] = i;
                    self.check_cursor = 0;
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// One wheel notch over `target` (`down` towards newer lines / later fields).
    pub(super) fn on_wheel(&mut self, target: Target, down: bool) -> Vec<Effect> {
        if self.editing.is_some() {
            return Vec::new();
        }
        match &mut self.overlay {
            Overlay::Help { scroll } => {
                *scroll = if down {
                    *scroll + WHEEL_LINES
                } else {
                    scroll.saturating_sub(WHEEL_LINES)
                };
                return Vec::new();
            }
            Overlay::Picker { .. } | Overlay::Runs { .. } => {
                return self.overlay_action(if down { Action::Down } else { Action::Up });
            }
            Overlay::None => {}
            _ => return Vec::new(),
        }
        match target {
            Target::RunLog => {
                self.run.log_scroll = if down {
                    self.run.log_scroll.saturating_sub(WHEEL_LINES)
                } else {
                    self.run.log_scroll + WHEEL_LINES
                };
            }
            Target::ExportLog => self.scroll_export(!down, WHEEL_LINES),
            Target::Chat => self.chat_wheel(down),
            Target::DatasetEntries => {
                self.field_action(if down { Action::Right } else { Action::Left });
            }
            Target::Field(_) | Target::Form if self.tab != Tab::Run => {
                self.move_focus(if down { Action::Down } else { Action::Up });
            }
            _ => {}
        }
        Vec::new()
    }
}
