import torch
from monai.metrics import ConfusionMatrixMetric, DiceMetric

from scripts.losses import DiceBCELoss


def test_dice_and_bce_terms_are_both_present_and_sum_to_the_total():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32, requires_grad=True)
    target = (torch.rand(2, 1, 32, 32) > 0.7).float()
    terms = DiceBCELoss(lambda_dice=1.0, lambda_bce=2.0)(logits, target)
    assert set(terms) == {"loss", "loss_dice", "loss_bce"}
    assert terms["loss_bce"] > 0.1 and terms["loss_dice"] > 0.1
    torch.testing.assert_close(terms["loss"], terms["loss_dice"] + 2.0 * terms["loss_bce"])
    terms["loss"].backward()
    assert logits.grad.abs().sum() > 0
    via_mapping = DiceBCELoss()({"pred": logits, "aux": None}, target)
    torch.testing.assert_close(via_mapping["loss_bce"], terms["loss_bce"])


def test_pooled_and_mean_dice_follow_their_definitions():
    # a large lesion found exactly and a small one missed: mean Dice 0.5, pooled Dice much higher
    label = torch.zeros(2, 1, 20, 20)
    label[0, :, :10, :10] = 1
    label[1, :, :2, :2] = 1
    pred = label.clone()
    pred[1] = 0
    mean = DiceMetric(include_background=True, ignore_empty=False)(pred, label).mean()
    # the arguments of validate#additional_metrics#val_dice_pooled in train.yaml
    pooled_metric = ConfusionMatrixMetric(
        include_background=True, metric_name="f1 score", compute_sample=False, reduction="sum"
    )
    pooled_metric(pred, label)
    pooled = pooled_metric.aggregate()[0]
    inter, total = (pred * label).sum(), pred.sum() + label.sum()
    torch.testing.assert_close(torch.as_tensor(float(mean)), torch.tensor(0.5))
    torch.testing.assert_close(torch.as_tensor(float(pooled)), 2 * inter / total)
