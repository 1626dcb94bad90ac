//! The Chat pane: what is loaded (always said), the conversation (A, or A and B side by side —
//! stacked below 120 columns — in the compare view), the system prompt, the message input, and
//! the generation settings (a side column at 120 columns and wider, or when focused with `g`).

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::{Theme, boxed, centered, clip};
use crate::app::App;
use crate::app::chat::{
    ChatFocus, ChatSlot, LineEdit, PICKER_EXTRA_ROWS, SlotStatus, Turn, slot_name,
};
use crate::app::run::Phase;
use crate::chat::worker::StopReason;

/// Width of the generation settings column.
const SETTINGS_WIDTH: u16 = 46;

/// Renders the Chat pane in `area`.
pub(super) fn render(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let c = &app.chat;
    let wide = area.width >= 120;
    let main = if c.focus == ChatFocus::Settings || wide {
        let [main, side] =
            Layout::horizontal([Constraint::Min(30), Constraint::Length(SETTINGS_WIDTH)])
                .areas(area);
        render_settings(frame, side, app, theme);
        main
    } else {
        area
    };
    let warning = run_warning(app);
    let input_rows = u16::try_from(c.input.lines().len().clamp(1, 4)).unwrap_or(1) + 2;
    let [warn_area, convo, system, input] = Layout::vertical([
        Constraint::Length(u16::from(warning.is_some())),
        Constraint::Min(4),
        Constraint::Length(1),
        Constraint::Length(input_rows),
    ])
    .areas(main);
    if let Some(w) = warning {
        frame.render_widget(Paragraph::new(w), warn_area);
    }
    if c.compare {
        let [a, b] = if wide {
            Layout::horizontal([Constraint::Percentage(50); 2]).areas(convo)
        } else {
            Layout::vertical([Constraint::Percentage(50); 2]).areas(convo)
        };
        render_slot(frame, a, app, 0, theme);
        render_slot(frame, b, app, 1, theme);
    } else {
        render_slot(frame, convo, app, 0, theme);
    }
    render_system(frame, system, app, theme);
    render_input(frame, input, app, theme);
    render_popups(frame, convo, app, theme);
}

/// The line about a run sharing the machine, when one is active.
fn run_warning(app: &App) -> Option<Line<'static>> {
    let text = match app.run.phase {
        Phase::Paused => {
            "the run is paused: answers get the whole machine (p resumes the run)".to_string()
        }
        _ if app.run.phase.is_active() && app.device == "cpu" => {
            "a run is training: chat and run share the CPU, both slower · p pauses the run"
                .to_string()
        }
        _ if app.run.phase.is_active() => format!(
            "a run is training on {}: the chat holds its own copy of the model · p pauses the run",
            app.device
        ),
        _ => return None,
    };
    Some(Line::raw(format!("⚠ {text}")))
        .map(|l| l.style(Style::default().add_modifier(ratatui::style::Modifier::BOLD)))
}

