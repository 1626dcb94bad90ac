//! bitsandbytes' 4-bit quantization (`quantization_bit: 4`): quantize → dequantize against
//! `tests/fixtures/nf4_reference.json` (written by `scripts/nf4_reference.py`, a numpy transcription of
//! bitsandbytes' `quantize_4bit` / `dequantize_4bit` that the script compares with bitsandbytes itself), bit for bit:
//! packed codes, absmax (plain, or the double-quantized codes, second-level absmax and offset) and every
//! dequantized value; NF4 and FP4, double quantization on and off, a short last block.

use candle_core::{DType, Device, Tensor};
use termtune::engine::bnb4::{self, Bnb4Tensor, FourBit, HostAbsmax};

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/nf4_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn hex_f32(s: &str) -> Vec<f32> {
    (0..s.len())
        .step_by(8)
        .map(|i| f32::from_bits(u32::from_str_radix(&s[i..i + 8], 16).unwrap()))
        .collect()
}

fn hex_bf16(s: &str) -> Vec<f32> {
    (0..s.len())
        .step_by(4)
        .map(|i| f32::from_bits(u32::from_str_radix(&s[i..i + 4], 16).unwrap() << 16))
        .collect()
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn first_difference(a: &[u32], b: &[u32]) -> Option<(usize, u32, u32)> {
    a.iter()
        .zip(b)
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| (i, *x, *y))
}

fn kind(case: &serde_json::Value) -> FourBit {
    match case["quant_type"].as_str().unwrap() {
        "nf4" => FourBit::Nf4,
        "fp4" => FourBit::Fp4,
        other => panic!("quant_type {other}"),
    }
}

#[test]
fn code_tables_are_bitsandbytes() {
    let f = fixture();
    let codes = |k: &str| -> Vec<f32> {
        f[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    assert_eq!(bits(&codes("nf4_code")), bits(&bnb4::NF4));
    assert_eq!(bits(&codes("fp4_code")), bits(&bnb4::FP4));
    let map = hex_f32(f["dynamic_map_bits"].as_str().unwrap());
    assert_eq!(bits(&map), bits(&bnb4::dynamic_map()));
    assert!(
        map.windows(2).all(|w| w[0] < w[1]),
        "the dynamic map is ascending"
    );
}

#[test]
fn quantize_and_dequantize_equal_the_bitsandbytes_reference_bit_for_bit() {
    let f = fixture();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let x = hex_bf16(case["input_bf16_bits"].as_str().unwrap());
        let double = case["double_quant"].as_bool().unwrap();
        let k = kind(case);
        let p = bnb4::quantize(&x, k, double).unwrap();
        assert_eq!(
            p.packed,
            hex_bytes(case["packed"].as_str().unwrap()),
            "{name}: packed codes"
        );
        match &p.absmax {
            HostAbsmax::Plain(a) => {
                assert!(!double, "{name}");
                assert_eq!(
                    bits(a),
                    bits(&hex_f32(case["absmax_bits"].as_str().unwrap())),
                    "{name}: absmax"
                );
            }
            HostAbsmax::Double { q, absmax2, offset } => {
                assert!(double, "{name}");
                assert_eq!(
                    *q,
                    hex_bytes(case["qabsmax"].as_str().unwrap()),
                    "{name}: qabsmax"
                );
                assert_eq!(
                    bits(absmax2),
                    bits(&hex_f32(case["absmax2_bits"].as_str().unwrap())),
                    "{name}: absmax2"
                );
                assert_eq!(
                    offset.to_bits(),
                    hex_f32(case["offset_bits"].as_str().unwrap())[0].to_bits(),
                    "{name}: offset"
                );
            }
        }
        let want = bits(&hex_f32(case["dequantized_bits"].as_str().unwrap()));
        let got = bits(&bnb4::dequantize(&p, k, x.len()));
        assert_eq!(
            first_difference(&got, &want),
            None,
            "{name}: dequantized (index, ours, reference)"
        );
        assert_eq!(got.len(), want.len());

        // The device tensor: the CPU loop and the candle-op path (what a GPU runs) give the same values, from an
        // f32 or a bf16 input.
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let t = Tensor::from_vec(x.clone(), (shape[0], shape[1]), &Device::Cpu).unwrap();
        for input in [t.clone(), t.to_dtype(DType::BF16).unwrap()] {
            let q = Bnb4Tensor::quantize(&input, k, double).unwrap();
            assert_eq!(q.dims(), &shape[..]);
            for (path, d) in [
                ("cpu", q.dequantize().unwrap()),
                ("ops", q.dequantize_ops().unwrap()),
            ] {
                assert_eq!(d.dims(), &shape[..], "{name} {path}");
                let v = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(
                    first_difference(&bits(&v), &want),
                    None,
                    "{name}: {path} dequantize"
                );
            }
        }
    }
}

#[test]
fn packed_size_is_four_bits_plus_the_absmax() {
    let x: Vec<f32> = (0..64 * 512)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0)
        .collect();
    let t = Tensor::from_vec(x, (64, 512), &Device::Cpu).unwrap();
    let n = 64 * 512;
    let double = Bnb4Tensor::quantize(&t, FourBit::Nf4, true).unwrap();
    // 512 blocks: 1 byte each, 2 second-level absmax, one offset.
    assert_eq!(double.storage_size_in_bytes(), n / 2 + 512 + 2 * 4 + 4);
    let plain = Bnb4Tensor::quantize(&t, FourBit::Nf4, false).unwrap();
    assert_eq!(plain.storage_size_in_bytes(), n / 2 + 512 * 4);
}

