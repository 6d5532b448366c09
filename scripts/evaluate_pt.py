#!/usr/bin/env python
"""Fine-tune and evaluate a model (dense or MoE; full / LoRA per expert / QLoRA) on the Portuguese suites.

Suites: assin2-sts, assin2-rte, harem-selective, harem-total, lener-br (groups: assin2, harem, all). Each suite's
Hub id, columns, labels, protocol and published anchors live in `ptmoe/evaluation/suites.py`. Examples:

    # the offline smoke run on the shipped fixtures (tiny models built on the fly)
    python scripts/evaluate_pt.py --quick --output_dir out/eval-quick

    # an upcycled BERTimbau with LoRA per expert, next to the dense source, 5 seeds (the protocol's)
    python scripts/evaluate_pt.py --model bertimbau-moe-8x --dense_model neuralmind/bert-base-portuguese-cased \\
        --suite assin2,harem-selective,lener-br --tuning lora --output_dir out/eval

    # on a connected machine: load the datasets (Hub, its parquet export, or the original files) and write parquet
    python scripts/evaluate_pt.py --suite all --prepare-data /data/pt-bench
    # then, offline: <dir>/assin2/{train,validation,test}.parquet, <dir>/lener-br/..., ...
    python scripts/evaluate_pt.py --model bertimbau-moe-8x --suite lener-br --data_dir /data/pt-bench --output_dir out/lener

    # few-shot: 8 and 16 examples per class, logistic regression on embeddings and LoRA
    python scripts/evaluate_pt.py --model bertimbau-moe-8x --suite assin2-rte --few_shot 8,16 --output_dir out/fewshot

The results JSON feeds the model card: `ptmoe cards --eval-results out/eval/results.json --model-dir bertimbau-moe-8x`.
"""

from ptmoe.errors import run_script
from ptmoe.evaluation.cli import main

if __name__ == "__main__":
    run_script(main)
