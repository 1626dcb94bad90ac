//! PEFT LoRA adapter files: `adapter_config.json` + `adapter_model.safetensors`, read and written exactly as
//! HF PEFT does, plus merging adapters into the base (`adapter_name_or_path: a,b` stacking).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{EngineError, Result};
use super::model::{Dora, LoraPair, LoraSpec, LoraTargets, Model, lora_scale};
use super::pissa::LoraInit;
use super::weights::{read_json, save_safetensors};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// `adapter_config.json` as PEFT 0.18/0.19 writes it for LoRA (LLAMAFACTORY_NOTES §3). Unknown keys in files
/// written by newer PEFT versions are ignored on read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// A list of leaf names, or a regex string (PEFT allows both).
    pub target_modules: Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    #[serde(default = "default_init")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub rank_pattern: serde_json::Map<String, Value>,
    #[serde(default)]
    pub alpha_pattern: serde_json::Map<String, Value>,
    #[serde(default)]
    pub layers_to_transform: Value,
    #[serde(default)]
    pub layers_pattern: Value,
    #[serde(default)]
    pub exclude_modules: Value,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default = "empty_object")]
    pub loftq_config: Value,
    #[serde(default)]
    pub megatron_config: Value,
    #[serde(default = "default_megatron_core")]
    pub megatron_core: Value,
    #[serde(default)]
    pub layer_replication: Value,
    #[serde(default)]
    pub eva_config: Value,
    #[serde(default)]
    pub corda_config: Value,
    #[serde(default)]
    pub lora_ga_config: Value,
    #[serde(default)]
    pub trainable_token_indices: Value,
    #[serde(default)]
    pub target_parameters: Value,
    #[serde(default)]
    pub use_qalora: bool,
    #[serde(default = "default_qalora_group")]
    pub qalora_group_size: usize,
    #[serde(default)]
    pub peft_version: Option<String>,
    #[serde(default)]
    pub auto_mapping: Value,
}

fn default_bias() -> String {
    "none".into()
}
fn default_true() -> bool {
    true
}
fn default_init() -> Value {
    Value::Bool(true)
}
fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}
fn default_megatron_core() -> Value {
    Value::String("megatron.core".into())
}
fn default_qalora_group() -> usize {
    16
}

impl AdapterConfig {
    /// The config PEFT writes for `spec` on `base_model_name_or_path`.
    pub fn for_spec(spec: &LoraSpec, base_model_name_or_path: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            base_model_name_or_path: Some(base_model_name_or_path.into()),
            revision: None,
            r: spec.r,
            lora_alpha: spec.alpha,
            lora_dropout: f64::from(spec.dropout),
            target_modules: Value::Array(
                spec.targets
                    .leaves()
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            ),
            modules_to_save: None,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: spec.init.peft_value(),
            use_rslora: spec.use_rslora,
            use_dora: spec.use_dora,
            rank_pattern: serde_json::Map::new(),
            alpha_pattern: serde_json::Map::new(),
            layers_to_transform: Value::Null,
            layers_pattern: Value::Null,
            exclude_modules: Value::Null,
            lora_bias: false,
            loftq_config: empty_object(),
            megatron_config: Value::Null,
            megatron_core: default_megatron_core(),
            layer_replication: Value::Null,
            eva_config: Value::Null,
            corda_config: Value::Null,
            lora_ga_config: Value::Null,
            trainable_token_indices: Value::Null,
            target_parameters: Value::Null,
            use_qalora: false,
            qalora_group_size: 16,
            peft_version: Some("0.17.1".into()),
            auto_mapping: Value::Null,
        }
    }

    /// Scale for a module given its rank (PEFT: alpha/r, or alpha/√r with rsLoRA).
    pub fn scale(&self) -> f64 {
        lora_scale(self.lora_alpha, self.r, self.use_rslora)
    }

    /// Target leaf names when `target_modules` is a list (full module paths, as PEFT writes them for
    /// "all-linear", reduced to their leaves, each once).
    pub fn target_leaves(&self) -> Option<Vec<String>> {
        self.target_modules.as_array().map(|a| {
            let mut leaves: Vec<String> = Vec::new();
            for v in a.iter().filter_map(|v| v.as_str()) {
                let leaf = v.rsplit('.').next().unwrap_or(v);
                if !leaves.iter().any(|l| l == leaf) {
                    leaves.push(leaf.to_string());
                }
            }
            leaves
        })
    }
}

