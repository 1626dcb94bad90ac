//! GGML block types dequantized by termtune's GGUF loader (candle's dequantizers, which the kept-quantized
//! kernels and every dequantized load use) against gguf-py, llama.cpp's own Python package, bit for bit:
//! tests/fixtures/gguf_reference.json, made by `scripts/gguf_reference.py` (gguf 0.19).

use candle_core::quantized::GgmlDType;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use termtune::engine::gguf::{load_gguf, load_gguf_quantized};

const CPU: Device = Device::Cpu;

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ggml_type(name: &str) -> GgmlDType {
    match name {
        "Q4_0" => GgmlDType::Q4_0,
        "Q4_1" => GgmlDType::Q4_1,
        "Q5_0" => GgmlDType::Q5_0,
        "Q5_1" => GgmlDType::Q5_1,
        "Q8_0" => GgmlDType::Q8_0,
        "Q2_K" => GgmlDType::Q2K,
        "Q3_K" => GgmlDType::Q3K,
        "Q4_K" => GgmlDType::Q4K,
        "Q5_K" => GgmlDType::Q5K,
        "Q6_K" => GgmlDType::Q6K,
        other => panic!("fixture names an unknown type {other}"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn sha256_f32(v: &[f32]) -> String {
    let mut h = Sha256::new();
    for x in v {
        h.update(x.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Random blocks of every type termtune reads: random codes reach every bit of every field (scales, minimums,
/// the 6-bit packed K-quant scales, the high bits of Q5/Q6/Q3), which a real tensor may not.
#[test]
fn random_blocks_of_every_block_type_dequantize_as_gguf_py_bit_for_bit() {
    let f = fixture();
    let cases = f["random"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for c in cases {
        let name = c["type"].as_str().unwrap();
        let bytes = unhex(c["bytes"].as_str().unwrap());
        let want: Vec<f32> = c["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let q = qtensor_from_ggml(ggml_type(name), &bytes, vec![want.len()], &CPU).unwrap();
        let got = values(&q.dequantize(&CPU).unwrap());
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} value {i}: {g} vs gguf-py {w}"
            );
        }
    }
}

/// Real tensors of the SmolLM2 Q4_1 file (its Q8_0 embedding, Q4_1 linears of the first and last layers), kept
/// quantized then dequantized and loaded dequantized: every value equals gguf-py's (SHA-256 of the f32 bytes).
#[test]
fn smollm2_tensors_dequantize_as_gguf_py_bit_for_bit() {
    let f = fixture();
    let path = termtune::testing::smollm2_gguf();
    let kept = load_gguf_quantized(&path, DType::F32, &CPU).unwrap();
    let dense = load_gguf(&path, DType::F32, &CPU).unwrap();
    let hf_name = |gguf: &str| match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".to_string(),
        "blk.0.attn_v.weight" => "model.layers.0.self_attn.v_proj.weight".to_string(),
        "blk.0.ffn_down.weight" => "model.layers.0.mlp.down_proj.weight".to_string(),
        "blk.29.ffn_gate.weight" => "model.layers.29.mlp.gate_proj.weight".to_string(),
        other => panic!("fixture names {other}"),
    };
    let real = f["real"].as_array().unwrap();
    assert_eq!(real.len(), 4);
    for r in real {
        let name = hf_name(r["name"].as_str().unwrap());
        let q = &kept.quantized[&name];
        assert_eq!(
            format!("{:?}", q.dtype()),
            r["type"].as_str().unwrap().replace("_K", "K")
        );
        let from_blocks = values(&q.dequantize(&CPU).unwrap());
        let loaded = values(&dense.tensors[&name]);
        assert_eq!(
            from_blocks.len() as u64,
            r["values"].as_u64().unwrap(),
            "{name}"
        );
        let first: Vec<f32> = r["first"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&from_blocks[..8], first.as_slice(), "{name}");
        let want = r["sha256"].as_str().unwrap();
        assert_eq!(
            sha256_f32(&from_blocks),
            want,
            "{name}: kept quantized, dequantized"
        );
        assert_eq!(sha256_f32(&loaded), want, "{name}: loaded dequantized");
    }
}
