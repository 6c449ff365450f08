"""The classification head and the pooling functions are backbone-agnostic: plain tensors in, plain tensors out."""

import pytest
import torch
from torch import nn

from vlmheads.modeling.heads import ClassificationHead, last_token_state, masked_mean


def test_masked_mean_averages_only_the_valid_positions():
    features = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]])
    torch.testing.assert_close(masked_mean(features, mask), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))
    with pytest.raises(ValueError, match=r"at least one valid position to pool; valid counts are \[\[2\], \[0\]\]"):
        masked_mean(features, torch.tensor([[1, 1, 0], [0, 0, 0]]))


def test_last_token_state_reads_the_last_real_token_with_left_or_right_padding():
    hidden = torch.arange(16, dtype=torch.float32).view(2, 4, 2)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    torch.testing.assert_close(last_token_state(hidden, right), hidden[[0, 1], [1, 3]])
    torch.testing.assert_close(last_token_state(hidden, left), hidden[:, 3])
    torch.testing.assert_close(last_token_state(hidden, None), hidden[:, 3])
    with pytest.raises(ValueError, match="Each sample needs at least one non-padding token"):
        last_token_state(hidden, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))


def test_the_head_stacks_linear_batch_norm_activation_and_dropout_per_hidden_layer():
    head = ClassificationHead(16, [8, 4], 3, [0.2, 0.1], batch_norm=True, activation="gelu")
    kinds = [type(layer).__name__ for layer in head.hidden]
    assert kinds == ["Linear", "BatchNorm1d", "GELUActivation", "Dropout"] * 2
    assert [layer.p for layer in head.hidden if isinstance(layer, nn.Dropout)] == [0.2, 0.1]
    assert (head.out_proj.in_features, head.out_proj.out_features) == (4, 3)
    assert head.train()(torch.randn(5, 16)).shape == (5, 3)

    bare = ClassificationHead(16, [], 2, [], batch_norm=False, activation="relu")
    assert len(bare.hidden) == 0 and (bare.out_proj.in_features, bare.out_proj.out_features) == (16, 2)
    # Features in another dtype (a bf16 backbone) meet the head in its own.
    assert bare(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.float32
