"""The point-cloud commands of the qcstream tool: generate-scans and pretrain-points."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def cmd_generate_scans(args: argparse.Namespace) -> int:
    from qcstream.models.scan_generator import write_dataset

    for index, part in enumerate(args.parts):
        folder = write_dataset(
            args.output,
            part,
            seed=args.seed + index,
            size=(args.size, args.size),
            n_train=args.train,
            n_validation=args.validation,
            n_test_good=args.test_good,
            n_test_per_defect=args.test_per_defect,
        )
        print(f"{part}: {folder}")
    return 0


def cmd_pretrain_points(args: argparse.Namespace) -> int:
    from qcstream.models import data as data_io
    from qcstream.models.multimodal_config import MultimodalConfig
    from qcstream.models.point_features import PointFeatureExtractor
    from qcstream.models.point_clouds import cloud_to_points
    from qcstream.models.point_mae import save_point_mae
    from qcstream.models.point_pretrain import pretrain_point_mae

    samples = [sample for sample in data_io.discover(args.folder, "train") if sample.label == 0]
    with_clouds = [sample for sample in samples if sample.xyz_path is not None]
    if not with_clouds:
        raise ValueError(
            f"no good training frames with xyz point clouds under {args.folder}: pass an MVTec 3D-AD data set root "
            "or its train/good folder (rgb/ and xyz/ inside), e.g. one written by `qcstream generate-scans`"
        )

    # The same preparation as fitting uses, so pretraining gets the clouds the detector will get.
    config = MultimodalConfig(mode="xyz", plane_distance=args.plane_distance, cloud_size=(args.cloud_size, args.cloud_size))
    prepare = PointFeatureExtractor(config).prepare_cloud
    clouds = []
    for sample in with_clouds:
        points, _ = cloud_to_points(prepare(data_io.load_xyz(sample.xyz_path)))
        clouds.append(points)
    logger.info("Pretraining Point-MAE on %d normal clouds from %s", len(clouds), args.folder)

    encoder = pretrain_point_mae(
        clouds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        num_points=min(args.points, min(len(cloud) for cloud in clouds)),
        seed=args.seed,
        num_groups=args.groups,
        group_size=args.group_size,
        depth=args.depth,
        embed_dim=args.width,
        num_heads=args.width // 64,
        feature_blocks=feature_blocks_for(args.depth),
    )
    save_point_mae(args.output, encoder)
    print(f"Point-MAE encoder saved to {args.output}; fit with --mode rgb+xyz --point-features point_mae --point-checkpoint {args.output}")
    return 0


def feature_blocks_for(depth: int) -> tuple[int, ...]:
    """Blocks whose outputs form the point feature: the ends of the three thirds of the encoder.

    For M3DM's 12 blocks these are 3, 7 and 11; shallower encoders get fewer when thirds coincide.
    """
    if depth < 1:
        raise ValueError(f"depth {depth} must be at least 1 block")
    return tuple(sorted({max(0, round((third + 1) * depth / 3) - 1) for third in range(3)}))


def add_point_commands(commands: argparse._SubParsersAction) -> None:
    """Register the point-cloud commands on the tool's subcommand parser."""
    generate = commands.add_parser("generate-scans", help="write generated RGB + point-cloud scans with defects (MVTec 3D-AD layout)")
    generate.add_argument("output", type=Path, help="folder to write one category folder per part into")
    generate.add_argument("--parts", type=lambda text: text.split(","), default=["ring", "plate", "bagel"], help="comma-separated part types (default: ring,plate,bagel)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first part; the next parts take seed+1, seed+2 (default: 0)")
    generate.add_argument("--size", type=int, default=224, help="image and cloud side in pixels (default: 224)")
    generate.add_argument("--train", type=int, default=40, help="good training scans per part (default: 40)")
    generate.add_argument("--validation", type=int, default=10, help="good validation scans per part (default: 10)")
    generate.add_argument("--test-good", type=int, default=10, help="good test scans per part (default: 10)")
    generate.add_argument("--test-per-defect", type=int, default=6, help="test scans per defect type and part (default: 6)")
    generate.set_defaults(func=cmd_generate_scans)

    pretrain = commands.add_parser("pretrain-points", help="pretrain a Point-MAE encoder on normal point clouds (masked point modelling)")
    pretrain.add_argument("folder", help="MVTec 3D-AD data set root or train/good folder with xyz/ clouds")
    pretrain.add_argument("--output", type=Path, required=True, help="checkpoint file to write, e.g. point_mae.pth")
    pretrain.add_argument("--epochs", type=int, default=50, help="passes over the clouds (default: 50)")
    pretrain.add_argument("--batch-size", type=int, default=4, help="clouds per step (default: 4)")
    pretrain.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default: 1e-3)")
    pretrain.add_argument("--points", type=int, default=8192, help="points sampled per cloud; fit with the same --point-mae-points (default: 8192)")
    pretrain.add_argument("--groups", type=int, default=256, help="point groups per cloud (M3DM: 1024) (default: 256)")
    pretrain.add_argument("--group-size", type=int, default=32, help="points per group (M3DM: 128) (default: 32)")
    pretrain.add_argument("--depth", type=int, default=12, help="transformer blocks (default: 12)")
    pretrain.add_argument("--width", type=int, default=384, help="transformer width, a multiple of 64 (default: 384)")
    pretrain.add_argument("--cloud-size", type=int, default=224, help="side the organized clouds are resized to, as fitting does (default: 224)")
    pretrain.add_argument("--plane-distance", type=float, default=0.002, help="RANSAC distance of the background plane in cloud units, as fitting uses (default: 0.002)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(func=cmd_pretrain_points)
