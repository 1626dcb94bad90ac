//! Semantic styles, loaded from `themes/*.yaml` (the three shipped themes are compiled in). A
//! theme file names only the keys it changes; the default fills the rest. `NO_COLOR` turns every
//! colour off and keeps bold/reverse for emphasis.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use ratatui::style::{Color, Modifier, Style};
use serde::Deserialize;

/// The shipped themes: (name, YAML).
pub const BUILTIN: &[(&str, &str)] = &[
    ("default", include_str!("../../themes/default.yaml")),
    ("light", include_str!("../../themes/light.yaml")),
    (
        "high-contrast",
        include_str!("../../themes/high-contrast.yaml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum ThemeError {
    #[error("cannot read theme {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "theme {name}: not valid YAML: {detail}; a theme is `key: {{fg: red, bold: true}}` lines"
    )]
    Yaml { name: String, detail: String },
    #[error("theme {name}: unknown style key `{key}`; known keys are those of themes/default.yaml")]
    UnknownKey { name: String, key: String },
    #[error(
        "theme {name}: `{key}`: unknown colour `{colour}`; use a name (red, lightblue, darkgray), an index 0-255 or #rrggbb"
    )]
    Colour {
        name: String,
        key: String,
        colour: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StyleSpec {
    fg: Option<String>,
    bg: Option<String>,
    #[serde(default)]
    bold: bool,
    #[serde(default)]
    italic: bool,
    #[serde(default)]
    underline: bool,
    #[serde(default)]
    reversed: bool,
}

/// Every semantic style the UI uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Theme {
    pub name: String,
    pub base: Style,
    pub muted: Style,
    pub border: Style,
    pub border_focused: Style,
    pub title: Style,
    pub tab_active: Style,
    pub tab_inactive: Style,
    pub status_bar: Style,
    pub status_error: Style,
    pub help_key: Style,
    pub help_desc: Style,
    pub field_label: Style,
    pub field_value: Style,
    pub field_default: Style,
    pub field_edited: Style,
    pub field_focused: Style,
    pub danger: Style,
    pub warning: Style,
    pub ok: Style,
    pub loss_train: Style,
    pub loss_smooth: Style,
    pub loss_eval: Style,
    pub lr: Style,
    pub grad_norm: Style,
    pub gauge: Style,
    pub token_trained: Style,
    pub token_masked: Style,
}

const KEYS: &[&str] = &[
    "base",
    "muted",
    "border",
    "border_focused",
    "title",
    "tab_active",
    "tab_inactive",
    "status_bar",
    "status_error",
    "help_key",
    "help_desc",
    "field_label",
    "field_value",
    "field_default",
    "field_edited",
    "field_focused",
    "danger",
    "warning",
    "ok",
    "loss_train",
    "loss_smooth",
    "loss_eval",
    "lr",
    "grad_norm",
    "gauge",
    "token_trained",
    "token_masked",
];

impl Theme {
    fn slot(&mut self, key: &str) -> Option<&mut Style> {
        Some(match key {
            "base" => &mut self.base,
            "muted" => &mut self.muted,
            "border" => &mut self.border,
            "border_focused" => &mut self.border_focused,
            "title" => &mut self.title,
            "tab_active" => &mut self.tab_active,
            "tab_inactive" => &mut self.tab_inactive,
            "status_bar" => &mut self.status_bar,
            "status_error" => &mut self.status_error,
            "help_key" => &mut self.help_key,
            "help_desc" => &mut self.help_desc,
            "field_label" => &mut self.field_label,
            "field_value" => &mut self.field_value,
            "field_default" => &mut self.field_default,
            "field_edited" => &mut self.field_edited,
            "field_focused" => &mut self.field_focused,
            "danger" => &mut self.danger,
            "warning" => &mut self.warning,
            "ok" => &mut self.ok,
            "loss_train" => &mut self.loss_train,
            "loss_smooth" => &mut self.loss_smooth,
            "loss_eval" => &mut self.loss_eval,
            "lr" => &mut self.lr,
            "grad_norm" => &mut self.grad_norm,
            "gauge" => &mut self.gauge,
            "token_trained" => &mut self.token_trained,
            "token_masked" => &mut self.token_masked,
            _ => return None,
        })
    }

    fn blank(name: &str) -> Self {
        let s = Style::default();
        Self {
            name: name.into(),
            base: s,
            muted: s,
            border: s,
            border_focused: s,
            title: s,
            tab_active: s,
            tab_inactive: s,
            status_bar: s,
            status_error: s,
            help_key: s,
            help_desc: s,
            field_label: s,
            field_value: s,
            field_default: s,
            field_edited: s,
            field_focused: s,
            danger: s,
            warning: s,
            ok: s,
            loss_train: s,
            loss_smooth: s,
            loss_eval: s,
            lr: s,
            grad_norm: s,
            gauge: s,
            token_trained: s,
            token_masked: s,
        }
    }

    /// `base` with the styles `yaml` names replaced.
    pub fn parse_over(base: &Theme, name: &str, yaml: &str) -> Result<Theme, ThemeError> {
        let specs: BTreeMap<String, StyleSpec> =
            serde_norway::from_str::<Option<BTreeMap<String, StyleSpec>>>(yaml)
                .map_err(|e| ThemeError::Yaml {
                    name: name.into(),
                    detail: e.to_string(),
                })?
                .unwrap_or_default();
        let mut theme = base.clone();
        theme.name = name.into();
        for (key, spec) in specs {
            let style = to_style(name, &key, &spec)?;
            let slot = theme.slot(&key).ok_or_else(|| ThemeError::UnknownKey {
                name: name.into(),
                key: key.clone(),
            })?;
            *slot = style;
        }
        Ok(theme)
    }

