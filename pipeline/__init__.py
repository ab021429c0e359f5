"""The library the jobs are made of, one subpackage per stage of the data flow:

    data/      videos in object storage -> prepared copies + manifest -> clip datasets (Ray Data)
    training/  the recipe, the loop each Ray Train worker runs, and its driver
    tracking/  MLflow: runs, metrics, logged models, evaluation, registry and promotion
    cluster/   connecting to Ray and submitting jobs to a cluster
    bench/     the `uniformer bench` measurements

`config` (the one typed config) and `cluster` sit below all of them, `demo` (the whole flow on one
machine) above. A stage imports only the stages listed above it here (bench: any), plus `config`
and `cluster`; `config` reads `data.rand_augment`'s parser to validate its policy string. Nothing
here imports `jobs/` (the entrypoints); `model/` imports nothing of this package.
tests/test_layout.py checks these rules.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
