"""Train the default trained-judge config on the shared XSTest files, and its held-out twins, and copy their heads
into src/quantsafe/judges/trained_heads/, which ships with the package. Why: training reads features of 1,125
answers, minutes with native bf16 but ~20 min in fp32 on 2 AVX2 cores; shipped heads make the judge usable at once.

Usage: QUANTSAFE_DATA_DIR=../shared/data .venv/bin/python scripts/ship_trained_judge.py
"""

from __future__ import annotations

import os
import shutil

from quantsafe.benchmarks.xstest import load_xstest_completions
from quantsafe.datadir import cache_dir, resolve_data_dir
from quantsafe.judges.trained import SHIPPED_HEADS, TrainedJudgeConfig, held_out_judges, train_judge


def main() -> None:
    labelled = load_xstest_completions(resolve_data_dir(os.environ.get("QUANTSAFE_DATA_DIR")))
    config = TrainedJudgeConfig()
    judges = [train_judge(config, labelled), *(j for _, j in held_out_judges(config, labelled))]
    for judge in judges:
        source, target = cache_dir() / "judges" / judge.artifact_id, SHIPPED_HEADS / judge.artifact_id
        if target.is_dir():
            continue
        shutil.copytree(source, target)
        print(f"{target} (trained on {', '.join(sorted(judge.trained_on))})")


if __name__ == "__main__":
    main()
