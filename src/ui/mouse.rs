//! Mouse hit testing: which [`Target`] is at a terminal cell. Pure, and built on the layout
//! functions the renderer itself uses (`screen_areas`, `tab_spans`, the panes' `areas`), so a
//! click lands on what is drawn there.

use ratatui::layout::{Position, Rect};

use super::{Theme, dataset, evaluate, export, form, screen_areas, tab_spans};
use crate::app::{App, Tab, Target};

/// What is drawn at (`column`, `row`) of a terminal of size `area`.
pub fn target_at(app: &App, area: Rect, column: u16, row: u16) -> Target {
    let Some([tabs, body, _, _]) = screen_areas(area) else {
        return Target::Other;
    };
    let at = Position::new(column, row);
    if tabs.contains(at) {
        return tab_at(app, tabs, column).map_or(Target::Other, Target::Tab);
    }
    if !body.contains(at) {
        return Target::Other;
    }
    match app.tab {
        // The dashboard has one scrollable thing: its event log.
        Tab::Run => Target::RunLog,
        Tab::Chat => Target::Chat,
        Tab::Export => {
            let a = export::areas(app, body);
            if a.log.contains(at) {
                Target::ExportLog
            } else {
                in_form(app, a.fields, a.form, at)
            }
        }
        Tab::Evaluate => {
            let a = evaluate::areas(app, body);
            in_form(app, a.fields, a.form, at)
        }
        Tab::Dataset => {
            let [left, right] = dataset::split(body);
            if right.contains(at) {
                return match app.focused_key() {
                    Some("dataset" | "eval_dataset") => Target::DatasetEntries,
                    _ => Target::Other,
                };
            }
            let a = form::areas(app, left);
            in_form(app, a.fields, a.list, at)
        }
        _ => {
            let a = form::areas(app, body);
            in_form(app, a.fields, a.list, at)
        }
    }
}

/// A field line of the list `fields` (inside the box `list`), else the form.
fn in_form(app: &App, fields: Rect, list: Rect, at: Position) -> Target {
    if fields.contains(at)
        && let Some(i) = form::field_at(app, fields, at.y)
    {
        return Target::Field(i);
    }
    if list.contains(at) {
        Target::Form
    } else {
        Target::Other
    }
}

/// The tab whose title covers `column` of the tab line.
fn tab_at(app: &App, line: Rect, column: u16) -> Option<Tab> {
    let theme = Theme::default();
    let mut x = line.x;
    for (span, tab) in tab_spans(app, line.width, &theme) {
        let w = u16::try_from(span.width()).unwrap_or(u16::MAX);
        if column >= x && column < x.saturating_add(w) {
            return tab;
        }
        x = x.saturating_add(w);
    }
    None
}
