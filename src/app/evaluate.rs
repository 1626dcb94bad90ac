//! The Evaluate pane (LLaMA-Factory's "Evaluate & Predict" tab): its form holds the evaluation data and
//! generation keys; `e` checks the preset and starts `termtune predict` on a background thread (the effect
//! runner writes LF's files into `output_dir/eval_<time>`); progress shows while it runs (`x` cancels); then the
//! metrics and every example, sorted by score, with its prompt, label and prediction side by side.
//! Pure: fed by keys and [`PredictMsg`]s.

use std::collections::VecDeque;
use std::path::PathBuf;

use super::{Action, App, Effect, Tab};
use crate::config::Purpose;
use crate::predict::{PredictEvent, PredictOutcome};

/// Progress lines kept.
pub const MAX_LINES: usize = 100;

/// A fact from the prediction thread.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictMsg {
    Event(PredictEvent),
    /// Done; the files were written into `dir`.
    Finished {
        outcome: Box<PredictOutcome>,
        dir: PathBuf,
    },
    Failed(String),
    /// Cancelled on request; nothing was written.
    Cancelled,
}

/// Where the prediction is.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum EvalPhase {
    #[default]
    Idle,
    Running {
        done: usize,
        total: usize,
        tokens: usize,
    },
    Finished,
    Failed(String),
    Cancelled,
}

/// The order in which the examples are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvalSort {
    /// Lowest ROUGE-L first: where the model is worst.
    #[default]
    Worst,
    Best,
    /// The data's order.
    Data,
}

impl EvalSort {
    pub fn label(self) -> &'static str {
        match self {
            EvalSort::Worst => "worst ROUGE-L first",
            EvalSort::Best => "best ROUGE-L first",
            EvalSort::Data => "data order",
        }
    }

    fn next(self) -> EvalSort {
        match self {
            EvalSort::Worst => EvalSort::Best,
            EvalSort::Best => EvalSort::Data,
            EvalSort::Data => EvalSort::Worst,
        }
    }
}

/// The Evaluate pane.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalState {
    pub phase: EvalPhase,
    pub lines: VecDeque<String>,
    /// The last finished prediction and the folder its files went to.
    pub outcome: Option<Box<PredictOutcome>>,
    pub dir: Option<PathBuf>,
    pub sort: EvalSort,
    /// Row indices of `outcome.rows` in `sort` order.
    pub order: Vec<usize>,
    /// Position in `order` of the example shown.
    pub selected: usize,
    pub cancelling: bool,
}

impl EvalState {
    pub fn is_running(&self) -> bool {
        matches!(self.phase, EvalPhase::Running { .. })
    }

    fn note(&mut self, line: impl Into<String>) {
        if self.lines.len() == MAX_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.into());
    }

    fn sort_rows(&mut self) {
        let Some(outcome) = &self.outcome else {
            self.order.clear();
            return;
        };
        let mut order: Vec<usize> = (0..outcome.rows.len()).collect();
        let key = |i: &usize| outcome.rows[*i].scores.rouge_l;
        match self.sort {
            EvalSort::Worst => order.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.cmp(b))),
            EvalSort::Best => order.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.cmp(b))),
            EvalSort::Data => {}
        }
        self.order = order;
        self.selected = 0;
    }

    /// The example shown: its index in the data and the row.
    pub fn current(&self) -> Option<(usize, &crate::predict::PredictRow)> {
        let outcome = self.outcome.as_ref()?;
        let i = *self.order.get(self.selected)?;
        Some((i, outcome.rows.get(i)?))
    }
}

impl App {
    /// The Evaluate pane's actions (only while it is shown); None passes the action on.
    pub(super) fn evaluate_action(&mut self, action: Action) -> Option<Vec<Effect>> {
        if self.tab != Tab::Evaluate {
            return None;
        }
        Some(match action {
            Action::StartPredict => self.start_predict(),
            Action::CancelPredict => self.cancel_predict(),
            Action::CycleEvalSort => {
                self.eval.sort = self.eval.sort.next();
                self.eval.sort_rows();
                self.say(format!("examples: {}", self.eval.sort.label()));
                Vec::new()
            }
            Action::NextExample | Action::PrevExample => {
                let n = self.eval.order.len();
                if n == 0 {
                    self.say("no predictions yet: e predicts on eval_dataset");
                } else if action == Action::NextExample {
                    self.eval.selected = (self.eval.selected + 1).min(n - 1);
                } else {
                    self.eval.selected = self.eval.selected.saturating_sub(1);
                }
                Vec::new()
            }
            _ => return None,
        })
    }

    /// `e`: check the preset for prediction, then start it.
    fn start_predict(&mut self) -> Vec<Effect> {
        if self.eval.is_running() {
            self.say("a prediction is already running; its progress is below");
            return Vec::new();
        }
        let loaded = match self.form.check(Purpose::Predict) {
            Ok(l) => l,
            Err(issues) => {
                self.refuse("predict", &issues);
                return Vec::new();
            }
        };
        self.eval.phase = EvalPhase::Running {
            done: 0,
            total: 0,
            tokens: 0,
        };
        self.eval.cancelling = false;
        self.eval.lines.clear();
        self.eval.note("starting");
        self.say("predicting on the evaluation data…");
        vec![Effect::Predict(Box::new(loaded.preset))]
    }

    /// `x`: cancel a running prediction; without one, `x` stops a run as everywhere else.
    fn cancel_predict(&mut self) -> Vec<Effect> {
        if !self.eval.is_running() {
            self.ask_stop_run();
            return Vec::new();
        }
        self.eval.cancelling = true;
        self.say("cancelling the prediction…");
        vec![Effect::CancelPredict]
    }

    /// A fact from the prediction thread.
    pub(super) fn on_predict(&mut self, msg: PredictMsg) {
        match msg {
            PredictMsg::Event(PredictEvent::Note(line)) => self.eval.note(line),
            PredictMsg::Event(PredictEvent::Started { total, batch_size }) => {
                self.eval
                    .note(format!("{total} examples in batches of {batch_size}"));
                self.eval.phase = EvalPhase::Running {
                    done: 0,
                    total,
                    tokens: 0,
                };
            }
            PredictMsg::Event(PredictEvent::Progress {
                done,
                total,
                tokens,
            }) => {
                self.eval.phase = EvalPhase::Running {
                    done,
                    total,
                    tokens,
                };
            }
            PredictMsg::Finished { outcome, dir } => {
                let rl = outcome
                    .metrics
                    .get("predict_rouge-l")
                    .copied()
                    .unwrap_or_default();
                self.say(format!(
                    "predicted {} examples: ROUGE-L {rl:.2}; files in {}",
                    outcome.rows.len(),
                    dir.display()
                ));
                self.eval.outcome = Some(outcome);
                self.eval.dir = Some(dir);
                self.eval.phase = EvalPhase::Finished;
                self.eval.sort_rows();
            }
            PredictMsg::Failed(message) => {
                self.complain(format!("prediction failed: {message}"));
                self.eval.phase = EvalPhase::Failed(message);
            }
            PredictMsg::Cancelled => {
                self.say("prediction cancelled; nothing was written");
                self.eval.phase = EvalPhase::Cancelled;
            }
        }
        if !self.eval.is_running() {
            self.eval.cancelling = false;
        }
    }
}
