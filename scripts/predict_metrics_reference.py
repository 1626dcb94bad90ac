#!/usr/bin/env python3
"""Reference scores for termtune's predict metrics (tests/fixtures/predict_metrics_reference.json).

The per-example code of LLaMA-Factory 0.9.5's ComputeSimilarity (src/llamafactory/train/sft/metric.py), on fixed
(prediction, label) strings: ROUGE-1/2/L over jieba tokens with rouge-chinese, BLEU-4 over characters with nltk's
smoothing method 3, each ×100 and rounded to 4 places, then the mean. Needs `pip install jieba rouge-chinese nltk`.
Run: python3 scripts/predict_metrics_reference.py > tests/fixtures/predict_metrics_reference.json
"""
import json
from importlib.metadata import version

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

jieba.setLogLevel(60)

PAIRS = [
    ("The capital of France is Paris.", "Paris is the capital of France."),
    ("I am an AI assistant developed by termtune.", "I am an AI assistant developed by termtune."),
    ("Hello! How can I help you today?", "Hi! How may I assist you? Ask me anything."),
    ("", "A non-empty label."),
    ("Some prediction.", ""),
    ("   ", "whitespace only prediction"),
    ("北京是中国的首都。", "中国的首都是北京。"),
    ("我是一个人工智能助手，很高兴为您服务！", "您好，我是人工智能助手。有什么可以帮您？"),
    ("Mixed 中文 and English text, 3.14 and 50% too.", "Mixed text: 中文 with English, 3.14 and 50%."),
    ("the the the the the the the", "the cat is on the mat"),
    ("Step 1: boil water... Step 2: add pasta......then wait", "Boil water. Add pasta. Wait!"),
    ("a", "a"),
    ("yes", "no"),
    ("Line one.\nLine two?\nLine three!", "Line one. Line two? Line three!"),
    ("“引号”测试？是的！", "引号测试。是的。"),
]


def scores(pred: str, label: str) -> dict:
    hypothesis = list(jieba.cut(pred))
    reference = list(jieba.cut(label))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(reference).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        rouge = Rouge()
        result = rouge.get_scores(" ".join(hypothesis), " ".join(reference))[0]
    out = {k: round(v["f"] * 100, 4) for k, v in result.items()}
    bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
    out["bleu-4"] = round(bleu * 100, 4)
    out["jieba_prediction"] = hypothesis
    out["jieba_label"] = reference
    return out


rows = [{"predict": p, "label": l, **scores(p, l)} for p, l in PAIRS]
means = {k: float(np.mean([r[k] for r in rows])) for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")}
print(json.dumps({
    "note": "LLaMA-Factory 0.9.5 ComputeSimilarity per example on fixed strings; made by "
            "scripts/predict_metrics_reference.py",
    "tools": {p: version(p) for p in ("jieba", "rouge-chinese", "nltk", "numpy")},
    "rows": rows,
    "mean": means,
}, ensure_ascii=False, indent=1))
