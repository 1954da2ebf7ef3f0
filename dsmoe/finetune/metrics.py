"""Classification scores of a fine-tune's evaluation: accuracy, macro-F1 and the majority-class baseline."""

from __future__ import annotations

from collections import Counter

from dsmoe.tasks.metrics import classification_metrics


def classification_scores(predicted: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 as `dsmoe eval` computes them (macro-F1 over the labels that occur in gold or
    predictions, as scikit-learn does), so a fine-tune's log and the evaluation of its result agree."""
    scores = classification_metrics(gold, predicted, list(range(num_labels)))
    n = max(len(gold), 1)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
            "majority_accuracy": Counter(gold).most_common(1)[0][1] / n if gold else 0.0, "examples": len(gold)}
