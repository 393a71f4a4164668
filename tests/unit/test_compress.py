"""``qcstream compress``: simulated and ONNX Runtime forms of real fitted models, saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qcstream.cli import main as cli_main
from qcstream.models import data as data_io
from qcstream.models.compress import CompressionPlan, compress_points, compress_rgb
from qcstream.models.config import DetectorConfig
from qcstream.models.detector import PatchCoreDetector, load_detector
from qcstream.models.multimodal import MultimodalDetector
from qcstream.models.multimodal_config import MultimodalConfig
from qcstream.models.point_mae import PointMAEEncoder, save_point_mae

SCAN_SIZE = 112


@pytest.fixture(scope="module")
def tire_frames(tire_root: Path) -> dict[str, list[Path]]:
    return {
        "train": [s.image_path for s in data_io.discover(tire_root, "train")][:8],
        "validation": [s.image_path for s in data_io.discover(tire_root, "validation")][:4],
        "test": [tire_root / "test" / kind / "rgb" / "000.png" for kind in ("good", "cut", "hole")],
    }


def linked_train_folder(tire_root: Path, tmp_path: Path, count: int) -> Path:
    """A folder of links to the first ``count`` tire training images, as a user's train folder."""
    train = tmp_path / "train"
    train.mkdir()
    for source in sorted((tire_root / "train" / "good" / "rgb").glob("*.png"))[:count]:
        (train / source.name).symlink_to(source)
    return train


@pytest.fixture(scope="module")
def vit_model_dir(tire_frames, tmp_path_factory) -> Path:
    """A small DINOv2 detector: 112 px input, block 3, fitted on 8 tire frames."""
    config = DetectorConfig(backbone="dinov2_vits14", image_size=(112, 112), layers=(3,), coreset_ratio=0.2)
    detector = PatchCoreDetector(config).fit(tire_frames["train"], tire_frames["validation"], progress=False)
    return detector.save(tmp_path_factory.mktemp("vit-model"))


def test_simulated_model_reloads_same_scores(vit_model_dir, tire_frames, tmp_path):
    plan = CompressionPlan(quantize="ptf-log2", weight_bits=4)

    compressed = compress_rgb(load_detector(vit_model_dir), plan, tire_frames["train"], tire_frames["validation"], tmp_path, progress=False)
    reloaded = load_detector(tmp_path)

    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["backbone_form"] == "torch-simq"
    assert meta["quantization"]["weight_bits"] == 4
    assert meta["quantization"]["softmax"] == "log2"
    expected, _ = compressed.score(tire_frames["test"])
    got, _ = reloaded.score(tire_frames["test"])
    np.testing.assert_array_equal(got, expected)
    float_scores, _ = load_detector(vit_model_dir).score(tire_frames["test"])
    assert not np.allclose(got, float_scores)


