"""``ml-playground ckpt``: ls, show, verify, cp, consolidate and export on local paths and URLs."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

from ml_playground.checkpoint import CheckpointKind
from ml_playground.cli.common import Formatter, LocationArgs
from ml_playground.cli.render import Renderer
from ml_playground.flows import ckpt_copy, ckpt_tools

__all__ = ["add_commands"]

_EXAMPLES = {
    "ls": "examples:\n  ml-playground ckpt ls out/tiny_chars\n"
    "  ml-playground ckpt ls s3://my-bucket/runs/a -o endpoint_url=http://127.0.0.1:9000\n",
    "show": "examples:\n  ml-playground ckpt show out/tiny_chars/ckpt_last_00000500.pt\n"
    "  ml-playground ckpt show s3://my-bucket/runs/a/ckpt_best_00000300_1.234567.pt\n",
    "verify": "examples:\n  ml-playground ckpt verify out/tiny_chars              # every checkpoint of the run\n"
    "  ml-playground ckpt verify out/tiny_chars/ckpt_last_00000500.pt\n",
    "cp": "examples:\n  ml-playground ckpt cp out/tiny_chars s3://my-bucket/runs/a          # a whole run\n"
    "  ml-playground ckpt cp s3://my-bucket/runs/a/ckpt_last_00000400.pt backup/   # one checkpoint\n",
    "consolidate": "examples:\n  ml-playground ckpt consolidate out/big/ckpt_last_00000500.pt out/big-single\n"
    "  ml-playground ckpt consolidate s3://my-bucket/runs/a/ckpt_best_00000300_1.234567.pt single/\n",
    "export": "examples:\n  ml-playground ckpt export out/tiny_chars/ckpt_last_00000500.pt model.safetensors\n"
    "  ml-playground ckpt export s3://my-bucket/runs/a/ckpt_last_00000400.pt raw.safetensors --raw-weights\n",
}
_HELP = {
    "ls": "list the checkpoints of a run location (kind, iteration, metric, size, time; a sharded checkpoint's "
    "world size and size with its parts) and leftover parts of saves that did not complete",
    "show": "print a checkpoint's metadata (no model is built)",
    "verify": "fully read and check every checkpoint of a location (a sharded one with all of its parts), or one "
    "checkpoint; exit 1 if any is bad. Leftover parts are listed, and do not fail the check",
    "cp": "copy a run or one checkpoint between stores, atomically; each file is verified (in TMPDIR) before it "
    "is written to the destination; a sharded checkpoint's parts first, its manifest last",
    "consolidate": "write a sharded checkpoint as one single-file checkpoint (same name) into another run location, "
    "which a single-process or DDP run can resume from",
    "export": "write a checkpoint's model weights (EMA by default) as a .safetensors file",
}


def add_commands(commands: Any) -> None:
    ckpt = commands.add_parser(
        "ckpt",
        help="inspect, verify, copy and export checkpoints",
        description="Checkpoint tools. Every PATH_OR_URL may be a local path or an s3:// / gs:// URL; show, "
        "verify, export and cp also read one checkpoint from an http(s):// URL (e.g. a presigned URL).",
        formatter_class=Formatter,
    )
    tools = ckpt.add_subparsers(dest="ckpt_command", metavar="TOOL", required=True)
    parsers = {
        name: tools.add_parser(
            name, help=_HELP[name], description=_HELP[name], epilog=_EXAMPLES[name], formatter_class=Formatter
        )
        for name in _HELP
    }
    parsers["ls"].add_argument("location", metavar="LOCATION")
    parsers["show"].add_argument("checkpoint", metavar="CHECKPOINT")
    parsers["verify"].add_argument("target", metavar="LOCATION_OR_FILE")
    parsers["cp"].add_argument("src", metavar="SRC", help="a run location or one checkpoint file")
    parsers["cp"].add_argument("dst", metavar="DST", help="a location (or a .pt file name when SRC is one file)")
    parsers["consolidate"].add_argument("checkpoint", metavar="CHECKPOINT", help="a sharded checkpoint")
    parsers["consolidate"].add_argument("dst", metavar="DEST", help="another run location")
    parsers["export"].add_argument("checkpoint", metavar="CHECKPOINT")
    parsers["export"].add_argument("out", metavar="OUT.safetensors")
    parsers["export"].add_argument("--raw-weights", action="store_true", help="export the raw weights, not EMA")
    for name, parser in parsers.items():
        parser.add_argument(
            "-o",
            "--storage-option",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a storage option for URLs (repeatable), e.g. endpoint_url=http://127.0.0.1:9000, region=eu-west-1",
        )
        parser.set_defaults(func=globals()[f"_cmd_{name}"])


def _cmd_ls(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    location = where.location(args.location, "LOCATION")
    where.check_options_used()
    listing = ckpt_tools.list_checkpoints(location)
    infos = listing.checkpoints
    print(f"{len(infos)} checkpoint{'s' if len(infos) != 1 else ''} in {listing.url}")
    if infos:
        print(f"{'kind':<5} {'iteration':>10} {'metric':>12} {'size':>10}  {'modified (UTC)':<19}  name")
    for info in infos:
        metric = f"{info.name.metric:.6f}" if info.kind is CheckpointKind.BEST and info.name.metric is not None else "-"
        ranks = (
            "parts incomplete"
            if info.world_size is None
            else f"{info.world_size} rank{'s' if info.world_size > 1 else ''}"
        )
        layout = f"  (sharded: {ranks}, {len(info.parts)} parts)" if info.sharded else ""
        print(
            f"{info.kind.value:<5} {info.iter_num:>10} {metric:>12} {_size(info.size):>10}  "
            f"{_time(info.modified):<19}  {info.filename}{layout}"
        )
    if listing.leftovers:
        print(
            f"{len(listing.leftovers)} leftover part(s) of saves that did not complete (the next writer removes them):"
        )
    for obj in listing.leftovers:
        print(f"leftover {_size(obj.size):>10}  {_time(obj.modified):<19}  {obj.name}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    location, name = where.file(args.checkpoint)
    where.check_options_used()
    checkpoint, source = ckpt_tools.read_checkpoint(location, name)
    print(source)
    for key, value in ckpt_tools.summarize(checkpoint).items():
        print(f"  {key + ':':<17} {value}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    name = None
    if where.is_file(args.target):
        location, name = where.file(args.target)
    else:
        location = where.location(args.target, "LOCATION")
    where.check_options_used()
    result = ckpt_tools.verify(location, name)
    for good in result.good:
        print(f"ok   {good}")
    for bad, reason in result.bad.items():
        print(f"BAD  {bad}: {reason}")
    for leftover in result.leftovers:
        print(f"left {leftover}: a part of a save that did not complete (the next writer removes it)")
    total = len(result.good) + len(result.bad)
    left = f", {len(result.leftovers)} leftover part(s)" if result.leftovers else ""
    print(
        f"{total} checkpoint{'s' if total != 1 else ''} in {result.url}: {len(result.good)} ok, "
        f"{len(result.bad)} bad{left}"
    )
    return 1 if result.bad else 0


def _cmd_cp(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    name = dst_name = None
    if where.is_file(args.src):
        src, name = where.file(args.src)
    else:
        src = where.location(args.src, "SRC")
    if name is not None and where.is_file(args.dst):
        dst, dst_name = where.file(args.dst, for_writing=True)
    else:
        dst = where.location(args.dst, "DST")
    where.check_options_used()
    with Renderer() as render:
        result = ckpt_copy.copy_checkpoints(src, dst, name=name, dst_name=dst_name, on_event=render)
    for copied in result.copied:
        print(f"copied and verified {result.destination}/{copied}")
    print(f"{len(result.copied)} checkpoint{'s' if len(result.copied) != 1 else ''} copied from {result.source}")
    return 0


def _cmd_consolidate(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    location, name = where.file(args.checkpoint)
    dst = where.location(args.dst, "DEST")
    where.check_options_used()
    url = ckpt_copy.consolidate(location, name, dst)
    print(f"wrote {url}, a single-file checkpoint of the sharded {name}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    where = LocationArgs(args.storage_option)
    location, name = where.file(args.checkpoint)
    out_location, out_name = where.file(args.out, for_writing=True)
    where.check_options_used()
    checkpoint, source = ckpt_tools.read_checkpoint(location, name)
    url, weights = ckpt_tools.export_safetensors(
        checkpoint, source, out_location, out_name, use_ema=not args.raw_weights
    )
    print(f"exported the {weights} weights of {source} to {url}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"