/// An adapter read from disk: its config, `(A, B)` per HF module path (`model.layers.0.self_attn.q_proj`) and, for
/// a DoRA adapter (`use_dora`), the magnitude vector of each of those modules. `init` says whether the base must
/// first become PiSSA's residual (`init_lora_weights: "pissa…"`), as PEFT's loading does.
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub init: LoraInit,
    pub pairs: HashMap<String, (Tensor, Tensor)>,
    pub magnitudes: HashMap<String, Tensor>,
}

fn adapter_err(dir: &Path, why: impl Into<String>) -> EngineError {
    EngineError::Adapter {
        path: dir.to_path_buf(),
        why: why.into(),
    }
}

/// An adapter folder's `adapter_config.json` and what its `init_lora_weights` means for loading, without reading
/// the weights; every setting termtune cannot load as PEFT would is refused here, with the fix.
pub fn read_adapter_config(dir: &Path) -> Result<(AdapterConfig, LoraInit)> {
    let cfg_path = dir.join(CONFIG_FILE);
    if !cfg_path.exists() {
        // A freeze or full fine-tuning run leaves a whole model, which replaces the base rather than adding to it.
        let why = if dir.join("config.json").is_file() {
            format!(
                "missing {CONFIG_FILE}: this is a model folder (a freeze or full fine-tuning run's output), not an adapter; give it as the model (`model_name_or_path`, or `--model`) with no adapter"
            )
        } else {
            format!("missing {CONFIG_FILE}; is this a PEFT LoRA adapter folder?")
        };
        return Err(adapter_err(dir, why));
    }
    let config: AdapterConfig =
        serde_json::from_value(read_json(&cfg_path)?).map_err(|e| EngineError::Json {
            context: cfg_path.display().to_string(),
            source: e,
        })?;
    if config.peft_type != "LORA" {
        return Err(adapter_err(
            dir,
            format!(
                "`peft_type` {:?} is not supported; only LORA",
                config.peft_type
            ),
        ));
    }
    let init =
        LoraInit::from_peft(&config.init_lora_weights).map_err(|why| adapter_err(dir, why))?;
    if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
        return Err(adapter_err(
            dir,
            "`rank_pattern`/`alpha_pattern` are not supported yet",
        ));
    }
    if config
        .modules_to_save
        .as_ref()
        .is_some_and(|m| !m.is_empty())
    {
        return Err(adapter_err(
            dir,
            "`modules_to_save` (full-weight extra modules) is not supported yet",
        ));
    }
    Ok((config, init))
}

/// Read a PEFT adapter folder (tensors onto `device`, kept in their stored dtype).
pub fn read_adapter(dir: &Path, device: &candle_core::Device) -> Result<Adapter> {
    let (config, init) = read_adapter_config(dir)?;
    let w_path = dir.join(WEIGHTS_FILE);
    if !w_path.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(EngineError::PickleRefused {
                path: dir.join("adapter_model.bin"),
            });
        }
        return Err(adapter_err(dir, format!("missing {WEIGHTS_FILE}")));
    }
    let tensors = candle_core::safetensors::load(&w_path, device)
        .map_err(|e| adapter_err(dir, format!("cannot read {WEIGHTS_FILE}: {e}")))?;
    let mut a_map = HashMap::new();
    let mut b_map = HashMap::new();
    let mut magnitudes = HashMap::new();
    for (name, t) in tensors {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            return Err(adapter_err(
                dir,
                format!("tensor `{name}` does not start with `{PREFIX}`"),
            ));
        };
        // An image-and-text model's modules (either transformers layout) as termtune names them.
        let rest = super::arch::text_tensor_name(false, rest).unwrap_or_else(|| rest.to_string());
        // PEFT strips the adapter name on save; accept `.default.` too (written by some older tools).
        let rest = rest
            .replace(".lora_A.default.weight", ".lora_A.weight")
            .replace(".lora_B.default.weight", ".lora_B.weight")
            .replace(
                ".lora_magnitude_vector.default.weight",
                ".lora_magnitude_vector",
            );
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t);
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t);
        } else if let Some(m) = rest.strip_suffix(".lora_magnitude_vector") {
            // PEFT saves DoRA's magnitude as `<module>.lora_magnitude_vector` (its `.weight` stripped).
            if !config.use_dora {
                return Err(adapter_err(
                    dir,
                    format!(
                        "tensor `{name}` is a DoRA magnitude but {CONFIG_FILE} does not say `use_dora: true`"
                    ),
                ));
            }
            magnitudes.insert(m.to_string(), t);
        } else {
            return Err(adapter_err(
                dir,
                format!("tensor `{name}` is not a lora_A/lora_B weight or a DoRA magnitude"),
            ));
        }
    }
    let mut pairs = HashMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .ok_or_else(|| adapter_err(dir, format!("`{m}` has lora_A but no lora_B")))?;
        pairs.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        return Err(adapter_err(dir, format!("`{m}` has lora_B but no lora_A")));
    }
    if config.use_dora {
        if let Some(m) = pairs.keys().find(|m| !magnitudes.contains_key(*m)) {
            return Err(adapter_err(
                dir,
                format!(
                    "`{m}` has no `lora_magnitude_vector` but {CONFIG_FILE} says `use_dora: true`; the file is incomplete"
                ),
            ));
        }
        if let Some(m) = magnitudes.keys().find(|m| !pairs.contains_key(*m)) {
            return Err(adapter_err(
                dir,
                format!("`{m}` has a DoRA magnitude but no lora_A/lora_B"),
            ));
        }
    }
    Ok(Adapter {
        dir: dir.to_path_buf(),
        config,
        init,
        pairs,
        magnitudes,
    })
}

