//! Mouse support without a terminal: `ui::mouse::target_at` maps a cell to what the renderer
//! draws there (the same layout functions), and `update` acts on clicks and wheel notches.

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;
use termtune::app::{App, Msg, Overlay, Tab, Target};
use termtune::export::job::ExportEvent;
use termtune::ui::mouse::target_at;

const QUICKSTART: &str = include_str!("../presets/quickstart.yaml");
const SCREEN: Rect = Rect::new(0, 0, 80, 24);

fn app() -> App {
    App::new(Some(PathBuf::from("presets/quickstart.yaml")), QUICKSTART)
}

fn key(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

#[test]
fn a_click_on_a_tab_title_selects_that_tab() {
    let mut a = app();
    // The 80-column tab line (tests/snapshots/…model_default_80x24.snap):
    // " 1 Model  2 Dataset  3 Method  4 Training  5 Run  6 Chat  7 Export  8 Evaluate "
    // Tab titles start at columns 0, 9, 20, 30, 42, 49, 57 and 67; 79 is empty.
    let expect = [
        (0, Tab::Model),
        (8, Tab::Model),
        (9, Tab::Dataset),
        (25, Tab::Method),
        (29, Tab::Method),
        (30, Tab::Training),
        (41, Tab::Training),
        (42, Tab::Run),
        (48, Tab::Run),
        (52, Tab::Chat),
        (60, Tab::Export),
        (66, Tab::Export),
        (67, Tab::Evaluate),
        (78, Tab::Evaluate),
    ];
    for (x, tab) in expect {
        assert_eq!(target_at(&a, SCREEN, x, 0), Target::Tab(tab), "column {x}");
    }
    assert_eq!(target_at(&a, SCREEN, 79, 0), Target::Other);
    a.update(Msg::Click(target_at(&a, SCREEN, 45, 0)));
    assert_eq!(a.tab, Tab::Run);
    // Switching to Dataset by mouse reads the registry like the key does.
    let fx = a.update(Msg::Click(target_at(&a, SCREEN, 12, 0)));
    assert_eq!(a.tab, Tab::Dataset);
    assert!(!fx.is_empty());
}

#[test]
fn a_click_on_a_field_focuses_it() {
    let mut a = app();
    a.update(key('4'));
    // Row 0 tabs, row 1 the box's top border, row 2 the first field.
    assert_eq!(target_at(&a, SCREEN, 10, 2), Target::Field(0));
    let t = target_at(&a, SCREEN, 10, 5);
    assert_eq!(t, Target::Field(3));
    a.update(Msg::Click(t));
    assert_eq!(a.focused_key(), Some(a.tab.keys()[3]));
    // The border is the form but no field; the status bar is nothing.
    assert_eq!(target_at(&a, SCREEN, 0, 5), Target::Form);
    assert_eq!(target_at(&a, SCREEN, 10, 22), Target::Other);
    // The Model tab has its resolved-model and memory lines above the box: two rows lower.
    let b = app();
    assert_eq!(target_at(&b, SCREEN, 10, 4), Target::Field(0));
}

#[test]
fn a_click_follows_the_scrolled_list_and_problem_lines() {
    let mut a = app();
    a.update(key('4'));
    let n = a.keys().len();
    for _ in 0..n {
        a.update(Msg::Key(KeyEvent::new(KeyCode::Down, KeyModifiers::NONE)));
    }
    // Scrolled so the last field shows; the click maps to what is drawn, the last visible line
    // before the footer being the focused last field's neighbourhood.
    let mut seen = Vec::new();
    for y in 2..18 {
        if let Target::Field(i) = target_at(&a, SCREEN, 10, y) {
            seen.push(i);
        }
    }
    assert!(seen.contains(&(n - 1)), "{seen:?}");
    assert!(!seen.contains(&0), "{seen:?}");
}

#[test]
fn clicks_are_ignored_while_a_dialog_or_edit_has_the_keyboard() {
    let mut a = app();
    a.update(key('?'));
    a.update(Msg::Click(Target::Tab(Tab::Run)));
    assert_eq!(a.tab, Tab::Model);
    a.update(Msg::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));
    a.update(Msg::Key(KeyEvent::new(KeyCode::Enter, KeyModifiers::NONE)));
    assert!(a.editing.is_some());
    a.update(Msg::Click(Target::Tab(Tab::Run)));
    assert_eq!(a.tab, Tab::Model);
}

#[test]
fn the_wheel_scrolls_help_forms_logs() {
    let mut a = app();
    // Help overlay.
    a.update(key('?'));
    a.update(Msg::Wheel {
        target: Target::Other,
        down: true,
    });
    assert_eq!(a.overlay, Overlay::Help { scroll: 3 });
    a.update(Msg::Wheel {
        target: Target::Other,
        down: false,
    });
    assert_eq!(a.overlay, Overlay::Help { scroll: 0 });
    a.update(Msg::Key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE)));

    // A form: the focus moves one field per notch.
    a.update(key('4'));
    let t = target_at(&a, SCREEN, 10, 6);
    a.update(Msg::Wheel {
        target: t,
        down: true,
    });
    a.update(Msg::Wheel {
        target: t,
        down: true,
    });
    assert_eq!(a.focused_key(), Some(a.tab.keys()[2]));
    a.update(Msg::Wheel {
        target: t,
        down: false,
    });
    assert_eq!(a.focused_key(), Some(a.tab.keys()[1]));

    // The Run dashboard: the wheel scrolls the event log.
    a.update(key('5'));
    let t = target_at(&a, SCREEN, 60, 18);
    assert_eq!(t, Target::RunLog);
    a.update(Msg::Wheel {
        target: t,
        down: false,
    });
    assert_eq!(a.run.log_scroll, 3);
    a.update(Msg::Wheel {
        target: t,
        down: true,
    });
    assert_eq!(a.run.log_scroll, 0);

    // The Export pane: over the progress box the wheel scrolls it, over the form it moves focus.
    a.update(key('7'));
    for i in 0..20 {
        a.update(Msg::Export(ExportEvent::Progress(format!("line {i}"))));
    }
    let log = target_at(&a, SCREEN, 40, 12);
    assert_eq!(log, Target::ExportLog);
    a.update(Msg::Wheel {
        target: log,
        down: false,
    });
    assert_eq!(a.export.scroll, 3);
    a.update(Msg::Wheel {
        target: log,
        down: true,
    });
    assert_eq!(a.export.scroll, 0);
    assert_eq!(target_at(&a, SCREEN, 10, 3), Target::Field(1));
}

#[test]
fn the_wheel_moves_through_the_dataset_entries() {
    let mut a = app();
    a.update(key('2'));
    a.update(Msg::Datasets(Ok(vec![
        "identity".into(),
        "demo_instructions".into(),
        "demo_chat".into(),
    ])));
    a.focus_key("dataset");
    // At 80×24 the entries list is the lower part of the Dataset pane.
    let t = target_at(&a, SCREEN, 20, 17);
    assert_eq!(t, Target::DatasetEntries);
    a.update(Msg::Wheel {
        target: t,
        down: true,
    });
    a.update(Msg::Wheel {
        target: t,
        down: true,
    });
    assert_eq!(a.check_cursor, 2);
    a.update(Msg::Wheel {
        target: t,
        down: false,
    });
    assert_eq!(a.check_cursor, 1);
}

#[test]
fn a_too_small_terminal_has_no_targets() {
    let a = app();
    assert_eq!(target_at(&a, Rect::new(0, 0, 60, 20), 5, 0), Target::Other);
}
