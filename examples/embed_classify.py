"""Logistic regression on mean-pooled embeddings (the docs' task=embed worked example).

    python examples/embed_classify.py EMBED_FOLDER examples/data/valid.jsonl [--layer blocks.5.mlp.l3]

Reads `<layer>.npy` and `index.jsonl` from a task=embed output, the class of each sequence from
the JSONL's `clade` field (matched by id), and prints the 5-fold cross-validated accuracy of a
standardized logistic regression (scikit-learn), next to the majority-class baseline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main() -> None:
    """Print the cross-validated accuracy of a logistic regression on the embeddings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", type=Path)
    parser.add_argument("sequences", type=Path)
    parser.add_argument("--layer", default="blocks.5.mlp.l3")
    parser.add_argument("--label", default="clade")
    args = parser.parse_args()
    labels = {}
    for line in args.sequences.read_text().splitlines():
        row = json.loads(line)
        labels[row["id"]] = row[args.label]
    index = [
        json.loads(line) for line in (args.embeddings / "index.jsonl").read_text().splitlines()
    ]
    x = np.load(args.embeddings / f"{args.layer}.npy").astype(np.float64)
    y = np.array([labels[r["id"]] for r in index])
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    accuracy = cross_val_score(model, x, y, cv=folds, scoring="accuracy")
    classes, counts = np.unique(y, return_counts=True)
    print(
        f"{len(y)} sequences, classes {dict(zip(classes.tolist(), counts.tolist()))}, {x.shape[1]} features"
    )
    print(f"majority-class baseline: {counts.max() / len(y):.3f}")
    print(
        f"5-fold logistic regression accuracy: {accuracy.mean():.3f} (folds {np.round(accuracy, 3).tolist()})"
    )


if __name__ == "__main__":
    main()