/// The header lines of a slot: what is loaded, always.
/// The slot's header, clipped to `width` columns, in the status colour (muted details).
fn header(
    slot: usize,
    s: &ChatSlot,
    theme: &Theme,
    two_lines: bool,
    width: usize,
) -> Vec<Line<'static>> {
    let name = slot_name(slot);
    let (first, second, style) = match &s.status {
        SlotStatus::Empty => (
            format!("{name} ▸ nothing loaded yet"),
            "Enter loads the preset's model (its adapter if it names one) · o picks".to_string(),
            theme.muted,
        ),
        SlotStatus::Loading(what) => (format!("{name} ▸ loading"), what.clone(), theme.warning),
        SlotStatus::Failed(why) => (format!("{name} ▸ cannot load"), why.clone(), theme.danger),
        SlotStatus::Ready(info) => {
            let model = format!(
                "{} ({}) · template {}",
                info.model, info.source, info.template
            );
            match (&info.adapter, &info.run_model) {
                (None, Some(run)) => {
                    let step = run
                        .step
                        .map_or_else(String::new, |s| format!("step {s} · "));
                    (
                        format!("{name} ▸ trained model {}", run.path.display()),
                        format!("{step}{model}"),
                        theme.ok,
                    )
                }
                (None, None) => (
                    format!("{name} ▸ base model, no adapter"),
                    model,
                    theme.field_value,
                ),
                (Some(a), _) => {
                    let step = a.step.map_or_else(String::new, |s| format!("step {s} · "));
                    (
                        format!("{name} ▸ adapter {}", a.path.display()),
                        format!(
                            "{step}r {} · alpha {} · {} · on {model}",
                            a.r,
                            crate::config::format_float(a.alpha),
                            a.targets
                        ),
                        theme.ok,
                    )
                }
            }
        }
    };
    if two_lines {
        vec![
            Line::styled(clip(&first, width), style),
            Line::styled(clip(&format!("  {second}"), width), theme.muted),
        ]
    } else {
        let first = clip(&first, width);
        let rest = width.saturating_sub(first.chars().count());
        vec![Line::from(vec![
            Span::styled(first, style),
            Span::styled(clip(&format!(" · {second}"), rest), theme.muted),
        ])]
    }
}

fn stop_label(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Stop(_) => "end of answer",
        StopReason::MaxTokens => "max_new_tokens reached",
        StopReason::Cancelled => "stopped",
    }
}

/// Greedy word wrap to `width` columns (characters); long words are cut.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut rows = Vec::new();
    for line in text.split('\n') {
        let mut row = String::new();
        let mut len = 0;
        for word in line.split_inclusive(' ') {
            let mut w: Vec<char> = word.chars().collect();
            while !w.is_empty() {
                let room = width - len;
                let trimmed = w.iter().rev().skip_while(|c| **c == ' ').count();
                if trimmed <= room || (len == 0 && w.len() <= room) {
                    let take = w.len().min(room);
                    row.extend(&w[..take]);
                    len += take;
                    w.drain(..take);
                    if !w.is_empty() && w.iter().all(|c| *c == ' ') {
                        w.clear();
                    }
                } else if len == 0 {
                    row.extend(&w[..room]);
                    w.drain(..room);
                    rows.push(std::mem::take(&mut row));
                    len = 0;
                } else {
                    rows.push(std::mem::take(&mut row).trim_end().to_string());
                    len = 0;
                }
            }
        }
        rows.push(row.trim_end().to_string());
    }
    rows
}

/// `prefix` + `text` wrapped, the prefix styled apart.
fn message_rows(
    prefix: &'static str,
    text: &str,
    width: usize,
    prefix_style: Style,
    text_style: Style,
) -> Vec<Line<'static>> {
    wrap(&format!("{prefix}{text}"), width)
        .into_iter()
        .enumerate()
        .map(|(i, row)| {
            if i == 0 && row.starts_with(prefix) {
                Line::from(vec![
                    Span::styled(prefix, prefix_style),
                    Span::styled(row[prefix.len()..].to_string(), text_style),
                ])
            } else {
                Line::styled(row, text_style)
            }
        })
        .collect()
}

fn turn_rows(t: &Turn, width: usize, theme: &Theme) -> Vec<Line<'static>> {
    let mut rows = message_rows("you › ", &t.user, width, theme.help_key, theme.base);
    let mut answer = t.answer.trim_start().to_string();
    if t.streaming {
        answer.push('▌');
    }
    rows.extend(message_rows(
        "model › ",
        &answer,
        width,
        theme.title,
        theme.field_value,
    ));
    if let Some(s) = &t.stats {
        rows.push(Line::styled(
            clip(
                &format!(
                    "  {} tokens · {:.1} tok/s · prompt {} tokens{} · {}",
                    s.tokens,
                    s.tokens_per_s,
                    s.prompt_tokens,
                    if s.cached_tokens > 0 {
                        format!(" ({} cached)", s.cached_tokens)
                    } else {
                        String::new()
                    },
                    stop_label(s.stop)
                ),
                width,
            ),
            theme.muted,
        ));
    }
    if let Some(e) = &t.error {
        for row in wrap(&format!("  ✗ {e}"), width) {
            rows.push(Line::styled(row, theme.danger));
        }
    }
    rows.push(Line::raw(""));
    rows
}

