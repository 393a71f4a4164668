"""The ``qcstream`` command-line tool: one thin subcommand per library entry point."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qcstream.cli_compress import add_compress_command
from qcstream.cli_dashboard import add_dashboard_command
from qcstream.cli_points import add_point_commands
from qcstream.cli_query import add_query_command
from qcstream.cli_subscribe import add_subscribe_command
from qcstream.settings import Settings

logger = logging.getLogger("qcstream.cli")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("kafka", "aiokafka", "urllib3", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# --- services ---------------------------------------------------------------------

def cmd_services(args: argparse.Namespace) -> int:
    from qcstream import services

    if args.action == "up":
        settings = services.up()
        print(f"Kafka on {settings.kafka_bootstrap}, MinIO on {settings.minio_endpoint}")
    elif args.action == "down":
        services.down()
        print("Local services stopped")
    for item in services.status().values():
        state = "running" if item.running else "stopped"
        print(f"{item.name:<6} {state:<8} pid={item.pid or '-':<8} {item.address}  {item.detail}")
    return 0


# --- model ------------------------------------------------------------------------

def _pair(text: str) -> tuple[int, int]:
    parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected N or HxW, for example 224 or 280x224")
    return parts[0], parts[1]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: expected comma-separated integers such as 7,11") from error


def cmd_fit(args: argparse.Namespace) -> int:
    from qcstream.models import data as data_io
    from qcstream.models.config import DetectorConfig
    from qcstream.models.detector import PatchCoreDetector

    settings = Settings.from_env()
    model_dir = args.model_dir or settings.model_dir
    train = [s.image_path for s in data_io.discover(args.train_folder, "train")]
    validation_folder = args.validation or _sibling_validation(Path(args.train_folder))
    validation = [s.image_path for s in data_io.discover(validation_folder, "validation")] if validation_folder else []

    chosen = {
        "backbone": args.backbone,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "image_size": args.image_size,
        "layers": args.layers,
        "feature_grid": args.feature_grid,
        "coreset_ratio": args.coreset_ratio,
        "coreset_chunk_rows": args.coreset_chunk_rows,
        "memory_budget_mb": args.memory_budget_mb,
        "target_fpr": args.target_fpr,
    }
    if args.mode is not None:
        return _fit_multimodal(args, chosen, model_dir, validation_folder)
    config = DetectorConfig(**{name: value for name, value in chosen.items() if value is not None})
    logger.info("Fitting on %d images from %s, calibrating on %d from %s", len(train), args.train_folder, len(validation), validation_folder)
    detector = PatchCoreDetector(config).fit(train, validation)
    detector.save(model_dir)
    print(f"Model {detector.version} saved to {model_dir} (threshold {detector.threshold_:.4f})")
    return 0


def _fit_multimodal(args: argparse.Namespace, chosen: dict, model_dir: Path, validation_folder: Path | None) -> int:
    """Fit the multimodal detector on frames with organized point clouds."""
    from qcstream.models import data as data_io
    from qcstream.models.multimodal import MultimodalDetector
    from qcstream.models.multimodal_config import MultimodalConfig

    if validation_folder is None:
        raise ValueError(
            f"no validation folder for {args.train_folder}: the multimodal detector fits its score fusion and "
            "thresholds on held-out good frames; pass --validation DIR"
        )
    unused = [name for name in ("checkpoint", "memory_budget_mb") if chosen.get(name) is not None]
    if unused:
        raise ValueError(f"--mode {args.mode} does not take {', '.join(unused)}; leave them out")
    settings = {name: value for name, value in chosen.items() if value is not None and name not in unused}
    settings.update(
        mode=args.mode, point_features=args.point_features, point_checkpoint=args.point_checkpoint,
        point_mae_points=args.point_mae_points,
    )
    config = MultimodalConfig(**{name: value for name, value in settings.items() if value is not None})

    train = data_io.discover(args.train_folder, "train")
    validation = data_io.discover(validation_folder, "validation")
    logger.info("Fitting mode %s on %d frames from %s, calibrating on %d from %s", config.mode, len(train), args.train_folder, len(validation), validation_folder)
    detector = MultimodalDetector(config).fit(train, validation)
    detector.save(model_dir)
    thresholds = ", ".join(f"{mode} {value:.4f}" for mode, value in detector.thresholds_.items())
    print(f"Model {detector.version} saved to {model_dir} (thresholds: {thresholds})")
    return 0


def _sibling_validation(train_folder: Path) -> Path | None:
    """Return ``<root>/validation/good`` for a ``<root>/train/good`` folder, when it exists."""
    if train_folder.name == "good" and train_folder.parent.name == "train":
        candidate = train_folder.parent.parent / "validation" / "good"
        if candidate.is_dir():
            return candidate
    return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from qcstream.models.detector import load_detector
    from qcstream.models.evaluate import score_test_set, summarize_for

    settings = Settings.from_env()
    detector = load_detector(args.model_dir or settings.model_dir)
    scored = score_test_set(detector, args.test_folder)
    result = summarize_for(detector, scored)
    print(result.format())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
        print(f"Metrics written to {args.json}")
    if args.report:
        from qcstream.models.evaluation_report import write_report

        index = write_report(args.report, result, scored, detector.score_range)
        print(f"Report written to {index}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from qcstream.models.calibration import recalibrate
    from qcstream.models.detector import load_detector

    model_dir = args.model_dir or Settings.from_env().model_dir
    detector = load_detector(model_dir)
    result = recalibrate(detector, args.folder, target_fpr=args.target_fpr, target_fnr=args.target_fnr)
    detector.save(model_dir)
    print(result.format())
    print(f"Model {result.version} saved to {model_dir}")
    return 0


# --- streaming --------------------------------------------------------------------

def cmd_produce(args: argparse.Namespace) -> int:
    from qcstream.models.data import discover
    from qcstream.streams.producer import replay_folder

    images: list[Path] = []
    clouds: list[Path | None] = []
    for item in args.images:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"image or folder {path} not found: pass image files or folders of images")
        if path.is_file():
            images.append(path)
            clouds.append(_sibling_cloud(path))
        else:
            samples = discover(path, "test")
            images.extend(sample.image_path for sample in samples)
            clouds.extend(sample.xyz_path for sample in samples)
    if args.no_clouds:
        clouds = [None] * len(images)
    refs = replay_folder(
        Settings.from_env(), images, line_id=args.line, camera_id=args.camera, interval_s=args.interval, point_clouds=clouds
    )
    print("frame_id\tline_id\tcamera_id\tpayload\tpoint_cloud")
    for ref in refs:
        cloud = f"{ref.payload_bucket}/{ref.point_cloud_key}" if ref.point_cloud_key else "-"
        print(f"{ref.frame_id}\t{ref.line_id}\t{ref.camera_id}\t{ref.payload_bucket}/{ref.payload_key}\t{cloud}")
    return 0


def _sibling_cloud(image: Path) -> Path | None:
    """Return ``../xyz/<stem>.tiff`` for an MVTec 3D-AD ``rgb/<stem>.png`` image, when it exists."""
    if image.parent.name != "rgb":
        return None
    candidate = image.parent.parent / "xyz" / f"{image.stem}.tiff"
    return candidate if candidate.is_file() else None


def cmd_worker(args: argparse.Namespace) -> int:
    from qcstream.streams.worker import run_worker

    run_worker(Settings.from_env(), loglevel=args.log_level)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    import time

    from qcstream.streams.labels import LabelPublisher, label_from_mask
    from qcstream.streams.records import Label

    if args.mask:
        label = label_from_mask(args.frame_id, args.line, Path(args.mask), defect_type=args.defect_type, inspector=args.inspector)
    else:
        label = Label(frame_id=args.frame_id, line_id=args.line, is_defect=args.verdict == "defect", labelled_at=time.time(), defect_type=args.defect_type, inspector=args.inspector)
    with LabelPublisher(Settings.from_env()) as publisher:
        publisher.send(label)
        publisher.flush()
    print(f"Label sent: frame {label.frame_id} line {label.line_id} {'defect' if label.is_defect else 'good'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qcstream.storage.report import format_report, quality_report

    settings = Settings.from_env()
    report = quality_report(settings.data_dir, settings, window_seconds=args.window, last_n=args.last)
    print(format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qcstream.demo import DemoOptions, run_demo

    options = DemoOptions(data_root=Path(args.data), refit=args.refit, keep_services=args.keep_services, timeout_seconds=args.timeout)
    return run_demo(Settings.from_env(), options)


# --- parser -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcstream", description="Streaming quality control for industrial parts.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="logging level (default: info)")
    commands = parser.add_subparsers(dest="command", required=True)

    services = commands.add_parser("services", help="start, stop or show the local Kafka and MinIO")
    services.add_argument("action", choices=["up", "down", "status"])
    services.set_defaults(func=cmd_services)

    fit = commands.add_parser("fit", help="fit the detector on a folder of normal images")
    fit.add_argument("train_folder", help="folder of good images, e.g. ../shared/data/mvtec3d_tire/train/good, or a data set root")
    fit.add_argument("--validation", help="held-out good images for the threshold (default: <root>/validation/good when it exists)")
    fit.add_argument("--model-dir", type=Path, help="where to save the model (default: $QCSTREAM_MODEL_DIR)")
    from qcstream.models.config import BACKBONES, DetectorConfig

    defaults = DetectorConfig()
    fit.add_argument("--backbone", choices=list(BACKBONES), help=f"feature network (default: {defaults.backbone}); vit_checkpoint needs --checkpoint")
    fit.add_argument("--checkpoint", type=Path, help="official DINO or DINOv2 .pth file for --backbone vit_checkpoint, e.g. dino_vitbase8_pretrain.pth")
    fit.add_argument("--image-size", type=_pair, help=f"network input size in pixels, N or HxW, multiples of the ViT patch size (14 for dinov2_vits14) (default: {defaults.image_size[0]}x{defaults.image_size[1]})")
    fit.add_argument("--layers", type=_int_list, help=f"ViT blocks whose features are joined (default: {','.join(map(str, defaults.layers))})")
    fit.add_argument("--feature-grid", type=_pair, help="patch grid of the memory bank, N or HxW (default: the backbone's own grid)")
    fit.add_argument("--coreset-ratio", type=float, help=f"fraction of training patches kept in the memory bank (default: {defaults.coreset_ratio})")
    fit.add_argument("--coreset-chunk-rows", type=int, help=f"training patches buffered per coreset chunk; lower it on small devices (default: {defaults.coreset_chunk_rows})")
    fit.add_argument("--memory-budget-mb", type=float, help="refuse to fit when the memory bank and coreset buffer would exceed this many MiB (default: no check)")
    fit.add_argument("--mode", choices=["rgb+xyz", "xyz", "rgb"], help="fit the multimodal detector on frames with xyz point clouds: fused, 3D only, or its RGB branch (default: the RGB detector)")
    fit.add_argument("--point-features", choices=["fpfh", "point_mae"], help="point features of --mode rgb+xyz or xyz (default: fpfh, which needs no weights)")
    fit.add_argument("--point-checkpoint", type=Path, help="Point-MAE checkpoint for --point-features point_mae: an official pretrain.pth or one from `qcstream pretrain-points`")
    fit.add_argument("--point-mae-points", type=int, help="points of each cloud the Point-MAE encoder sees; use the value it was pretrained with (default: 8192)")
    fit.add_argument("--target-fpr", type=float, help=f"false-positive rate on normal validation images that sets the threshold (default: {defaults.target_fpr})")
    fit.set_defaults(func=cmd_fit)

    evaluate = commands.add_parser("evaluate", help="print image AUROC, pixel AUROC and AUPRO on a labelled test folder")
    evaluate.add_argument("test_folder", help="data set root or its test folder")
    evaluate.add_argument("--model-dir", type=Path, help="model to evaluate (default: $QCSTREAM_MODEL_DIR)")
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.add_argument("--report", type=Path, help="also write an HTML report (index.html, curves, overlays) into this folder")
    evaluate.set_defaults(func=cmd_evaluate)

    calibrate = commands.add_parser("calibrate", help="set the model's threshold for a target FPR or FNR and save it")
    target = calibrate.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-fpr", type=float, help="false-positive rate on the folder's good images (its validation split for a data set root)")
    target.add_argument("--target-fnr", type=float, help="false-negative rate on the folder's defective images (its test split for a data set root)")
    calibrate.add_argument("folder", help="good images for --target-fpr; a labelled folder in MVTec layout for --target-fnr")
    calibrate.add_argument("--model-dir", type=Path, help="model to recalibrate and overwrite (default: $QCSTREAM_MODEL_DIR)")
    calibrate.set_defaults(func=cmd_calibrate)

    produce = commands.add_parser("produce", help="send images as camera frames (a camera station)")
    produce.add_argument("images", nargs="+", help="image files or folders of images")
    produce.add_argument("--line", required=True, help="production line id")
    produce.add_argument("--camera", required=True, help="camera id")
    produce.add_argument("--interval", type=float, default=0.0, help="seconds between frames (default: 0)")
    produce.add_argument("--no-clouds", action="store_true", help="send RGB only, even where an xyz point cloud sits beside the image")
    produce.set_defaults(func=cmd_produce)

    worker = commands.add_parser("worker", help="run the Faust inspection worker")
    worker.set_defaults(func=cmd_worker)

    label = commands.add_parser("label", help="send an inspector's label for one frame")
    label.add_argument("--frame-id", required=True)
    label.add_argument("--line", required=True)
    verdict = label.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--verdict", choices=["defect", "good"], help="the inspector's verdict")
    verdict.add_argument("--mask", help="a defect mask image: defect when any pixel is non-zero")
    label.add_argument("--defect-type", help="defect class, e.g. cut or hole")
    label.add_argument("--inspector", help="who or which audit station labelled the frame")
    label.set_defaults(func=cmd_label)

    report = commands.add_parser("report", help="print the quality report computed by DuckDB")
    window = report.add_mutually_exclusive_group()
    window.add_argument("--window", type=float, default=None, help="rolling window in seconds (default: all data)")
    window.add_argument("--last", type=int, default=None, help="use the last N labelled frames per line for FNR and FPR")
    report.set_defaults(func=cmd_report)

    demo = commands.add_parser("demo", help="run the whole streaming inspection end to end on the tire data")
    demo.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec3d_tire"), help="MVTec 3D-AD or MVTec AD data set root (default: ../shared/data/mvtec3d_tire)")
    demo.add_argument("--refit", action="store_true", help="fit the model again even when one exists")
    demo.add_argument("--keep-services", action="store_true", help="leave Kafka and MinIO running at the end")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all results (default: 900)")
    demo.set_defaults(func=cmd_demo)

    add_point_commands(commands)
    add_compress_command(commands)
    add_subscribe_command(commands)
    add_query_command(commands)
    add_dashboard_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI reports any failure as one line, with details at debug level
        logger.debug("command failed", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
