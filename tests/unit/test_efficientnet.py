"""EfficientNet-Lite0 loads its ImageNet weights, extracts PatchCore features and reloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcstream.models import data as data_io
from qcstream.models import efficientnet
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector, load_detector
from qcstream.models.features import preprocess


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet.weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pretrained() -> efficientnet.EfficientNetLite0:
    return efficientnet.efficientnet_lite0(last_stage=4)


def test_weights_land_in_place(pretrained, package_state):
    ours = pretrained.state_dict()

    assert torch.equal(ours["conv_stem.weight"], package_state["_conv_stem.weight"])
    assert torch.equal(ours["bn0.running_var"], package_state["_bn0.running_var"])
    assert torch.equal(ours["blocks.3.depthwise_conv.weight"], package_state["_blocks.3._depthwise_conv.weight"])
    assert torch.equal(ours["blocks.10.bn2.bias"], package_state["_blocks.10._bn2.bias"])
    # Stage 4 ends at block 10; later blocks and the classifier head are not built.
    assert len(pretrained.blocks) == 11
    assert not any(key.startswith(("blocks.11.", "conv_head", "fc.")) for key in ours)


def test_features_differ_from_random_network(pretrained, tire_root):
    image = data_io.load_rgb(data_io.discover(tire_root, "test")[0].image_path)
    batch = preprocess([image], (224, 224))
    torch.manual_seed(0)
    random_net = efficientnet.EfficientNetLite0(last_stage=4).eval()

    with torch.inference_mode():
        ours = efficientnet.EfficientNetFeatureExtractor(pretrained, (2, 4), (28, 28))(batch)
        random = efficientnet.EfficientNetFeatureExtractor(random_net, (2, 4), (28, 28))(batch)

    assert ours.shape == random.shape == (1, 40 + 112, 28, 28)
    # Relative difference: the same input through ImageNet weights and through random init.
    assert ((ours - random).norm() / ours.norm()).item() > 0.5


def test_same_padding_matches_tensorflow_rule():
    conv = efficientnet.SamePadConv2d(2, 2, kernel_size=3, stride=2, bias=False)
    x = torch.randn(1, 2, 10, 11)

    out = conv(x)

    # TensorFlow "same": output ceil(in / stride); the odd extra pad goes bottom / right.
    # Rows 10 -> total pad 1 (0 top, 1 bottom); cols 11 -> total pad 2 (1 left, 1 right).
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)
    assert out.shape[-2:] == (5, 6)
    torch.testing.assert_close(out, expected)


def test_extractor_rescales_input_to_lite_range(pretrained):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    extractor = efficientnet.EfficientNetFeatureExtractor(pretrained, (2,), (4, 4))

    rescaled = preprocess([image], (32, 32)) * extractor.input_scale + extractor.input_shift

    # Bicubic resize at the same size leaves the pixels unchanged, so this is (p - 127) / 128.
    expected = (torch.from_numpy(image).permute(2, 0, 1).float()[None] - 127.0) / 128.0
    torch.testing.assert_close(rescaled, expected, atol=1e-5, rtol=0)


def test_extractor_output_grid_and_dim(pretrained):
    extractor = efficientnet.EfficientNetFeatureExtractor(pretrained, (2, 4), efficientnet.stage_grid((100, 130), 8))

    with torch.inference_mode():
        features = extractor(torch.randn(2, 3, 100, 130))

    assert extractor.feature_dim == 152
    assert features.shape == (2, 152, 13, 17)


def test_wrong_checkpoint_rejected():
    model = efficientnet.EfficientNetLite0(last_stage=2)

    with pytest.raises(efficientnet.WeightsMissingError, match="not an EfficientNet-Lite0 checkpoint"):
        efficientnet.convert_lite0_state_dict({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)}, model)


@pytest.fixture(scope="module")
def efficientnet_fit(tire_root, tmp_path_factory):
    train = [s.image_path for s in data_io.discover(tire_root, "train")][:8]
    validation = [s.image_path for s in data_io.discover(tire_root, "validation")][:4]
    config = DetectorConfig(backbone="efficientnet_lite0", image_size=(224, 224), coreset_ratio=0.1)
    detector = PatchCoreDetector(config).fit(train, validation, progress=False)
    return detector, detector.save(tmp_path_factory.mktemp("efficientnet-model"))


def test_efficientnet_reload_same_scores(efficientnet_fit, tire_root):
    detector, model_dir = efficientnet_fit
    image = data_io.load_rgb(next(s.image_path for s in data_io.discover(tire_root, "test") if s.defect_type == "cut"))

    first = detector.predict(image)
    reloaded = load_detector(model_dir)
    again = reloaded.predict(image)

    assert reloaded.config.backbone == "efficientnet_lite0"
    assert detector.memory_bank_.shape[1] == 152
    assert again.image_score == pytest.approx(first.image_score, rel=1e-5)
    np.testing.assert_allclose(again.anomaly_map, first.anomaly_map, rtol=1e-5, atol=1e-5)
    assert reloaded.version == detector.version


def test_efficientnet_image_size_checked():
    with pytest.raises(ValueError, match="at least 32 pixels"):
        DetectorConfig(backbone="efficientnet_lite0", image_size=(16, 224))
    assert DetectorConfig(backbone="efficientnet_lite0", image_size=(225, 301)).image_size == (225, 301)