@pytest.mark.parametrize("form", ["onnx-fp32", "onnx-int8", "onnx-int4"])
def test_onnx_forms_reload_like_float(form, vit_model_dir, tire_frames, tmp_path):
    plan = CompressionPlan(export=form, calibration_frames=4)

    compressed = compress_rgb(load_detector(vit_model_dir), plan, tire_frames["train"], tire_frames["validation"], tmp_path, progress=False)
    reloaded = load_detector(tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["backbone_form"] == form
    expected, _ = compressed.score(tire_frames["test"])
    got, maps = reloaded.score(tire_frames["test"])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert maps[0].shape == (400, 300)
    float_scores, float_maps = load_detector(vit_model_dir).score(tire_frames["test"])
    if form == "onnx-fp32":
        np.testing.assert_allclose(got, float_scores, rtol=1e-3)
    else:
        # The bank is refitted on quantized features, so scores shift, but the defects stay where the
        # float maps put them. The good frame's map is low everywhere, with no shape to keep.
        for index in (1, 2):
            assert np.corrcoef(maps[index].ravel(), float_maps[index].ravel())[0, 1] > 0.8


def test_compress_cli_writes_loadable_model(vit_model_dir, tire_root, tmp_path, capsys):
    train = linked_train_folder(tire_root, tmp_path, 6)
    output = tmp_path / "out"

    code = cli_main([
        "compress", str(train), "--model-dir", str(vit_model_dir), "--validation", str(tire_root / "validation" / "good"),
        "--quantize", "omse", "--calibration-frames", "2", "--output", str(output),
    ])

    assert code == 0
    assert "torch-simq, omse W8A8" in capsys.readouterr().out
    assert json.loads((output / "config.json").read_text())["quantization"]["calibrator"] == "omse"


def test_compress_cli_rejects_both_quantize_and_export(vit_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["compress", str(tmp_path), "--model-dir", str(vit_model_dir), "--output", str(tmp_path / "o"), "--quantize", "minmax", "--export", "onnx-int8"])

    assert exit_info.value.code == 2
    assert "argument --export: not allowed with argument --quantize" in capsys.readouterr().err


def test_compress_cli_needs_something_to_do(vit_model_dir, tire_root, tmp_path, capsys):
    code = cli_main(["compress", str(tire_root), "--model-dir", str(vit_model_dir), "--output", str(tmp_path / "o")])

    assert code == 1
    assert "error: nothing to do: give --prune FLOPS, --quantize METHOD or --export FORM" in capsys.readouterr().err


def test_plan_needs_at_most_one_form():
    with pytest.raises(ValueError, match="either a simulated quantization method .* or a deployable form"):
        CompressionPlan(quantize="minmax", export="onnx-int8")


@pytest.mark.parametrize("flops", [0.0, 1.0, 1.5])
def test_plan_rejects_bad_flops(flops):
    with pytest.raises(ValueError, match=f"--prune {flops} is invalid: the FLOPs constraint must be greater than 0 and less than 1"):
        CompressionPlan(prune=flops)


def test_plan_rejects_prune_with_quantize():
    with pytest.raises(ValueError, match="prune with --export onnx-int8"):
        CompressionPlan(prune=0.5, quantize="minmax")


def test_pruned_model_reloads_same_scores(vit_model_dir, tire_frames, tmp_path):
    plan = CompressionPlan(prune=0.6, calibration_frames=8)

    compressed = compress_rgb(load_detector(vit_model_dir), plan, tire_frames["train"], tire_frames["validation"], tmp_path, progress=False)
    reloaded = load_detector(tmp_path)

    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["backbone_form"] == "torch-fp32"
    assert meta["pruning"]["flops"] <= 0.6
    assert len(meta["pruning"]["solvers"]) >= 4
    assert (tmp_path / "backbone.pt").stat().st_size < 0.5 * (vit_model_dir / "backbone.pt").stat().st_size
    kept_heads = sum(block.attn.num_heads for block in reloaded.extractor.backbone.blocks[:4])
    assert kept_heads == sum(meta["pruning"]["heads"])
    expected, _ = compressed.score(tire_frames["test"])
    got, maps = reloaded.score(tire_frames["test"])
    np.testing.assert_array_equal(got, expected)
    _, float_maps = load_detector(vit_model_dir).score(tire_frames["test"])
    for index in (1, 2):
        assert np.corrcoef(maps[index].ravel(), float_maps[index].ravel())[0, 1] > 0.8


def test_pruned_model_exports_to_int8(vit_model_dir, tire_frames, tmp_path):
    compress_rgb(load_detector(vit_model_dir), CompressionPlan(prune=0.6, calibration_frames=8), tire_frames["train"], tire_frames["validation"], tmp_path / "p", progress=False)

    compressed = compress_rgb(load_detector(tmp_path / "p"), CompressionPlan(export="onnx-int8", calibration_frames=4), tire_frames["train"], tire_frames["validation"], tmp_path / "q", progress=False)
    reloaded = load_detector(tmp_path / "q")

    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["backbone_form"] == "onnx-int8"
    assert meta["pruning"]["heads"] == json.loads((tmp_path / "p" / "config.json").read_text())["pruning"]["heads"]
    np.testing.assert_allclose(reloaded.score(tire_frames["test"])[0], compressed.score(tire_frames["test"])[0], rtol=1e-5)
    with pytest.raises(ValueError, match=r"already pruned \(to 0\.\d+ FLOPs\); prune the model it came from"):
        compress_rgb(load_detector(tmp_path / "p"), CompressionPlan(prune=0.5), tire_frames["train"], tire_frames["validation"], tmp_path / "r")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="simulated quantization of a pruned transformer is not supported"):
        compress_rgb(load_detector(tmp_path / "p"), CompressionPlan(quantize="minmax"), tire_frames["train"], tire_frames["validation"], tmp_path / "s")