fn render_slot(frame: &mut Frame, area: Rect, app: &App, slot: usize, theme: &Theme) {
    let c = &app.chat;
    let s = &c.slots[slot];
    let title = if s.generating {
        format!(" {} · answering… ", slot_name(slot))
    } else if c.compare {
        format!(" {} ", slot_name(slot))
    } else {
        " conversation ".to_string()
    };
    let focused = c.focus == ChatFocus::Conversation;
    let block = part_block(title, focused, theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.height == 0 || inner.width == 0 {
        return;
    }
    let two = inner.height >= 8;
    // Styles stay as `header` set them (the status colour used to be lost here).
    let head = header(slot, s, theme, two, usize::from(inner.width));
    let head_h = u16::try_from(head.len()).unwrap_or(1).min(inner.height);
    let [head_area, text_area] =
        Layout::vertical([Constraint::Length(head_h), Constraint::Min(0)]).areas(inner);
    frame.render_widget(Paragraph::new(head), head_area);
    let width = usize::from(text_area.width);
    let mut rows: Vec<Line> = Vec::new();
    if let SlotStatus::Failed(why) = &s.status {
        for row in wrap(&format!("✗ {why}"), width) {
            rows.push(Line::styled(row, theme.danger));
        }
    }
    if s.turns.is_empty() {
        if slot == 0 {
            for hint in [
                "i or Enter: type a message (Enter sends, Ctrl-j or Alt-Enter adds a line, Esc leaves the input).",
                "o load model/adapter/checkpoint · m compare A/B · r regenerate · n new chat · y copy · v rendered prompt · e system prompt · g settings · ? all keys",
            ] {
                rows.extend(
                    wrap(hint, width)
                        .into_iter()
                        .map(|r| Line::styled(r, theme.muted)),
                );
            }
        }
    } else {
        for t in &s.turns {
            rows.extend(turn_rows(t, width, theme));
        }
        rows.pop();
    }
    let h = usize::from(text_area.height);
    let bottom = rows.len().saturating_sub(h);
    let start = bottom.saturating_sub(c.scroll);
    let visible: Vec<Line> = rows.into_iter().skip(start).take(h).collect();
    frame.render_widget(Paragraph::new(visible), text_area);
}

fn render_system(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let system = app.chat_system();
    let text = match &system {
        Some(s) if app.chat.system.is_empty() => format!("{s}  (the preset's default_system)"),
        Some(s) => s.clone(),
        None => "none (the template's default)".into(),
    };
    let line = Line::from(vec![
        Span::styled(" system › ", theme.field_label),
        Span::styled(
            clip(
                &text.replace('\n', " "),
                usize::from(area.width).saturating_sub(10),
            ),
            theme.muted,
        ),
    ]);
    frame.render_widget(line, area);
}

/// A bordered part of the pane, its border brighter while it has the keyboard.
fn part_block<'a>(
    title: impl Into<std::borrow::Cow<'a, str>>,
    focused: bool,
    theme: &Theme,
) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(if focused {
            theme.border_focused
        } else {
            theme.border
        })
        .title(Span::styled(title, theme.title))
}

fn render_input(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let c = &app.chat;
    let focused = c.focus == ChatFocus::Input && c.line_edit.is_none();
    let title = if focused {
        " message · Enter sends · Ctrl-j new line · Esc keys "
    } else {
        " message · i to type "
    };
    let block = part_block(title, focused, theme);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    frame.render_widget(&super::themed_field(&c.input, theme), inner);
}

