"""`uniformer bench <what>`: measurements of one part of the system, printed as one JSON line.

    uniformer bench data --videos 8 --workers 2 --frames 16 --rate 4 --clips 128
    uniformer bench train          # the demo config on its synthetic set; --config/--manifest for others
    uniformer bench ingest --workers 2,4   # decode nodes only against trainers' nodes first, simulated cluster

`data`: clips/s of the data path (plain loop, process pool, Ray Data) and the cost of a
seek-decoded clip against its window (`pipeline.bench.data`). `train`: the training loop on Ray
Train fed by the clip stream against the same loop fed from memory: the data-stall fraction
(`pipeline.bench.train`). `ingest`: the training stream decoded on the decode nodes only against
the trainers' nodes first, on a simulated multi-node cluster: clips/s, data wait, decode tasks per
epoch, peak object store, decode CPU on the decode node, clip bytes crossing between nodes
(`pipeline.bench.ingest`). `model`: clips/s, step time, peak
memory and MFU of the network, optionally beside the plain reference formulation; `dwconv`: one
depthwise 3D convolution, PyTorch against the Triton op (`pipeline.bench.model`). `gpu`: every
GPU-only test and benchmark against its target (`pipeline.bench.gpu`; `make gpu-check`). Each
subcommand is a subparser here whose work lives in `pipeline/bench/<what>.py`; add one with `_add_<what>` + `SUBCOMMANDS`.
Every subcommand also takes `--config FILE.yaml` and `key=value` overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.bench.model import add_dwconv_parser, add_model_parser
from pipeline.config import Config, ConfigError, add_config_args, int_at_least, load_config


def _progress() -> Callable[[str], None]:
    from rich.console import Console

    console = Console(stderr=True)
    return lambda message: console.log(message)


# ---------------------------------------------------------------------------------------------
# data


def _add_data(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="clips/s of the data path and the cost of seeking",
                       description="Clips/s of a plain loop, a process pool and the Ray Data pipeline over the "
                       "same videos, and the cost of a seek-decoded clip against its window.")
    p.add_argument("--videos", type=int_at_least(1), default=8, help="synthetic videos to write (default 8)")
    p.add_argument("--video-frames", type=int_at_least(1), default=300, help="frames per synthetic video (default 300)")
    p.add_argument("--height", type=int_at_least(1), default=240, help="synthetic video height (default 240)")
    p.add_argument("--width", type=int_at_least(1), default=320, help="synthetic video width (default 320)")
    p.add_argument("--manifest", default="", metavar="URI",
                   help="measure throughput on this manifest's ok rows of --split instead (no seek figures)")
    p.add_argument("--split", default="train", help="split of --manifest to use (default train)")
    p.add_argument("--workers", type=int_at_least(1), default=2, help="pool processes = Ray decode tasks (default 2)")
    p.add_argument("--frames", type=int_at_least(1), help="clip frames (sets data.num_frames; default from config)")
    p.add_argument("--rate", type=int_at_least(1), help="sampling rate in original frames (sets data.sampling_rate)")
    p.add_argument("--clips", type=int_at_least(1), default=128, help="clips per throughput measurement (default 128)")
    p.add_argument("--seek-clips", type=int, default=24, help="clips per seek-cost measurement; 0 skips it")
    p.add_argument("--modes", default="loop,pool,ray",
                   help="comma-separated: loop, pool, ray (throughput), cost (CPU per training clip, augmentation "
                        "in the decode task vs on the device; default loop,pool,ray)")
    p.add_argument("--clips-per-s-per-gpu", type=float, default=172.0,
                   help="the rate one GPU trains at, for cores per GPU in mode cost (default 172: UniFormer-S 16x224 "
                        "on an H200, the gpu-check target)")
    p.add_argument("--work-dir", default="work/bench_data", help="local folder for the synthetic videos")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_run_data, flag_keys={"frames": "data.num_frames", "rate": "data.sampling_rate"})
    return p


def _run_data(args: argparse.Namespace, cfg: Config, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from pipeline.bench.data import BenchVideos, run_data_bench

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = sorted(set(modes) - {"loop", "pool", "ray", "cost"})
    if unknown or not modes:
        parser.error(f"--modes {args.modes!r}: use a comma-separated subset of loop, pool, ray, cost")
    if args.height % 2 or args.width % 2:
        parser.error(f"--height {args.height} and --width {args.width} must be even (H.264 in yuv420p)")
    if not args.clips_per_s_per_gpu > 0:
        parser.error(f"--clips-per-s-per-gpu {args.clips_per_s_per_gpu}: must be > 0")
    spec = BenchVideos(videos=args.videos, video_frames=args.video_frames, height=args.height, width=args.width,
                       seed=args.seed)
    return run_data_bench(data=cfg.data, storage=cfg.storage, spec=spec, workers=args.workers, clips=args.clips,
                          seek_clips=args.seek_clips, manifest_uri=args.manifest, split=args.split,
                          work_dir=args.work_dir, modes=modes, clips_per_s_per_gpu=args.clips_per_s_per_gpu,
                          progress=_progress())


# ---------------------------------------------------------------------------------------------
# train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "infra" / "configs" / "demo.yaml"


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    """--manifest, or the synthetic set made once under --work-dir (shared by train and ingest)."""
    p.add_argument("--manifest", default="", metavar="URI",
                   help="a prepared dataset (default: a synthetic set made once under --work-dir)")
    p.add_argument("--videos-per-class", type=int_at_least(2), default=16,
                   help="synthetic videos per class, a quarter of them val (default 16)")
    p.add_argument("--work-dir", default="work/bench_train", help="synthetic set and checkpoints go here")


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="training clips/s on the clip stream against in-memory clips",
                       description="Runs the training loop on Ray Train three times: fed by the Ray Data clip stream "
                       "and from memory, which give the data-stall fraction, and from memory checkpointing every epoch, which gives "
                       "a checkpointing step beside a plain one. "
                       f"The config defaults to {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[2])}.")
    _add_dataset_args(p)
    p.add_argument("--epochs", type=int_at_least(2), default=2, help="epochs per run; the last is measured (default 2)")
    p.add_argument("--steps", type=int_at_least(1), default=8, help="at most this many steps per epoch (default 8)")
    p.add_argument("--tracking-outage", type=int_at_least(1), metavar="SECONDS",
                   help="instead: one stream run logging to a local mlflow server that is down this long; "
                   "step times before, during and after the outage")
    p.set_defaults(run=_run_train, config=str(DEMO_CONFIG))
    return p


def _run_train(args: argparse.Namespace, cfg: Config, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from pipeline.bench.train import run_outage_bench, run_train_bench

    if args.tracking_outage:
        return run_outage_bench(cfg, outage_s=args.tracking_outage, manifest_uri=args.manifest,
                                steps=args.steps, videos_per_class=args.videos_per_class, work_dir=args.work_dir,
                                progress=_progress())
    return run_train_bench(cfg, manifest_uri=args.manifest, epochs=args.epochs, steps=args.steps,
                           videos_per_class=args.videos_per_class, work_dir=args.work_dir, progress=_progress())


# ---------------------------------------------------------------------------------------------
# ingest


def _add_ingest(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("ingest", help="where the training stream decodes, on a simulated multi-node cluster",
                       description="The training stream decoded on the decode nodes only against the trainers' "
                       "nodes first (data.decode_placement), on a simulated cluster of GPU nodes and a CPU-only "
                       "decode node (pipeline.bench.ingest). "
                       f"The config defaults to {DEMO_CONFIG.relative_to(DEMO_CONFIG.parents[2])}.")
    _add_dataset_args(p)
    p.add_argument("--workers", default="2,4", help="numbers of trainers, comma-separated (default 2,4)")
    p.add_argument("--gpu-nodes", type=int_at_least(1), default=2, help="simulated GPU nodes (default 2)")
    p.add_argument("--decode-cpus", type=int_at_least(1), default=4, help="CPUs of the decode node (default 4)")
    p.add_argument("--step-ms", type=float, default=50.0, help="simulated training step per batch (default 50)")
    p.add_argument("--epochs", type=int_at_least(1), default=3, help="epochs per run (default 3)")
    p.set_defaults(run=_run_ingest, config=str(DEMO_CONFIG))
    return p


def _run_ingest(args: argparse.Namespace, cfg: Config, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from pipeline.bench.ingest import run_ingest_bench
    from pipeline.bench.train import synth_manifest

    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        workers = ()
    if not workers or min(workers) < 1:
        parser.error(f"--workers {args.workers!r}: use comma-separated positive integers, e.g. 2,4")
    manifest = args.manifest or synth_manifest(args.work_dir, classes=cfg.model.num_classes,
                                               videos_per_class=args.videos_per_class, seed=cfg.train.seed,
                                               progress=_progress())
    return run_ingest_bench(cfg, manifest_uri=manifest, workers=workers, gpu_nodes=args.gpu_nodes,
                            decode_node_cpus=args.decode_cpus, step_ms=args.step_ms, epochs=args.epochs,
                            progress=_progress())


# ---------------------------------------------------------------------------------------------
# gpu


def _add_gpu(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("gpu", help="every GPU-only test and benchmark, one table of targets (make gpu-check)",
                       description="Runs tests/gpu and the model and depthwise-conv benchmarks against their "
                       "targets (pipeline.bench.gpu); without CUDA says so and exits 0.")
    p.set_defaults(run=_run_gpu)
    return p


def _run_gpu(args: argparse.Namespace, cfg: Config, parser: argparse.ArgumentParser) -> dict[str, Any]:
    from pipeline.bench.gpu import run_gpu_check

    return run_gpu_check(progress=_progress())


# ---------------------------------------------------------------------------------------------

SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], argparse.ArgumentParser], ...] = (
    _add_data, _add_train, _add_ingest, add_model_parser, add_dwconv_parser, _add_gpu)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniformer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True, metavar="<what>")
    for add in SUBCOMMANDS:
        sub_parser = add(sub)
        add_config_args(sub_parser)
        sub_parser.set_defaults(subparser=sub_parser)  # errors then name the subcommand
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sub = args.subparser
    flags = [f"{key}={getattr(args, dest)}" for dest, key in getattr(args, "flag_keys", {}).items()
             if getattr(args, dest) is not None]
    try:
        cfg = load_config(args.config, [*args.overrides, *flags])
    except ConfigError as err:
        sub.exit(2, f"{sub.prog}: config error: {err}\n")
    from pipeline.data.storage import StorageError

    try:
        summary = args.run(args, cfg, sub)
    except (ValueError, StorageError) as err:
        sub.exit(2, f"{sub.prog}: error: {err}\n")
    print(json.dumps({"bench": args.what, **summary}), flush=True)
    if summary.get("ok") is False:  # a check (gpu) that missed a target fails the command
        sys.exit(1)
    return summary


if __name__ == "__main__":
    main()
