"""Task metrics on fixed strings against reference values: SQuAD v1.1's evaluation script, rouge-score's own
documented example, sacrebleu's scores, and a confusion matrix worked out by hand."""

import pytest

from dsmoe.tasks import metrics

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is in the [eval] extra")
pytest.importorskip("rouge_score", reason="rouge-score is in the [eval] extra")


@pytest.mark.parametrize("prediction,gold,em,f1", [
    ("Denver Broncos!", "the Denver Broncos", 1.0, 1.0),  # punctuation and articles are dropped
    ("The Broncos", "Denver Broncos", 0.0, 2 / 3),  # P = 1, R = 1/2
    ("an  apple", "Apple", 1.0, 1.0),  # case and whitespace
    ("in 1947 and 1948", "1948", 0.0, 0.4),  # tokens {in, 1947, and, 1948}: P = 1/4, R = 1, F1 = 0.4
    ("", "Paris", 0.0, 0.0),
])
def test_squad_exact_match_and_f1(prediction, gold, em, f1):
    assert metrics.exact_match(prediction, gold) == em
    assert metrics.token_f1(prediction, gold) == pytest.approx(f1)


def test_squad_takes_the_best_gold_answer_and_reports_percent():
    scores = metrics.squad_metrics(["Denver", "Broncos"], [["Denver Broncos", "Denver"], ["Carolina Panthers"]])
    assert scores == {"exact_match": 50.0, "f1": 50.0}


def test_rouge_matches_rouge_score_documented_example(caplog):
    # rouge-score's README: RougeScorer(['rouge1', 'rougeL'], use_stemmer=True).score(target, prediction)
    caplog.set_level("INFO")
    scores = metrics.rouge_metrics(["The quick brown dog jumps on the log."],
                                   [["The quick brown fox jumps over the lazy dog"]])
    assert "default tokenizer" not in caplog.text  # rouge-score's log line reached every `dsmoe eval --task scitldr`
    assert scores["rouge1"] == pytest.approx(100 * 0.7058823529411765)
    assert scores["rougeL"] == pytest.approx(100 * 0.5882352941176471)


def test_rouge_scores_each_example_against_its_best_reference():
    best = metrics.rouge_metrics(["a cat sat"], [["a dog ran far away", "a cat sat"]])
    assert best["rouge1"] == pytest.approx(100.0)


def test_rouge_scores_text_in_other_scripts_instead_of_dropping_it():
    """rouge-score's tokenizer keeps [a-z0-9] only: an exact Chinese or Greek summary scored 0 with it."""
    same = metrics.rouge_metrics(["模型学习了专家", "Καλημέρα κόσμε"], [["模型学习了专家"], ["Καλημέρα κόσμε"]])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}
    half = metrics.rouge_metrics(["模型"], [["模型学习"]])  # 2 of 4 characters: recall 0.5, precision 1
    assert half["rouge1"] == pytest.approx(100 * 2 / 3)


def test_translation_metrics_are_sacrebleus():
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    scores = metrics.translation_metrics(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert metrics.translation_metrics(refs, refs)["bleu"] == pytest.approx(100.0)
    assert 0 < scores["bleu"] < 100


def test_translation_into_chinese_uses_sacrebleus_chinese_tokenizer():
    hyps, refs = ["我们今天在北京开会。"], ["我们明天在北京开会。"]
    zh = metrics.translation_metrics(hyps, refs, target_lang="zh")["bleu"]
    assert zh == pytest.approx(sacrebleu.metrics.BLEU(tokenize="zh").corpus_score(hyps, [refs]).score)
    assert zh != pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)  # 13a sees one word per sentence


def test_classification_metrics_worked_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    predicted = ["a", "b", "b", "b", "a"]
    result = metrics.classification_metrics(gold, predicted, ["a", "b", "c", "d"])
    assert result["accuracy"] == pytest.approx(3 / 5)
    # F1: a = 0.5 (P 1/2, R 1/2), b = 0.8 (P 2/3, R 1), c = 0; d never occurs and is left out, as in sklearn
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert result["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert result["per_label"]["b"]["precision"] == pytest.approx(2 / 3)


def test_confusion_png_is_written(tmp_path):
    result = metrics.classification_metrics(["x", "y"], ["y", "y"], ["x", "y"])
    metrics.plot_confusion(result["confusion_matrix"], tmp_path / "confusion.png", "t")
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["confusion.png"]


def test_a_fine_tunes_log_scores_classification_as_dsmoe_eval_does():
    """Label 2 occurs in neither gold nor predictions: it must not pull macro-F1 down in one of the two only."""
    from dsmoe.finetune.metrics import classification_scores

    ours = classification_scores([0, 1, 1], [0, 0, 1], num_labels=3)
    theirs = metrics.classification_metrics(["a", "a", "b"], ["a", "b", "b"], ["a", "b", "c"])
    assert ours["macro_f1"] == pytest.approx(theirs["macro_f1"]) == pytest.approx(2 / 3)
    assert ours["accuracy"] == theirs["accuracy"] and ours["majority_accuracy"] == pytest.approx(2 / 3)