fn render_settings(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let focused = app.chat.focus == ChatFocus::Settings;
    let block = part_block(
        if focused {
            " generation · Enter edits · Esc back "
        } else {
            " generation (g) "
        },
        focused,
        theme,
    );
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [fields, help] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(if focused { 4 } else { 0 }),
    ])
    .areas(inner);
    super::form::render_fields(frame, fields, app, theme);
    if let Some(key) = app.focused_key().filter(|_| focused) {
        let f = app.form.field(key);
        let mut lines = vec![Line::styled(format!("{key}: {}", f.help), theme.muted)];
        if let Some(issue) = f.issue {
            lines.insert(0, Line::styled(issue, theme.danger));
        }
        frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), help);
    }
}

fn render_popups(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let c = &app.chat;
    if let Some(p) = &c.picker {
        let rows = p.items.len() + PICKER_EXTRA_ROWS.len();
        let h = u16::try_from(rows + 2).unwrap_or(u16::MAX);
        let r = centered(area, area.width.saturating_sub(4).min(100), h);
        frame.render_widget(Clear, r);
        let width = usize::from(r.width.saturating_sub(3));
        let mut lines: Vec<Line> = p
            .items
            .iter()
            .map(|e| e.label.clone())
            .chain(PICKER_EXTRA_ROWS.iter().map(ToString::to_string))
            .enumerate()
            .map(|(i, label)| {
                let style = if i == p.selected {
                    theme.field_focused
                } else {
                    theme.field_value
                };
                Line::styled(format!(" {}", clip(&label, width)), style)
            })
            .collect();
        let skip = p
            .selected
            .saturating_sub(usize::from(r.height.saturating_sub(3)));
        lines.drain(..skip.min(lines.len()));
        let title = format!(
            "chat with ({}) · Enter loads · Esc closes",
            slot_name(p.slot)
        );
        frame.render_widget(Paragraph::new(lines).block(boxed(&title, theme)), r);
    } else if let Some(text) = &c.prompt_view {
        let r = centered(area, area.width, area.height);
        frame.render_widget(Clear, r);
        let scroll = u16::try_from(c.prompt_scroll).unwrap_or(u16::MAX);
        frame.render_widget(
            Paragraph::new(text.as_str())
                .style(theme.field_value)
                .wrap(Wrap { trim: false })
                .scroll((scroll, 0))
                .block(boxed(
                    "rendered prompt of A: the exact text the model reads · Esc closes",
                    theme,
                )),
            r,
        );
    }
    if let Some((kind, edit)) = &c.line_edit {
        let r = centered(area, area.width.saturating_sub(4).min(90), 3);
        frame.render_widget(Clear, r);
        let title = match kind {
            LineEdit::System => "system prompt (Enter sets, Esc cancels)".to_string(),
            LineEdit::AdapterPath { slot } => format!(
                "adapter folder for {} (Enter loads, Esc cancels)",
                slot_name(*slot)
            ),
            LineEdit::RunFolder { slot } => format!(
                "run folder to pick from for {} (Enter lists it, Esc cancels)",
                slot_name(*slot)
            ),
        };
        let block = boxed(&title, theme);
        let inner = block.inner(r);
        frame.render_widget(block, r);
        frame.render_widget(&super::themed_field(edit, theme), inner);
    }
}

/// The OSC 52 escape that puts `text` on the terminal's clipboard (works over SSH; tmux passes
/// it on with `set -g set-clipboard on`).
pub fn osc52(text: &str) -> String {
    format!("\x1b]52;c;{}\x07", base64(text.as_bytes()))
}

/// Standard base64 with padding (RFC 4648).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        // RFC 4648 §10 test vectors.
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(osc52("foo"), "\x1b]52;c;Zm9v\x07");
    }

    #[test]
    fn wrap_breaks_at_words_and_cuts_long_ones() {
        assert_eq!(wrap("the cat sat on", 7), ["the cat", "sat on"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\n\nb", 4), ["a", "", "b"]);
    }
}