impl Adapter {
    /// A PiSSA adapter's base: each adapted weight becomes its residual ([`super::pissa::decompose`] with the
    /// adapter's rank and scale), as PEFT's loading does before it reads A and B. Nothing for other adapters.
    fn prepare_base(&self, model: &mut Model) -> Result<()> {
        let LoraInit::Pissa { niter } = self.init else {
            return Ok(());
        };
        let (scale, dtype) = (self.config.scale(), model.dtype);
        for m in self.pairs.keys() {
            let lin = model
                .linear_mut(m)
                .ok_or_else(|| adapter_err(&self.dir, format!("module `{m}` missing")))?;
            lin.pissa_residual(self.config.r, scale, niter, dtype)
                .map_err(|e| adapter_err(&self.dir, format!("a PiSSA adapter: {e}")))?;
        }
        Ok(())
    }

    /// Check every pair against the model's linear shapes.
    fn check(&self, model: &mut Model) -> Result<()> {
        for (m, (a, b)) in &self.pairs {
            let lin = model.linear_mut(m).ok_or_else(|| {
                adapter_err(
                    &self.dir,
                    format!("module `{m}` does not exist in the base model"),
                )
            })?;
            let (out, inp) = super::model::dims2(m, lin.weight.dims())?;
            let (ra, ia) = a.dims2()?;
            let (ob, rb) = b.dims2()?;
            if ia != inp || ob != out || ra != rb {
                return Err(adapter_err(
                    &self.dir,
                    format!(
                        "`{m}`: lora_A {:?} / lora_B {:?} do not fit a [{out}, {inp}] weight; adapter for another base?",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            if let Some(mag) = self.magnitudes.get(m)
                && mag.dims() != [out]
            {
                return Err(adapter_err(
                    &self.dir,
                    format!(
                        "`{m}`: lora_magnitude_vector {:?} does not fit a [{out}, {inp}] weight; adapter for another base?",
                        mag.dims()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Save the model's trainable LoRA as a PEFT adapter folder (created if needed). LoRA tensors are written in
/// f32 (as LLaMA-Factory does, trainable params are upcast).
pub fn save_adapter(model: &Model, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    let init = model.lora.as_ref().map_or(LoraInit::Default, |s| s.init);
    save_adapter_as(model, dir, base_model_name_or_path, init)
}

/// [`save_adapter`] with `init_lora_weights` written as `init` says: LLaMA-Factory's `pissa_init/` folder is the
/// PiSSA adapter's start saved as a plain one (`true`), which PEFT's conversion then subtracts.
pub fn save_adapter_as(
    model: &Model,
    dir: &Path,
    base_model_name_or_path: &str,
    init: LoraInit,
) -> Result<()> {
    let spec = model
        .lora
        .as_ref()
        .ok_or_else(|| EngineError::Invalid("the model has no trainable LoRA to save".into()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| EngineError::io(format!("creating {}", dir.display()), e))?;
    let mut tensors = HashMap::new();
    let image_text = model.cfg.image_text;
    for lin in model.linears() {
        if let Some(l) = &lin.lora {
            // The module as PEFT names it on the checkpoint (an image-and-text model's under `language_model.`).
            let module = super::arch::checkpoint_name(image_text, &lin.name);
            tensors.insert(
                format!("{PREFIX}{module}.lora_A.weight"),
                l.a.as_detached_tensor().to_dtype(DType::F32)?,
            );
            tensors.insert(
                format!("{PREFIX}{module}.lora_B.weight"),
                l.b.as_detached_tensor().to_dtype(DType::F32)?,
            );
            if let Some(d) = &l.dora {
                tensors.insert(
                    format!("{PREFIX}{module}.lora_magnitude_vector"),
                    d.magnitude.as_detached_tensor().to_dtype(DType::F32)?,
                );
            }
        }
    }
    save_safetensors(&tensors, &dir.join(WEIGHTS_FILE))?;
    let mut cfg = AdapterConfig::for_spec(spec, base_model_name_or_path);
    cfg.init_lora_weights = init.peft_value();
    if image_text {
        // LLaMA-Factory's pattern for a model with a vision tower: the leaf names anywhere but in the vision tower
        // (a plain list would make PEFT wrap the tower's q_proj, k_proj, … too).
        cfg.target_modules = Value::String(format!(
            "^(?!.*vision_tower).*(?:{}).*",
            spec.targets.leaves().join("|")
        ));
    }
    write_config(&cfg, dir)
}

fn write_config(cfg: &AdapterConfig, dir: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(cfg).map_err(|e| EngineError::Json {
        context: CONFIG_FILE.into(),
        source: e,
    })?;
    crate::fsutil::write_file(&dir.join(CONFIG_FILE), text + "\n")
        .map_err(|e| EngineError::io(format!("writing {}", dir.join(CONFIG_FILE).display()), e))
}

/// The start of the PiSSA adapter `trained` over `model`'s weights (the base it was trained on, not yet made the
/// residual), as LLaMA-Factory's `pissa_init/` holds it: A₀ and B₀ of each adapted weight, decomposed again
/// exactly as training did (same rank, scale, SVD and seeds), written to `out` as a plain adapter under the trained
/// file's tensor names. With it [`convert_pissa`] converts an adapter trained without `pissa_convert`.
pub fn pissa_start(model: &Model, trained: &Path, out: &Path) -> Result<()> {
    let ad = read_adapter(trained, &candle_core::Device::Cpu)?;
    let LoraInit::Pissa { niter } = ad.init else {
        return Err(adapter_err(trained, "not a PiSSA adapter"));
    };
    let scale = ad.config.scale();
    let mut tensors = HashMap::new();
    for lin in model.linears() {
        if !ad.pairs.contains_key(&lin.name) {
            continue;
        }
        let super::model::Weight::Frozen(w) = &lin.weight else {
            return Err(adapter_err(
                trained,
                format!(
                    "`{}` of the base is not a float weight to decompose",
                    lin.name
                ),
            ));
        };
        let d = super::pissa::decompose(w, ad.config.r, scale, niter, &lin.name)?;
        let module = super::arch::checkpoint_name(model.cfg.image_text, &lin.name);
        tensors.insert(format!("{PREFIX}{module}.lora_A.weight"), d.a);
        tensors.insert(format!("{PREFIX}{module}.lora_B.weight"), d.b);
    }
    std::fs::create_dir_all(out)
        .map_err(|e| EngineError::io(format!("creating {}", out.display()), e))?;
    save_safetensors(&tensors, &out.join(WEIGHTS_FILE))?;
    let mut cfg = ad.config;
    cfg.init_lora_weights = Value::Bool(true);
    write_config(&cfg, out)
}

/// PEFT's PiSSA-to-LoRA conversion (`save_pretrained(path_initial_model_for_weight_conversion=…)`, LLaMA-Factory's
/// `pissa_convert`): the trained PiSSA adapter `trained` and its start `initial` (saved as a plain adapter) give
/// `ΔW = s·(B·A − B₀·A₀) = s·[B | −B₀]·[A ; A₀]`, a plain LoRA of rank 2r on the original base, written to `out`
/// with `lora_alpha` doubled (×√2 with rsLoRA) so the scale is unchanged; DoRA magnitudes are kept as trained.
pub fn convert_pissa(trained: &Path, initial: &Path, out: &Path) -> Result<()> {
    let cpu = candle_core::Device::Cpu;
    let (config, init) = read_adapter_config(trained)?;
    let (start_config, start_init) = read_adapter_config(initial)?;
    if init == LoraInit::Default {
        return Err(adapter_err(
            trained,
            "not a PiSSA adapter (`init_lora_weights` is not pissa…): it needs no conversion",
        ));
    }
    if start_init != LoraInit::Default || start_config.r != config.r {
        return Err(adapter_err(
            initial,
            format!(
                "not the start of {} (it must be a plain adapter of the same rank, as LLaMA-Factory's pissa_init/ is)",
                trained.display()
            ),
        ));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| EngineError::io(format!("creating {}", out.display()), e))?;
    // The tensors under their names in the files (an image-and-text model's keep their `language_model.` part).
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &cpu)
            .map_err(|e| adapter_err(dir, format!("cannot read {WEIGHTS_FILE}: {e}")))
    };
    let (now, then) = (load(trained)?, load(initial)?);
    let mut tensors = HashMap::new();
    for (name, t) in now {
        let t = t.to_dtype(DType::F32)?;
        let is_a = name.ends_with(".lora_A.weight");
        if !is_a && !name.ends_with(".lora_B.weight") {
            tensors.insert(name, t);
            continue;
        }
        let t0 = then
            .get(&name)
            .ok_or_else(|| {
                adapter_err(
                    initial,
                    format!("`{name}` is missing; it is the start of another adapter"),
                )
            })?
            .to_dtype(DType::F32)?;
        let joined = if is_a {
            Tensor::cat(&[&t, &t0], 0)?
        } else {
            Tensor::cat(&[&t, &t0.neg()?], 1)?
        };
        tensors.insert(name, joined);
    }
    save_safetensors(&tensors, &out.join(WEIGHTS_FILE))?;
    let mut cfg = config;
    cfg.r *= 2;
    cfg.lora_alpha *= if cfg.use_rslora {
        std::f64::consts::SQRT_2
    } else {
        2.0
    };
    cfg.init_lora_weights = Value::Bool(true);
    write_config(&cfg, out)
}

/// Merge an adapter into the frozen base weights: `W ← W + s·B·A`, DoRA's rescaled row by row
/// ([`super::layer::lora_merged`]), in f32, stored back in the model dtype.
pub fn merge_adapter(model: &mut Model, dir: &Path) -> Result<()> {
    let (dev, dtype) = (model.device.clone(), model.dtype);
    let ad = read_adapter(dir, &dev)?;
    ad.check(model)?;
    ad.prepare_base(model)?;
    let scale = ad.config.scale();
    for (m, (a, b)) in &ad.pairs {
        let lin = model
            .linear_mut(m)
            .ok_or_else(|| adapter_err(dir, format!("module `{m}` missing")))?;
        let w = lin.weight.detached()?;
        // A quantized base is dequantized: the merged weight is dense, in the model dtype.
        let merged = super::layer::lora_merged(
            &w,
            &a.to_dtype(DType::F32)?,
            &b.to_dtype(DType::F32)?,
            scale,
            ad.magnitudes.get(m),
        )?
        .to_dtype(dtype)?;
        match &lin.weight {
            super::model::Weight::Frozen(_)
            | super::model::Weight::Quantized(_)
            | super::model::Weight::Bnb4(_) => {
                lin.weight = super::model::Weight::Frozen(merged);
            }
            super::model::Weight::Trainable(v) => v.set(&merged)?,
        }
    }
    Ok(())
}

/// Load an adapter as the model's trainable LoRA (resume training), replacing fresh init. The model must not
/// already carry a LoRA.
pub fn load_adapter_trainable(model: &mut Model, dir: &Path) -> Result<()> {
    let dev = model.device.clone();
    let ad = read_adapter(dir, &dev)?;
    ad.check(model)?;
    if model.lora.is_some() {
        return Err(EngineError::Invalid(
            "the model already has a trainable LoRA".into(),
        ));
    }
    ad.prepare_base(model)?;
    // The modules the file adapts, by leaf name: PEFT's `target_modules` may be leaf names, full module paths
    // (PEFT 0.21 writes those for "all-linear") or a regex, and the tensors say the same in every case.
    let mut leaves: Vec<&str> = ad
        .pairs
        .keys()
        .map(|m| m.rsplit('.').next().unwrap_or(m))
        .collect();
    leaves.sort_unstable();
    leaves.dedup();
    let targets = LoraTargets::parse(&leaves.join(",")).map_err(|e| {
        adapter_err(
            dir,
            format!("{e}: termtune adapts only the decoder's linear layers"),
        )
    })?;
    let spec = LoraSpec {
        r: ad.config.r,
        alpha: ad.config.lora_alpha,
        dropout: ad.config.lora_dropout as f32,
        targets,
        use_rslora: ad.config.use_rslora,
        use_dora: ad.config.use_dora,
        seed: 0,
        init: ad.init,
    };
    let dt = model.lora_dtype();
    let scale = spec.scale();
    let mut made = Vec::new();
    for (m, (a, b)) in &ad.pairs {
        let av = Var::from_tensor(&a.to_dtype(dt)?)?;
        let bv = Var::from_tensor(&b.to_dtype(dt)?)?;
        let mv = match ad.magnitudes.get(m) {
            Some(t) => Some(Var::from_tensor(&t.to_dtype(dt)?)?),
            None => None,
        };
        if let Some(lin) = model.linear_mut(m) {
            lin.lora = Some(LoraPair {
                a: av.clone(),
                b: bv.clone(),
                scale,
                dropout: spec.dropout,
                dora: mv.clone().map(|magnitude| Dora {
                    magnitude,
                    fixed: None,
                }),
            });
        }
        made.push((m.clone(), av, bv, mv));
    }
    {
        let mut data = model
            .lora_vars
            .data()
            .lock()
            .map_err(|_| EngineError::Invalid("lora varmap poisoned".into()))?;
        for (m, av, bv, mv) in made {
            data.insert(format!("{PREFIX}{m}.lora_A.weight"), av);
            data.insert(format!("{PREFIX}{m}.lora_B.weight"), bv);
            if let Some(mv) = mv {
                data.insert(format!("{PREFIX}{m}.lora_magnitude_vector"), mv);
            }
        }
    }
    model.lora = Some(spec);
    Ok(())
}

/// Split LLaMA-Factory's `adapter_name_or_path` (`a,b,c`) into folders.
pub fn parse_adapter_list(s: &str) -> Vec<PathBuf> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// Inference: merge every adapter of the list into the base, in order (as LLaMA-Factory does).
pub fn merge_adapters(model: &mut Model, dirs: &[PathBuf]) -> Result<()> {
    for d in dirs {
        merge_adapter(model, d)?;
    }
    Ok(())
}

/// Inference over a frozen base (chat, a preference stage's reference): the adapters `dirs` merged into it, in
/// order, except that a single adapter over a quantized base stays beside it unmerged, as PEFT runs a QLoRA
/// adapter (merging would make the base's layers dense). `note` hears which it was. Returns whether the adapters
/// were merged.
pub fn apply_adapters(
    model: &mut Model,
    dirs: &[PathBuf],
    quantized_base: bool,
    note: &mut dyn FnMut(String),
) -> Result<bool> {
    match dirs {
        [] => Ok(true),
        [one] if quantized_base => {
            note("applying the adapter beside the quantized base (unmerged)".into());
            load_adapter_trainable(model, one)?;
            model.fix_dora()?;
            Ok(false)
        }
        _ => {
            note(format!(
                "merging {} adapter(s){}",
                dirs.len(),
                if quantized_base {
                    " into the dequantized base (several adapters: the merged layers are dense)"
                } else {
                    ""
                }
            ));
            merge_adapters(model, dirs)?;
            Ok(true)
        }
    }
}

/// Training: merge all but the last adapter, resume the last one as the trainable LoRA
/// (LLaMA-Factory without `create_new_adapter`).
pub fn load_adapters_for_training(model: &mut Model, dirs: &[PathBuf]) -> Result<()> {
    if let Some((last, rest)) = dirs.split_last() {
        merge_adapters(model, rest)?;
        load_adapter_trainable(model, last)?;
    }
    Ok(())
}
