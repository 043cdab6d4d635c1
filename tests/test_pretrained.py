"""Pretrained starts: torchvision ResNet classification state dicts and torchvision's COCO /
ImageNet weights through torch's hub cache, with state dicts the tests make (no download)."""
import errno
import urllib.error

import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from maskrcnn import Config
from maskrcnn.cli import main
from maskrcnn.engine import checkpoint as ckpt
from maskrcnn.errors import MaskRCNNError, WeightsError
from maskrcnn.model.maskrcnn import MaskRCNN

COCO_FILE = "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
RESNET50_FILE = "resnet50-0676ba61.pth"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """torch's hub cache in tmp_path, and every download failing as it does offline."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    return tmp_path / "hub" / "checkpoints"


def _resnet50_with_statistics():
    """A random torchvision ResNet-50 with BatchNorm statistics and affine values away from
    the identity, so the comparison sees them."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.mark.parametrize("train_bn", [False, True])
def test_resnet_classifier_file_gives_torchvisions_c2_to_c5(tmp_path, train_bn):
    net = _resnet50_with_statistics()
    torch.save(net.state_dict(), tmp_path / "resnet50.pth")
    model = MaskRCNN(Config.preset("torchvision", num_classes=3, train_bn=train_bn)).eval()
    report = ckpt.load_pretrained(model, tmp_path / "resnet50.pth")
    assert report["backbone_only"] and not any("fc." in n for n in report["loaded"] + report["unexpected"])
    x = torch.randn(1, 3, 96, 128)
    reference = IntermediateLayerGetter(net, {f"layer{i}": str(i) for i in range(1, 5)})(x)
    with torch.no_grad():
        ours = model.backbone(x)
    for c, (got, want) in enumerate(zip(ours, reference.values()), start=2):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), f"C{c}"
    # the rest as torchvision initialises it: RPN convs normal(0.01), biases 0
    assert abs(model.rpn.conv.weight.std().item() - ckpt.RPN_INIT_STD) < 0.002
    assert model.fpn.lateral[0].bias.abs().max() == 0


def test_imagenet_and_coco_from_the_hub_cache_offline(offline_hub, tmp_path):
    net = _resnet50_with_statistics()
    model = MaskRCNN(Config.preset("torchvision", num_classes=3))
    with pytest.raises(WeightsError, match=f"place that file at {offline_hub / RESNET50_FILE}"):
        ckpt.load_pretrained(model, "imagenet")
    torch.save(net.state_dict(), offline_hub / RESNET50_FILE)
    assert ckpt.load_pretrained(model, "imagenet")["backbone_only"]
    assert torch.equal(model.backbone.conv1.weight, net.conv1.weight)

    torch.manual_seed(1)
    coco = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(coco.state_dict(), offline_hub / COCO_FILE)
    report = ckpt.load_pretrained(model, "coco")
    assert not report["backbone_only"] and report["reinitialised"]  # 91 -> 3 classes
    assert torch.equal(model.rpn.conv.weight, coco.rpn.head.conv[0][0].weight)
    with pytest.raises(WeightsError, match="needs backbone: resnet50 and backbone_style: pytorch"):
        ckpt.load_pretrained(MaskRCNN(Config(num_classes=3, backbone="resnet50")), "coco")


def test_cli_weights_coco_offline_is_one_error_naming_the_file(offline_hub, tmp_path, capsys):
    assert main(["train", "--shapes", "8", "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--steps", "1", "--weights", "coco"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(offline_hub / COCO_FILE) in err[0]
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once the file is placed


def test_model_folder_write_is_all_or_nothing(tmp_path, monkeypatch):
    """A full disk while replacing model_best/ leaves the earlier one whole and no temporary."""
    import maskrcnn.utils as utils

    model = MaskRCNN(Config.preset("torchvision", num_classes=2, backbone="resnet18",
                                   top_down_pyramid_size=16, rpn_conv_channels=16,
                                   fpn_classif_fc_layers_size=16, mask_head_channels=16))
    ckpt.save_model_folder(model, tmp_path / "model_best", {"best.json": {"step": 1}})
    before = {p.name: p.read_bytes() for p in (tmp_path / "model_best").iterdir()}

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.os, "fsync", full)
    with pytest.raises(MaskRCNNError, match="No space left on device"):
        ckpt.save_model_folder(model, tmp_path / "model_best", {"best.json": {"step": 2}})
    assert {p.name: p.read_bytes() for p in (tmp_path / "model_best").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best"]
    # a kill between the two renames: the previous model comes back
    (tmp_path / "model_best").rename(tmp_path / ".model_best.old")
    ckpt.recover_model_folder(tmp_path / "model_best")
    assert {p.name: p.read_bytes() for p in (tmp_path / "model_best").iterdir()} == before


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_error(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path / "ckpts", 1, model)
    (tmp_path / "ckpts").chmod(0o555)
    try:
        with pytest.raises(MaskRCNNError, match="cannot write"):
            ckpt.save_checkpoint(tmp_path / "ckpts", 2, model)
        with pytest.raises(MaskRCNNError, match="cannot write"):
            ckpt.save_model_folder(model, tmp_path / "ckpts" / "model")
    finally:
        (tmp_path / "ckpts").chmod(0o755)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "ckpts")] == [1]
