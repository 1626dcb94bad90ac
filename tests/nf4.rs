//! bitsandbytes' 4-bit quantization (`quantization_bit: 4`): quantize → dequantize against
//! `tests/fixtures/nf4_reference.json` (written by `scripts/nf4_reference.py`, a numpy transcription of
//! bitsandbytes' `quantize_4bit` / `dequantize_4bit` that the script compares with bitsandbytes itself), bit for bit:
//! packed codes, absmax (plain, or the double-quantized codes, second-level absmax and offset) and every
//! dequantized value; NF4 and FP4, double quantization on and off, a short last block.

use candle_core::{DType, Device, Tensor};
use termtune::engine::bnb4::{self, Bnb4Tensor, FourBit, HostAbsmax};

fn fixture() -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nf4_reference.json");
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
    assert!(map.windows(2).all(|w| w[0] < w[1]), "the dynamic map is ascending");
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
                assert_eq!(*q, hex_bytes(case["qabsmax"].as_str().unwrap()), "{name}: qabsmax");
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
        assert_eq!(first_difference(&got, &want), None, "{name}: dequantized (index, ours, reference)");
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
            for (path, d) in [("cpu", q.dequantize().unwrap()), ("ops", q.dequantize_ops().unwrap())] {
                assert_eq!(d.dims(), &shape[..], "{name} {path}");
                let v = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(first_difference(&bits(&v), &want), None, "{name}: {path} dequantize");
            }
        }
    }
}

#[test]
fn packed_size_is_four_bits_plus_the_absmax() {
    let x: Vec<f32> = (0..64 * 512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
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
    let e = bnb4::quantize(&x, FourBit::Nf4, true).unwrap_err().to_string();
    assert!(e.contains("value 70") && e.contains("NaN"), "{e}");
}

#[test]
fn equal_absmax_everywhere_double_quantizes_exactly() {
    // Every block's absmax is 1: centred they are all 0, and the second-level absmax is 0.
    let x: Vec<f32> = (0..256).map(|i| if i % 64 == 0 { 1.0 } else { 0.25 }).collect();
    let p = bnb4::quantize(&x, FourBit::Nf4, true).unwrap();
    assert_eq!(p.absmax.values(), vec![1.0; 4]);
}
