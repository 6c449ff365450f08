import pytest
from receipt_helpers import make_plain_mllama, make_processor
from transformers import AutoConfig, MllamaConfig

from vlmheads import ReceiptVLClassifier, ReceiptVLConfig


def test_defaults_are_the_receipt_count_classes_and_the_seed_head():
    config = ReceiptVLConfig()
    assert isinstance(config, MllamaConfig)
    assert config.id2label == {0: "0", 1: "1", 2: "2 or more"}
    assert config.label2id == {"0": 0, "1": 1, "2 or more": 2}
    assert config.num_labels == 3
    assert config.classifier_hidden_dims == [768, 256]
    assert config.classifier_dropout_rates == [0.2, 0.1]
    assert config.classifier_batch_norm is True
    assert config.classifier_activation == "gelu"
    assert config.pooling == "vision"


def test_labels_can_be_named_or_counted():
    named = ReceiptVLConfig(id2label={0: "paper", 1: "screen"})
    assert named.num_labels == 2 and named.label2id == {"paper": 0, "screen": 1}
    counted = ReceiptVLConfig(num_labels=4)
    assert counted.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2", 3: "LABEL_3"}
    assert ReceiptVLConfig(classifier_hidden_dims=[512, 128, 32]).classifier_dropout_rates == [0.2, 0.1, 0.1]
    assert ReceiptVLConfig(classifier_hidden_dims=[]).classifier_dropout_rates == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"pooling": "mean"}, "pooling must be one of ('vision', 'multimodal'), got 'mean'"),
        ({"num_labels": 1}, "at least 2 labels, got num_labels=1"),
        ({"id2label": {0: "a", 2: "b"}}, "id2label keys must be the ids 0 ... 1, got [0, 2]"),
        ({"id2label": {0: "a", 1: "a"}}, "id2label must name each class differently"),
        ({"id2label": {0: "a", 1: "b"}, "label2id": {"a": 1, "b": 0}}, "is not the inverse of id2label"),
        ({"classifier_hidden_dims": [64, 0]}, "classifier_hidden_dims must hold positive widths, got [64, 0]"),
        ({"classifier_dropout_rates": [0.1]}, "needs one rate per hidden layer: 2 for classifier_hidden_dims"),
        ({"classifier_dropout_rates": [0.2, 1.0]}, "classifier_dropout_rates must lie in [0, 1), got [0.2, 1.0]"),
        ({"classifier_activation": ""}, "classifier_activation must name an activation"),
    ],
)
def test_invalid_settings_are_clear_errors_at_construction(settings, message):
    with pytest.raises(ValueError) as error:
        ReceiptVLConfig(**settings)
    assert message in str(error.value)


def test_settings_given_to_from_pretrained_are_checked_when_the_model_is_built(tmp_path):
    make_plain_mllama(make_processor()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="classifier_activation must be one of transformers' activations"):
        ReceiptVLClassifier.from_pretrained(tmp_path, classifier_activation="swishy")
    with pytest.raises(ValueError, match="pooling must be one of"):
        ReceiptVLClassifier.from_pretrained(tmp_path, pooling="cls")
    with pytest.raises(ValueError, match="classifier_dropout_rates needs one rate per hidden layer"):
        ReceiptVLClassifier.from_pretrained(tmp_path, classifier_hidden_dims=[8, 8, 8])


def test_save_and_load_keep_every_setting(tmp_path):
    config = ReceiptVLConfig(
        pooling="multimodal",
        id2label={0: "none", 1: "one", 2: "many"},
        classifier_hidden_dims=[32],
        classifier_dropout_rates=[0.3],
        classifier_batch_norm=False,
        classifier_activation="relu",
        base_model="meta-llama/Llama-3.2-11B-Vision",
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ReceiptVLConfig
    for name in (
        "pooling",
        "id2label",
        "label2id",
        "classifier_hidden_dims",
        "classifier_dropout_rates",
        "classifier_batch_norm",
        "classifier_activation",
        "base_model",
    ):
        assert getattr(loaded, name) == getattr(config, name), name


def test_a_plain_mllama_config_keeps_this_model_type():
    config = ReceiptVLConfig.from_dict({**MllamaConfig().to_dict(), "model_type": "mllama"})
    assert config.model_type == "receipt_vl"
