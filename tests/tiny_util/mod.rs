//! Fixtures shared by the tests that train or chat with the tiny seeded model: the model folder and a
//! toy alpaca dataset registered as `toy` in `dataset_info.json`.

use std::path::Path;

use candle_core::Tensor;
use serde_json::{Value, json};
use termtune::engine::testing::{TinyOpts, tiny_llama};

/// Writes the tiny llama (seed 7) to `root/model` and `rows` as dataset `toy` in `root/data`.
pub fn tiny_model_and_toy_data(root: &Path, rows: &[Value]) {
    tiny_llama(&root.join("model"), 7, &TinyOpts::default()).unwrap();
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("toy.json"), serde_json::to_string(rows).unwrap()).unwrap();
    std::fs::write(
        data.join("dataset_info.json"),
        r#"{"toy": {"file_name": "toy.json"}}"#,
    )
    .unwrap();
}

/// `n` examples of varied lengths ("say i abc…" → "ok 7i xyz…").
pub fn varied_rows(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "instruction": format!("say {i} {}", "abc".repeat(i % 3 + 1)),
                "input": "",
                "output": format!("ok {} {}", i * 7, "xyz".repeat(i % 4 + 1)),
            })
        })
        .collect()
}

/// `n` examples ("say i") that all answer `output`.
pub fn same_answer_rows(n: usize, output: &str) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"instruction": format!("say {i}"), "input": "", "output": output}))
        .collect()
}

/// The largest absolute difference of two f32 tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
