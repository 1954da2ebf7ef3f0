"""Classification scores of a fine-tune's evaluation: accuracy, macro-F1 and the majority-class baseline."""

from __future__ import annotations

from collections import Counter


def classification_scores(predicted: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    """Macro-F1 averages F1 over all labels of the label set (a label never predicted nor present counts 0)."""
    f1s = []
    for label in range(num_labels):
        tp = sum(p == g == label for p, g in zip(predicted, gold))
        fp = sum(p == label != g for p, g in zip(predicted, gold))
        fn = sum(g == label != p for p, g in zip(predicted, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    n = max(len(gold), 1)
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / n, "macro_f1": sum(f1s) / max(num_labels, 1),
            "majority_accuracy": Counter(gold).most_common(1)[0][1] / n if gold else 0.0, "examples": len(gold)}
