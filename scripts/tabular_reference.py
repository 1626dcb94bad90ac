#!/usr/bin/env python3
"""Fixtures for termtune's CSV / Parquet / Arrow dataset files: writes tests/fixtures/tabular/.

The files are written by the tools users write them with (pyarrow's parquet writer as `datasets.push_to_hub`
and pandas use it, snappy and zstd; `datasets.Dataset.save_to_disk`'s Arrow stream; pyarrow's Feather (Arrow IPC
file, lz4); pandas' `to_csv` and a hand-written CSV with pandas' corner cases), from the first rows of
LLaMA-Factory's demo data. `reference.json` holds, for every file, the rows as Hugging Face `datasets` loads them
for LLaMA-Factory (`load_dataset(<type>, data_files=..., split="train").to_list()`; NaN written as null), which
the test compares with termtune's rows.

Usage: python scripts/tabular_reference.py <llamafactory data dir>   (pip install datasets pandas pyarrow)
"""

import json
import math
import os
import shutil
import sys
import tempfile

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

ROWS = 16
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tabular")

# pandas' corner cases: quoted commas and newlines, missing cells (empty, NA, None, null), a boolean column
# (as a `kto_tag`), an integer column with and without gaps, a float column, a BOM, a short row. (A row longer
# than the header stops pandas; termtune skips it: tested in Rust.)
HAND_CSV = (
    "\ufeffinstruction,input,output,label,count,gappy,score\r\n"
    'Say hi,,"Hello, world",True,1,1,0.5\r\n'
    '"Two\nlines",NA,"He said ""yes""",false,2,,1e3\r\n'
    "Nothing,None,null,TRUE,3,3,-2\r\n"
    "Short row,x\r\n"
    "Last,N/A,Done,FALSE,5,5,.25\r\n"
)


def clean(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v


def load(kind, path):
    cache = tempfile.mkdtemp()
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train", cache_dir=cache)
        return [clean(r) for r in ds.to_list()]
    finally:
        shutil.rmtree(cache)


def main():
    lf = sys.argv[1]
    os.makedirs(OUT, exist_ok=True)

    def demo(name):
        with open(os.path.join(lf, name), encoding="utf-8") as f:
            return json.load(f)[:ROWS]

    alpaca = demo("alpaca_en_demo.json")
    glaive = demo("glaive_toolcall_en_demo.json")
    dpo = demo("dpo_en_demo.json")
    kto = demo("kto_en_demo.json")

    files = {}
    # JSON beside them: the same rows, for the pipeline test (termtune must give the same examples).
    for name, rows in [("alpaca", alpaca), ("glaive", glaive), ("dpo", dpo), ("kto", kto)]:
        with open(os.path.join(OUT, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)

    pq.write_table(pa.Table.from_pylist(alpaca), os.path.join(OUT, "alpaca.parquet"), compression="snappy")
    files["alpaca.parquet"] = "parquet"
    pq.write_table(pa.Table.from_pylist(glaive), os.path.join(OUT, "glaive.parquet"), compression="zstd")
    files["glaive.parquet"] = "parquet"
    # Small row groups: the reader crosses batch boundaries.
    pq.write_table(pa.Table.from_pylist(dpo), os.path.join(OUT, "dpo.parquet"), row_group_size=5)
    files["dpo.parquet"] = "parquet"

    tmp = tempfile.mkdtemp()
    datasets.Dataset.from_list(kto).save_to_disk(tmp)
    arrows = [f for f in os.listdir(tmp) if f.endswith(".arrow")]
    assert len(arrows) == 1, arrows
    shutil.copy(os.path.join(tmp, arrows[0]), os.path.join(OUT, "kto.arrow"))
    shutil.rmtree(tmp)
    files["kto.arrow"] = "arrow"
    feather.write_feather(pa.Table.from_pylist(glaive), os.path.join(OUT, "glaive_feather.arrow"))
    files["glaive_feather.arrow"] = "arrow"

    pd.DataFrame(alpaca).to_csv(os.path.join(OUT, "alpaca.csv"), index=False)
    files["alpaca.csv"] = "csv"
    with open(os.path.join(OUT, "corner_cases.csv"), "w", encoding="utf-8", newline="") as f:
        f.write(HAND_CSV)
    files["corner_cases.csv"] = "csv"

    reference = {
        "versions": {"datasets": datasets.__version__, "pandas": pd.__version__, "pyarrow": pa.__version__},
        "files": {name: load(kind, os.path.join(OUT, name)) for name, kind in sorted(files.items())},
    }
    with open(os.path.join(OUT, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
    for name, rows in reference["files"].items():
        print(name, len(rows), "rows", os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
