"""AdaLoRA vs LoRA (matched final budget) vs full fine-tuning on real CoLA, RTE, MRPC and STS-B with the
offline MiniLM on CPU: the paper's comparison at small scale, through the same LightningCLI configs.

    python benchmarks/glue_minilm.py --tasks cola --seeds 1 --max-train-samples 2000 --epochs 3

Matched budget: AdaLoRA starts at init_r (12) and prunes to target_r (8) on average; LoRA runs at
r = target_r, so both end with the same number of adapter ranks. Prints a paper-style table (mean and std
over seeds, #Params) and writes JSON; all options of benchmarks/reproduce.py apply.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import REPO, main  # noqa: E402

if __name__ == "__main__":
    main(methods=["adalora", "lora", "full"], epochs=3, max_train_samples=2000,
         out=str(REPO / "benchmarks" / "results" / "glue_minilm"))
