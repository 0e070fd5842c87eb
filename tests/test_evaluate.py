"""trainlib/evaluate.py: exact accuracy, the padding labels the loaders add left out."""
import pytest
import torch

from trainlib.evaluate import TopK


def test_topk_skips_padding():
    topk = TopK(torch.device("cpu"), num_classes=10)
    logits = torch.eye(10)[[1, 2, 3, 4]]
    logits[2, 0] = 0.5  # sample 2 (label 0): wrong at top-1, right at top-5
    topk.update(logits, torch.tensor([1, 2, 0, -1]))
    acc1, acc5, n = topk.result()
    assert n == 3 and acc1 == pytest.approx(200 / 3) and acc5 == 100.0