def test_pruning_cnn_backbone_raises(fitted_model_dir, tire_frames, tmp_path):
    with pytest.raises(ValueError, match="this model uses efficientnet_lite0, which has none"):
        compress_rgb(load_detector(fitted_model_dir), CompressionPlan(prune=0.5), tire_frames["train"], tire_frames["validation"], tmp_path)


def test_compress_cli_prune_and_export(vit_model_dir, tire_root, tmp_path, capsys):
    train = linked_train_folder(tire_root, tmp_path, 6)
    output = tmp_path / "out"

    code = cli_main([
        "compress", str(train), "--model-dir", str(vit_model_dir), "--validation", str(tire_root / "validation" / "good"),
        "--prune", "0.7", "--export", "onnx-int8", "--calibration-frames", "4", "--output", str(output),
    ])

    assert code == 0
    meta = json.loads((output / "config.json").read_text())
    assert meta["backbone_form"] == "onnx-int8"
    assert f"(onnx-int8, {meta['pruning']['flops']:.3f} of the prunable FLOPs) saved to" in capsys.readouterr().out


def test_simulated_quantization_of_a_cnn_backbone_is_refused(fitted_model_dir, tire_frames, tmp_path):
    with pytest.raises(ValueError, match="needs a ViT backbone; this model uses efficientnet_lite0"):
        compress_rgb(load_detector(fitted_model_dir), CompressionPlan(quantize="minmax"), tire_frames["train"], tire_frames["validation"], tmp_path)


def test_compressed_model_rejects_recompression(vit_model_dir, tire_frames, tmp_path):
    compress_rgb(load_detector(vit_model_dir), CompressionPlan(export="onnx-fp32"), tire_frames["train"], tire_frames["validation"], tmp_path / "a", progress=False)

    with pytest.raises(ValueError, match="already onnx-fp32; compress the float model it came from .version dinov2_vits14-"):
        compress_rgb(load_detector(tmp_path / "a"), CompressionPlan(export="onnx-int8"), tire_frames["train"], tire_frames["validation"], tmp_path / "b")


@pytest.fixture(scope="module")
def point_model_dir(scan_root, tmp_path_factory) -> Path:
    """An xyz-mode detector with a small random Point-MAE encoder, fitted on the generated scans."""
    torch.manual_seed(0)
    encoder = PointMAEEncoder(num_groups=32, group_size=16, embed_dim=64, depth=2, num_heads=1, feature_blocks=(0, 1))
    checkpoint = save_point_mae(tmp_path_factory.mktemp("point-mae") / "tiny.pth", encoder)
    config = MultimodalConfig(
        mode="xyz", point_features="point_mae", point_checkpoint=str(checkpoint), point_mae_points=1024,
        cloud_size=(SCAN_SIZE, SCAN_SIZE), feature_grid=(14, 14), coreset_ratio=0.25,
    )
    detector = MultimodalDetector(config).fit(data_io.discover(scan_root, "train"), data_io.discover(scan_root, "validation"), progress=False)
    return detector.save(tmp_path_factory.mktemp("point-model"))


@pytest.mark.parametrize(
    "plan",
    [CompressionPlan(quantize="ptf-log2", calibration_frames=3), CompressionPlan(export="onnx-int8", calibration_frames=3), CompressionPlan(prune=0.5, calibration_frames=4)],
    ids=["simulated", "onnx-int8", "pruned"],
)
def test_point_encoder_reloads_same_scores(plan, point_model_dir, scan_root, tmp_path):
    train, validation = data_io.discover(scan_root, "train"), data_io.discover(scan_root, "validation")
    test = data_io.discover(scan_root, "test")[::3]

    compressed = compress_points(load_detector(point_model_dir), plan, train, validation, tmp_path, progress=False)
    reloaded = load_detector(tmp_path)

    assert json.loads((tmp_path / "config.json").read_text())["point_encoder_form"] == plan.form
    expected, _ = compressed.score(test)
    got, _ = reloaded.score(test)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
