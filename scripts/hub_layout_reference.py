#!/usr/bin/env python3
"""Reference for termtune's choice of a hub dataset's data files: writes tests/fixtures/hub_layouts.json.

Each case is a repository layout (file names, the dataset card's front matter) and LLaMA-Factory's `subset` /
`folder`; the expected answer is what Hugging Face `datasets` resolves for `load_dataset(repo, name=subset,
data_dir=folder)`: the data files of each split (`load_dataset_builder(...).config.data_files`), computed here
on the layout written to a local folder (the same resolution as for a Hub repository), or the error it raises.

Usage: python scripts/hub_layout_reference.py   (pip install datasets)
"""

import json
import os
import shutil
import tempfile

import datasets

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hub_layouts.json")

CONFIGS = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: chat
  data_files:
  - split: train
    path: chat/*.jsonl
- config_name: extra
  data_dir: more
  data_files: "*.csv"
---
# card
"""

ONE_CONFIG = """---
license: mit
configs:
- config_name: only
  data_files: "sft/*.json"
---
"""

CASES = [
    ("root_json", ["alpaca_data_en_52k.json", "README.md", ".gitattributes"], None, None, None),
    ("push_to_hub_shards", ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                            "data/test-00000-of-00001.parquet", "README.md"], None, None, None),
    ("split_in_file_names", ["train.jsonl", "valid.jsonl", "my_test-01.jsonl", "notes.txt"], None, None, None),
    ("split_in_dir_names", ["train/a.json", "train/b.json", "dev/c.json", "other/d.json"], None, None, None),
    ("all_files_train", ["part1.jsonl", "sub/part2.jsonl", "__pycache__/x.jsonl", ".hidden/y.jsonl"], None, None, None),
    ("mixed_types", ["a.parquet", "b.parquet", "c.csv"], None, None, None),
    ("folder", ["en/train.json", "en/test.json", "zh/train.json"], None, None, "zh"),
    ("configs_default", ["data/train-0.parquet", "data/test-0.parquet", "chat/x.jsonl", "more/y.csv"],
     CONFIGS, None, None),
    ("configs_subset", ["data/train-0.parquet", "data/test-0.parquet", "chat/x.jsonl", "chat/y.jsonl",
                        "more/y.csv"], CONFIGS, "chat", None),
    ("configs_data_dir", ["data/train-0.parquet", "data/test-0.parquet", "chat/x.jsonl", "more/y.csv",
                          "more/z.csv", "w.csv"],
     CONFIGS, "extra", None),
    ("configs_only_one", ["sft/a.json", "sft/b.json", "other.json"], ONE_CONFIG, None, None),
    ("configs_unknown_subset", ["data/train-0.parquet", "data/test-0.parquet", "chat/x.jsonl", "more/y.csv"],
     CONFIGS, "nope", None),
    ("configs_no_default", ["chat/x.jsonl", "sft/a.json"],
     "---\nconfigs:\n- config_name: a\n  data_files: chat/*.jsonl\n- config_name: b\n  data_files: sft/*.json\n---\n",
     None, None),
    ("card_without_configs", ["train.csv", "test.csv"], "---\nlicense: apache-2.0\n---\n", None, None),
]


def content(name):
    if name.endswith(".parquet"):
        return None
    if name.endswith(".csv"):
        return "instruction,output\na,b\n"
    return '{"instruction": "a", "output": "b"}\n'


def main():
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for name, files, readme, subset, folder in CASES:
        root = tempfile.mkdtemp()
        for f in files:
            path = os.path.join(root, f)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if f == "README.md":
                continue
            body = content(f)
            if body is None:
                pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}]), path)
            else:
                with open(path, "w") as fh:
                    fh.write(body)
        listed = [f for f in files if f != "README.md"]
        if readme is not None or "README.md" in files:
            with open(os.path.join(root, "README.md"), "w") as fh:
                fh.write(readme or "# card\n")
            listed.append("README.md")
        case = {"name": name, "files": sorted(listed), "readme": readme, "subset": subset, "folder": folder}
        try:
            b = datasets.load_dataset_builder(root, name=subset, data_dir=folder)
            splits = {}
            for split, paths in b.config.data_files.items():
                splits[str(split)] = sorted(os.path.relpath(str(p), root) for p in paths)
            case["splits"] = splits
        except Exception as e:  # noqa: BLE001 - the reference records the error's type
            case["error"] = type(e).__name__ + ": " + str(e).splitlines()[0][:200]
        shutil.rmtree(root)
        print(name, case.get("splits", case.get("error")))
        out.append(case)
    with open(OUT, "w") as fh:
        json.dump({"datasets": datasets.__version__, "cases": out}, fh, indent=1)


if __name__ == "__main__":
    main()
