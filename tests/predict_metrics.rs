//! termtune's predict metrics against the Python libraries LLaMA-Factory uses (jieba, rouge-chinese, nltk), on
//! the fixed strings of tests/fixtures/predict_metrics_reference.json (made by
//! scripts/predict_metrics_reference.py with LF 0.9.5's per-example code).

use termtune::predict::metrics::{Scores, jieba_cut, mean, scores};

fn reference() -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/predict_metrics_reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn jieba_cuts_like_python_jieba() {
    for row in reference()["rows"].as_array().unwrap() {
        for (text, key) in [("predict", "jieba_prediction"), ("label", "jieba_label")] {
            let want: Vec<&str> = row[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(jieba_cut(row[text].as_str().unwrap()), want, "{row}");
        }
    }
}

#[test]
fn rouge_and_bleu_equal_llamafactory_per_example_and_in_the_mean() {
    let r = reference();
    let mut all = Vec::new();
    for row in r["rows"].as_array().unwrap() {
        let got = scores(
            row["predict"].as_str().unwrap(),
            row["label"].as_str().unwrap(),
        );
        let want = Scores {
            rouge1: num(row, "rouge-1"),
            rouge2: num(row, "rouge-2"),
            rouge_l: num(row, "rouge-l"),
            bleu4: num(row, "bleu-4"),
        };
        for (name, g, w) in [
            ("rouge-1", got.rouge1, want.rouge1),
            ("rouge-2", got.rouge2, want.rouge2),
            ("rouge-l", got.rouge_l, want.rouge_l),
            ("bleu-4", got.bleu4, want.bleu4),
        ] {
            assert!(
                (g - w).abs() <= 1e-6,
                "{name}: termtune {g}, LF {w} for {row}"
            );
        }
        all.push(got);
    }
    let m = mean(&all);
    let want = &r["mean"];
    for (g, key) in [
        (m.rouge1, "rouge-1"),
        (m.rouge2, "rouge-2"),
        (m.rouge_l, "rouge-l"),
        (m.bleu4, "bleu-4"),
    ] {
        assert!(
            (g - num(want, key)).abs() <= 1e-6,
            "{key}: {g} vs {}",
            want[key]
        );
    }
}
