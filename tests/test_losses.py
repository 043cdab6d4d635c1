"""Each loss against the same formula written out in NumPy."""
import numpy as np
import pytest
import torch

from maskrcnn.model import losses as L


def np_cross_entropy(logits, labels):
    logits = np.asarray(logits, dtype=np.float64)
    log_z = np.log(np.exp(logits).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))


def np_bce(logits, targets):
    p = 1 / (1 + np.exp(-np.asarray(logits, dtype=np.float64)))
    t = np.asarray(targets, dtype=np.float64)
    return float(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))


def np_smooth_l1(pred, target):
    d = np.abs(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
    return float(np.mean(np.where(d < 1, 0.5 * d ** 2, d - 0.5)))


def test_rpn_class_loss_softmax_ignores_label_minus_one():
    logits = torch.tensor([[0.2, 1.5], [2.0, -1.0], [9.0, 9.0], [-0.5, 0.3]])
    labels = torch.tensor([1, 0, -1, 1])
    expected = np_cross_entropy(logits[[0, 1, 3]].numpy(), [1, 0, 1])
    assert L.rpn_class_loss(logits, labels, "softmax").item() == pytest.approx(expected, rel=1e-6)


def test_rpn_class_loss_sigmoid_is_binary_ce():
    logits = torch.tensor([1.2, -0.7, 5.0, 0.1])
    labels = torch.tensor([1, 0, -1, 0])
    expected = np_bce([1.2, -0.7, 0.1], [1, 0, 0])
    assert L.rpn_class_loss(logits, labels, "sigmoid").item() == pytest.approx(expected, rel=1e-6)


def test_rpn_class_loss_batched_equals_flat():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 2)
    labels = torch.tensor([[1, 0, -1, 0, 1], [0, -1, -1, 1, 0]])
    flat = L.rpn_class_loss(logits.reshape(-1, 2), labels.reshape(-1), "softmax")
    assert L.rpn_class_loss(logits, labels, "softmax").item() == pytest.approx(flat.item())


def test_rpn_bbox_loss_over_positives_only():
    pred = torch.tensor([[0.5, -2.0, 0.1, 0.0], [9.0, 9.0, 9.0, 9.0], [0.0, 0.3, -1.5, 0.2]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]])
    labels = torch.tensor([1, 0, 1])
    expected = np_smooth_l1(pred[[0, 2]].numpy(), target[[0, 2]].numpy())
    # by hand: |d| = .5 2 .1 0 | .1 .2 1.6 .1 -> .125 + 1.5 + .005 + 0 + .005 + .02 + 1.1 + .005 = 2.76 / 8
    assert expected == pytest.approx(2.76 / 8)
    assert L.rpn_bbox_loss(pred, target, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mrcnn_class_loss():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    expected = np_cross_entropy(logits.numpy(), [0, 2, 1])
    assert L.mrcnn_class_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mrcnn_bbox_loss_uses_the_gt_class_deltas():
    torch.manual_seed(1)
    pred = torch.randn(3, 4, 4)
    target = torch.randn(3, 4)
    labels = torch.tensor([2, 0, 3])
    expected = np_smooth_l1(np.stack([pred[0, 2].numpy(), pred[2, 3].numpy()]), target[[0, 2]].numpy())
    assert L.mrcnn_bbox_loss(pred, target, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mrcnn_mask_loss_uses_the_gt_class_mask():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 5, 5)
    target = (torch.rand(3, 5, 5) > 0.5).float()
    labels = torch.tensor([0, 1, 3])
    expected = np_bce(np.stack([logits[1, 1].numpy(), logits[2, 3].numpy()]), target[[1, 2]].numpy())
    assert L.mrcnn_mask_loss(logits, target, labels).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss, args", [
    (L.rpn_class_loss, lambda p: (p(4, 2), torch.full((4,), -1), "softmax")),
    (L.rpn_bbox_loss, lambda p: (p(4, 4), torch.zeros(4, 4), torch.tensor([0, 0, -1, 0]))),
    (L.mrcnn_class_loss, lambda p: (p(0, 3), torch.zeros(0, dtype=torch.int64))),
    (L.mrcnn_bbox_loss, lambda p: (p(2, 3, 4), torch.zeros(2, 4), torch.tensor([0, 0]))),
    (L.mrcnn_mask_loss, lambda p: (p(2, 3, 5, 5), torch.zeros(2, 5, 5), torch.tensor([0, 0]))),
])
def test_no_positives_gives_zero_with_grad(loss, args):
    leaves = []

    def param(*shape):
        leaves.append(torch.randn(*shape, requires_grad=True))
        return leaves[-1]

    value = loss(*args(param))
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert leaves[0].grad is not None and not leaves[0].grad.any()
