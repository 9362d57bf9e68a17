"""Tag metrics: ``musiclib.probe.metrics`` against scikit-learn's functions on one tag of a small split.

    python -m bench.bench_metrics [--n 200] [--repeat 200]

A sweep calls these for every tag, repetition, split and configuration, so the cost per call on a few
hundred tracks is what matters. Prints microseconds per call and the ratio; results in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import timeit

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from musiclib.probe import metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    y = rng.random(args.n) < 0.2
    s = rng.normal(size=args.n)
    pairs = {
        "ROC-AUC": (metrics.roc_auc, roc_auc_score),
        "AP": (metrics.average_precision, average_precision_score),
        "threshold / PR curve": (metrics.choose_threshold, precision_recall_curve),
    }
    for name, (ours, sklearn) in pairs.items():
        t_ours, t_sk = (
            timeit.timeit(lambda f=f: f(y, s), number=args.repeat) / args.repeat for f in (ours, sklearn)
        )
        print(
            f"{name}: musiclib {t_ours * 1e6:.0f} us, scikit-learn {t_sk * 1e6:.0f} us ({t_sk / t_ours:.0f}x)"
        )


if __name__ == "__main__":
    main()
