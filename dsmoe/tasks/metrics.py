"""Task metrics. BLEU/chrF come from sacrebleu and ROUGE from rouge-score (the libraries papers report);
SQuAD's exact match and token F1 follow its official v1.1 evaluation script, whose normalisation is not
packaged in a library we depend on; classification metrics come from the confusion matrix.
"""

from __future__ import annotations

import collections
import re
import string

from dsmoe.errors import UserError


# ---------------------------------------------------------------- classification

def confusion_matrix(gold: list[str], predicted: list[str], labels: list[str]) -> list[list[int]]:
    """matrix[i][j] = examples of gold label i predicted as label j."""
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        matrix[index[g]][index[p]] += 1
    return matrix


def classification_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 over the labels that occur in gold or predictions (as scikit-learn's
    f1_score(average="macro") does), per-label precision/recall/F1 and the confusion matrix."""
    matrix = confusion_matrix(gold, predicted, labels)
    per_label, f1s = {}, []
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        gold_n, pred_n = sum(matrix[i]), sum(row[i] for row in matrix)
        precision = tp / pred_n if pred_n else 0.0
        recall = tp / gold_n if gold_n else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": gold_n}
        if gold_n or pred_n:
            f1s.append(f1)
    accuracy = sum(matrix[i][i] for i in range(len(labels))) / max(len(gold), 1)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "per_label": per_label,
            "confusion_matrix": {"labels": labels, "matrix": matrix}}


def plot_confusion(confusion: dict, path, title: str) -> None:
    """The confusion matrix as a PNG (rows: gold, columns: predicted), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dsmoe.atomic import atomic_write

    labels, matrix = confusion["labels"], confusion["matrix"]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(2 + 0.5 * n, 1.5 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, matrix[i][j], ha="center", va="center", fontsize=8,
                    color="white" if matrix[i][j] > peak / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# ---------------------------------------------------------------- extractive QA (SQuAD v1.1)

def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation, articles (a, an, the) and extra whitespace: SQuAD v1.1's normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Per example, the best score over its gold answers; averaged, in percent as SQuAD reports."""
    em = [max(exact_match(p, g) for g in refs) for p, refs in zip(predictions, references)]
    f1 = [max(token_f1(p, g) for g in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1)}


# ---------------------------------------------------------------- translation and summarisation

def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this metric needs {package}: pip install 'dsmoe[eval]'") from None


def translation_metrics(predictions: list[str], references: list[str], target_lang: str | None = None) -> dict:
    """Corpus BLEU and chrF against one reference per sentence; target_lang picks sacrebleu's tokenizer
    (e.g. 'zh' segments Chinese, 'ja' Japanese)."""
    sacrebleu = _require("sacrebleu", "sacrebleu")
    bleu = sacrebleu.metrics.BLEU(trg_lang=target_lang or "").corpus_score(predictions, [references])
    chrf = sacrebleu.metrics.CHRF().corpus_score(predictions, [references])
    return {"bleu": bleu.score, "chrf": chrf.score}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class UnicodeWords:
    """ROUGE tokens of any script: lower-cased runs of letters and digits, each CJK character a token of its own
    (those scripts write no spaces between words). Used where an example is not plain ASCII."""

    _TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


def rouge_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measure (percent), each example scored against its best reference; Porter stemming
    as in the summarisation papers."""
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    from rouge_score.tokenizers import DefaultTokenizer

    # its own default tokenizer, passed explicitly: without one it logs "Using default tokenizer." into every run
    english = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True,
                                       tokenizer=DefaultTokenizer(use_stemmer=True))
    # that tokenizer keeps only [a-z0-9]: text in other scripts would score 0 even when equal to its reference
    any_script = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeWords())
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        ascii_only = prediction.isascii() and all(r.isascii() for r in refs)
        scores = (english if ascii_only else any_script).score_multi(refs, prediction)
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100 * total / len(predictions) for name, total in totals.items()}


def chat_metrics(logprob_sum: float, tokens: int) -> dict:
    from dsmoe.tasks.perplexity import perplexity

    loss = -logprob_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": perplexity(loss), "assistant_tokens": tokens}
