"""A local `accuracy` metric for `evaluate.load("accuracy")`, which loads `accuracy/accuracy.py`
from the working directory before it asks the Hub (evaluate's `evaluation_module_factory`), so
the run_clm tests evaluate offline. The fraction of predictions equal to their reference, as
the Hub's `accuracy` computes it without weights."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """The fraction of predicted labels equal to their reference."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="The fraction of predictions equal to their reference.",
            citation="",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: Any, references: Any) -> dict[str, float]:
        equal = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": equal / len(references)}