#[test]
fn a_non_finite_weight_is_refused() {
    let mut x = vec![0.5f32; 128];
    x[70] = f32::NAN;
    let e = bnb4::quantize(&x, FourBit::Nf4, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("value 70") && e.contains("NaN"), "{e}");
}

#[test]
fn equal_absmax_everywhere_double_quantizes_exactly() {
    // Every block's absmax is 1: centred they are all 0, and the second-level absmax is 0.
    let x: Vec<f32> = (0..256)
        .map(|i| if i % 64 == 0 { 1.0 } else { 0.25 })
        .collect();
    let p = bnb4::quantize(&x, FourBit::Nf4, true).unwrap();
    assert_eq!(p.absmax.values(), vec![1.0; 4]);
}

// ------------------------------------------------------------------------------------------- LoRA over a 4-bit base

fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    crate::tiny_util::max_abs_diff(a, b) / crate::tiny_util::max_abs(b)
}

/// The 4-bit linear is the product with the dequantized weight, forward and backward (dX only), in f32 and bf16.
#[test]
fn bnb4_linear_is_the_product_with_the_dequantized_weight() {
    use std::sync::Arc;
    use termtune::engine::ops;
    let w = Tensor::randn(0f32, 0.05, (96, 200), &Device::Cpu).unwrap();
    for (kind, double) in [(FourBit::Nf4, true), (FourBit::Fp4, false)] {
        let q = Arc::new(Bnb4Tensor::quantize(&w, kind, double).unwrap());
        let wd = q.dequantize().unwrap();
        for dt in [DType::F32, DType::BF16] {
            let x0 = Tensor::randn(0f32, 1.0, (3, 5, 200), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let x = candle_core::Var::from_tensor(&x0).unwrap();
            let gy = Tensor::randn(0f32, 1.0, (3, 5, 96), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let wdt = wd.to_dtype(dt).unwrap();
            let y = ops::bnb4_linear(x.as_tensor(), &q).unwrap();
            assert_eq!((y.dims(), y.dtype()), (&[3, 5, 96][..], dt));
            let want = x0.broadcast_matmul(&wdt.t().unwrap()).unwrap();
            let f32_ = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            assert!(
                rel_diff(&f32_(&y), &f32_(&want)) < 1e-6,
                "{kind:?} {dt:?} forward"
            );
            // Untracked input: the same product.
            let y2 = ops::bnb4_linear(&x0, &q).unwrap();
            assert!(rel_diff(&f32_(&y2), &f32_(&want)) < 1e-6);
            let g = (y.to_dtype(DType::F32).unwrap() * f32_(&gy))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            let want = gy.broadcast_matmul(&wdt).unwrap();
            assert!(
                rel_diff(&f32_(dx), &f32_(&want)) < 1e-6,
                "{kind:?} {dt:?} backward"
            );
        }
    }
}

/// LoRA over a 4-bit base: loss and gradients equal those over a dense base holding the dequantized weights (the
/// 4-bit forward is an exact product with them), with the hand-written layer backward and the graph backward,
/// with the fused CPU kernels and the generic ones a GPU runs; the base stays 4-bit.
#[test]
fn lora_gradients_over_a_4bit_base_equal_the_dequantized_base() {
    use termtune::engine::memory::BaseStorage;
    use termtune::engine::model::Weight;
    use termtune::engine::ops::Backend;
    use termtune::engine::testing::{TinyOpts, tiny_llama};
    use termtune::engine::weights::{load_hf_folder, load_hf_folder_with};
    use termtune::engine::{AttnMask, Finetune, LoraSpec, LoraTargets, Model};
    let dir = tempfile::tempdir().unwrap();
    let opts = TinyOpts {
        hidden_size: 128,
        intermediate_size: 320,
        ..TinyOpts::default()
    };
    tiny_llama(dir.path(), 41, &opts).unwrap();
    let mut quant = load_hf_folder(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let nf4 = BaseStorage::Bnb4(FourBit::Nf4, true);
    let n = quant.quantize_linears(nf4, &Device::Cpu).unwrap();
    assert_eq!(n, 7 * opts.num_layers);
    assert_eq!(quant.bnb4.len(), n);
    assert!(quant.tensors.contains_key("model.embed_tokens.weight"));
    // Quantized as read, weight by weight (what `quantization_bit: 4` does): the same 4-bit weights.
    let streamed = load_hf_folder_with(dir.path(), DType::F32, &Device::Cpu, nf4).unwrap();
    assert_eq!(streamed.bnb4.len(), n);
    assert_eq!(streamed.tensors.len(), quant.tensors.len());
    for (name, q) in &quant.bnb4 {
        let (a, b) = (
            q.dequantize().unwrap(),
            streamed.bnb4[name].dequantize().unwrap(),
        );
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        assert_eq!(
            q.storage_size_in_bytes(),
            streamed.bnb4[name].storage_size_in_bytes()
        );
    }
    let mut dense = load_hf_folder(dir.path(), DType::F32, &Device::Cpu).unwrap();
    for (name, q) in &quant.bnb4 {
        dense.tensors.insert(name.clone(), q.dequantize().unwrap());
    }
    let ft = Finetune::Lora(LoraSpec {
        r: 4,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 7,
        init: Default::default(),
    });
    let ids: Vec<u32> = (0..2 * 16u32).map(|i| (i * 29 + 3) % 300).collect();
    let input = Tensor::from_vec(ids.clone(), (2, 16), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec(
        ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(),
        (2, 16),
        &Device::Cpu,
    )
    .unwrap();
    for generic in [false, true] {
        for manual in [true, false] {
            let grads = |files| {
                let mut m = Model::from_files(files, DType::F32, &Device::Cpu, &ft).unwrap();
                m.manual_backward = manual;
                // Non-zero B (as after some training), so A gets a gradient too; same values in both.
                for (i, (name, v)) in m.trainable_vars().iter().enumerate() {
                    if name.ends_with("lora_B.weight") {
                        let n: usize = v.dims().iter().product();
                        let vals: Vec<f32> = (0..n)
                            .map(|j| ((j * 13 + i * 7) % 23) as f32 / 23.0 - 0.5)
                            .collect();
                        v.set(&Tensor::from_vec(vals, v.dims(), &Device::Cpu).unwrap())
                            .unwrap();
                    }
                }
                let run = || {
                    let (loss, n) = m
                        .forward_loss(&input, &AttnMask::Causal, &labels, true)
                        .unwrap();
                    let loss = (loss / n as f64).unwrap();
                    let g = loss.backward().unwrap();
                    let v: Vec<Tensor> = m
                        .trainable_vars()
                        .iter()
                        .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
                        .collect();
                    (loss.to_scalar::<f32>().unwrap(), v)
                };
                let out = if generic {
                    Backend::generic_only(run)
                } else {
                    run()
                };
                for l in &m.layers {
                    assert!(matches!(l.q.weight, Weight::Bnb4(_)) == !files.bnb4.is_empty());
                }
                out
            };
            let (lq, gq) = grads(&quant);
            let (ld, gd) = grads(&dense);
            assert!((lq - ld).abs() <= 1e-6 * ld.abs(), "loss {lq} vs {ld}");
            let worst = gq
                .iter()
                .zip(&gd)
                .map(|(a, b)| rel_diff(a, b))
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "generic={generic} manual={manual}: {worst}");
        }
    }
}

/// The memory a 4-bit base's weights take: 4 bits per decoder-linear weight plus the absmax (f32 per 64, or with
/// double quantization a byte per 64 and an f32 per 256 blocks), the embeddings and norms dense.
#[test]
fn the_memory_estimate_counts_4bit_linears() {
    use termtune::engine::memory::{BaseStorage, base_weight_bytes};
    use termtune::engine::{Finetune, LoraSpec, LoraTargets};
    let cfg = crate::tiny_util::llama_8b_config();
    let ft = Finetune::Lora(LoraSpec {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        targets: LoraTargets::All,
        use_rslora: false,
        use_dora: false,
        seed: 0,
        init: Default::default(),
    });
    let dense = base_weight_bytes(&cfg, &ft, DType::BF16, BaseStorage::Dense);
    let linears: u64 = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336);
    let blocks = linears / 64;
    let plain = base_weight_bytes(
        &cfg,
        &ft,
        DType::BF16,
        BaseStorage::Bnb4(FourBit::Nf4, false),
    );
    assert_eq!(dense - plain, linears * 2 - (linears / 2 + 4 * blocks));
    let double = base_weight_bytes(
        &cfg,
        &ft,
        DType::BF16,
        BaseStorage::Bnb4(FourBit::Nf4, true),
    );
    assert_eq!(
        dense - double,
        linears * 2 - (linears / 2 + blocks + 4 * blocks / 256)
    );
    // The decoder linears are 87 % of an 8B llama and take 0.258x their bf16 bytes; the embedding and lm_head stay
    // bf16 (as bitsandbytes leaves them), so the whole base is 0.355x.
    let ratio = double as f64 / dense as f64;
    eprintln!("llama-8B base weights, 4-bit (double quantization) / bf16 = {ratio:.3}");
    assert!((0.35..0.36).contains(&ratio), "{ratio}");
    let linear_ratio = (linears / 2 + blocks + 4 * blocks / 256) as f64 / (2 * linears) as f64;
    assert!(linear_ratio < 0.26, "{linear_ratio}");
}

/// Decoding's product (a few rows, straight from the packed codes) equals the dequantized weight's, for each row
/// count either side of the fused path's limit.
#[test]
fn the_fused_few_row_product_equals_the_dequantized_product() {
    use std::sync::Arc;
    use termtune::engine::ops;
    let w = Tensor::randn(0f32, 0.05, (72, 320), &Device::Cpu).unwrap();
    for (kind, double) in [(FourBit::Nf4, true), (FourBit::Fp4, false)] {
        let q = Arc::new(Bnb4Tensor::quantize(&w, kind, double).unwrap());
        let wd = q.dequantize().unwrap();
        for m in [1, 3, bnb4::FUSED_MAX_ROWS, bnb4::FUSED_MAX_ROWS + 1] {
            let x = Tensor::randn(0f32, 1.0, (1, m, 320), &Device::Cpu).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let fused = q.matmul_t_few_rows(&xs, m).unwrap();
            assert_eq!(fused.is_some(), m <= bnb4::FUSED_MAX_ROWS, "m={m}");
            let y = ops::bnb4_linear(&x, &q).unwrap();
            assert_eq!(y.dims(), &[1, m, 72]);
            let want = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
            assert!(
                rel_diff(&y, &want) < 1e-5,
                "{kind:?} m={m}: {}",
                rel_diff(&y, &want)
            );
        }
    }
}