    /// A shipped theme by name.
    pub fn builtin(name: &str) -> Option<Theme> {
        let (_, yaml) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        let default = Theme::default();
        Theme::parse_over(&default, name, yaml).ok()
    }

    /// All shipped themes, default first.
    pub fn all_builtin() -> Vec<Theme> {
        BUILTIN
            .iter()
            .filter_map(|(n, _)| Theme::builtin(n))
            .collect()
    }

    /// A theme file over the default; on any problem, the default and the problem.
    pub fn load(path: &Path) -> (Theme, Option<ThemeError>) {
        let name = path
            .file_stem()
            .map_or_else(|| "theme".into(), |s| s.to_string_lossy().into_owned());
        let result = std::fs::read_to_string(path)
            .map_err(|source| ThemeError::Read {
                path: path.display().to_string(),
                source,
            })
            .and_then(|text| Theme::parse_over(&Theme::default(), &name, &text));
        match result {
            Ok(t) => (t, None),
            Err(e) => (Theme::default(), Some(e)),
        }
    }

    /// Colours removed (for `NO_COLOR` or a terminal without colour); emphasis kept, and the
    /// focused/active styles reversed so they still stand out.
    pub fn monochrome(&self) -> Theme {
        let mut t = self.clone();
        for key in KEYS {
            if let Some(s) = t.slot(key) {
                let mods = s.add_modifier;
                *s = Style::default().add_modifier(mods);
            }
        }
        t.tab_active = t.tab_active.add_modifier(Modifier::REVERSED);
        t.field_focused = t.field_focused.add_modifier(Modifier::REVERSED);
        t.status_bar = t.status_bar.add_modifier(Modifier::REVERSED);
        t.status_error = t.status_error.add_modifier(Modifier::REVERSED);
        t.token_trained = t.token_trained.add_modifier(Modifier::UNDERLINED);
        t.gauge = t.gauge.add_modifier(Modifier::REVERSED);
        t.name = format!("{} (no colour)", self.name);
        t
    }
}

impl Default for Theme {
    /// themes/default.yaml (compiled in).
    fn default() -> Self {
        let blank = Theme::blank("default");
        Theme::parse_over(&blank, "default", BUILTIN[0].1).unwrap_or(blank)
    }
}

fn to_style(name: &str, key: &str, spec: &StyleSpec) -> Result<Style, ThemeError> {
    let colour = |c: &Option<String>| -> Result<Option<Color>, ThemeError> {
        match c {
            None => Ok(None),
            Some(c) => Color::from_str(c)
                .map(Some)
                .map_err(|_| ThemeError::Colour {
                    name: name.into(),
                    key: key.into(),
                    colour: c.clone(),
                }),
        }
    };
    let mut style = Style::default();
    if let Some(fg) = colour(&spec.fg)? {
        style = style.fg(fg);
    }
    if let Some(bg) = colour(&spec.bg)? {
        style = style.bg(bg);
    }
    let mut m = Modifier::empty();
    if spec.bold {
        m |= Modifier::BOLD;
    }
    if spec.italic {
        m |= Modifier::ITALIC;
    }
    if spec.underline {
        m |= Modifier::UNDERLINED;
    }
    if spec.reversed {
        m |= Modifier::REVERSED;
    }
    Ok(style.add_modifier(m))
}

/// Whether colours should be used: not when `NO_COLOR` is set (non-empty), nor on a `dumb` terminal.
pub fn colour_enabled() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
    !(no_color || dumb)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_shipped_theme_parses_and_sets_every_key() {
        for (name, yaml) in BUILTIN {
            let t = Theme::parse_over(&Theme::blank(name), name, yaml).unwrap();
            let mut t2 = t.clone();
            for key in KEYS {
                assert!(t2.slot(key).is_some(), "{name}: {key}");
            }
            let map: BTreeMap<String, StyleSpec> = serde_norway::from_str(yaml).unwrap();
            for key in KEYS {
                assert!(map.contains_key(*key), "{name} lacks `{key}`");
            }
        }
    }

    #[test]
    fn a_partial_theme_overrides_only_what_it_names() {
        let t = Theme::parse_over(&Theme::default(), "mine", "danger: {fg: magenta}\n").unwrap();
        assert_eq!(t.danger, Style::default().fg(Color::Magenta));
        assert_eq!(t.ok, Theme::default().ok);
    }

    #[test]
    fn a_broken_theme_is_reported_and_the_default_used() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, "danger: {fg: not-a-colour}\n").unwrap();
        let (t, err) = Theme::load(&p);
        assert_eq!(t, Theme::default());
        assert!(
            err.unwrap()
                .to_string()
                .contains("unknown colour `not-a-colour`")
        );
        std::fs::write(&p, "dnager: {fg: red}\n").unwrap();
        let (_, err) = Theme::load(&p);
        assert!(
            err.unwrap()
                .to_string()
                .contains("unknown style key `dnager`")
        );
    }

    #[test]
    fn monochrome_has_no_colour() {
        let t = Theme::default().monochrome();
        assert_eq!(t.danger.fg, None);
        assert!(t.field_focused.add_modifier.contains(Modifier::REVERSED));
    }
}
