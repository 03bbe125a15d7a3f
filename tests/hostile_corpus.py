"""A corpus of hostile checkpoint files, one per class of issue 17, at the sizes the originals had.

Each case is a file (or a special file) under a checkpoint name, built from a valid checkpoint of the
tiny CLI experiment (``BASE_ITER``): the structure attacks keep a bogus integrity record (they must be
refused before any digest is computed), the content attacks carry valid digests (they must be refused
by what uses them). :data:`EXPECTED` says, per case, the exit code of each reading command: 1 or 2 where
the command needs the hostile part, 0 where it does not (``ckpt ls`` reads names only; ``ckpt verify``
of a file whose bytes match their digests is ``ok`` whatever model it describes).
"""

from __future__ import annotations

import io
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ml_playground.checkpoint.format import integrity_record

__all__ = ["BASE_NAME", "BUILDERS", "COMMANDS", "EXPECTED", "build"]

BASE_NAME = "ckpt_last_00000000.pt"
COMMANDS = ("ls", "show", "verify", "cp", "export", "sample", "eval", "train")

Payload = dict[str, Any]
_FAIL = {"ls": 0, **{command: 1 for command in COMMANDS if command != "ls"}}
_SOUND_BYTES = {"ls": 0, "show": 0, "verify": 0, "cp": 0, "export": 0}


def _body(payload: Payload) -> Payload:
    return {key: value for key, value in payload.items() if key != "integrity"}


def _saved(payload: Payload) -> bytes:
    buffer = io.BytesIO()
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # torch.save's pickler recurses once per level of the deep list
    try:
        torch.save(payload, buffer)
    finally:
        sys.setrecursionlimit(limit)
    return buffer.getvalue()


def _valid(payload: Payload) -> bytes:
    """``payload`` with a correct integrity record: only what uses its content can object to it."""
    body = _body(payload)
    return _saved({**body, "integrity": integrity_record(body)})


def _unverifiable(payload: Payload) -> bytes:
    """``payload`` keeping the base file's (now wrong) integrity record: computing a right one would take the
    very work the file is built to cause."""
    return _saved(payload)


def _meta(payload: Payload, **changes: Any) -> Payload:
    return {**payload, "meta": {**payload["meta"], **changes}}


def _model_args(payload: Payload, **changes: Any) -> bytes:
    return _valid(_meta(payload, model_args={**payload["meta"]["model_args"], **changes}))


def _data_state(payload: Payload, **changes: Any) -> bytes:
    return _valid(_meta(payload, data_state={**payload["meta"]["data_state"], **changes}))


def _saved_config(payload: Payload, section: str, key: str, value: object) -> bytes:
    config = payload["meta"]["config"]
    train = {**config["train"], section: {**config["train"][section], key: value}}
    return _valid(_meta(payload, config={**config, "train": train}))


def shared_tuples(levels: int) -> object:
    value: object = ()
    for _ in range(levels):
        value = (value, value, value)
    return value


def deep_list(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = [value]
    return value


def _tensor(payload: Payload, tensor: torch.Tensor) -> bytes:
    return _unverifiable({**payload, "rng_state": {**payload["rng_state"], "extra": tensor}})


def _weights(payload: Payload, value: float) -> bytes:
    model = {key: torch.full_like(tensor, value) for key, tensor in payload["model"].items()}
    return _valid({**payload, "model": model, "ema": None})


def _optimizer_mismatch(payload: Payload) -> bytes:
    optimizer = payload["optimizer"]
    state = {index: {**entry, "exp_avg": torch.zeros(3)} for index, entry in optimizer["state"].items()}
    if not state:  # a checkpoint of iteration 0 has no moments yet: give the first parameter wrong ones
        state = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}}
    return _valid({**payload, "optimizer": {**optimizer, "state": state}})


def _zip_bomb(base: bytes) -> bytes:
    """The base archive with its ``data.pkl`` deflated and followed by 1.3 GB of zeros (which unpickling
    ignores: the pickle ends at its STOP opcode): ~1.3 MB on disk, the original's class and size."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if not info.filename.endswith("/data.pkl"):
                target.writestr(zipfile.ZipInfo(info.filename), data, compress_type=zipfile.ZIP_STORED)
                continue
            entry = zipfile.ZipInfo(info.filename)
            entry.compress_type = zipfile.ZIP_DEFLATED
            with target.open(entry, "w", force_zip64=True) as member:
                member.write(data)
                zeros = bytes(16 << 20)
                for _ in range(78):
                    member.write(zeros)
    return out.getvalue()


Builder = Callable[[Payload, bytes], bytes]
BUILDERS: dict[str, Builder] = {
    "control (a valid checkpoint)": lambda p, b: b,
    "1. shared tuples 3^16": lambda p, b: _unverifiable(
        _meta(p, config={**p["meta"]["config"], "x": shared_tuples(16)})
    ),
    "1. shared tuples 3^40": lambda p, b: _unverifiable(
        _meta(p, config={**p["meta"]["config"], "x": shared_tuples(40)})
    ),
    "1. list nested 5,000 deep": lambda p, b: _unverifiable(
        _meta(p, config={**p["meta"]["config"], "x": deep_list(5000)})
    ),
    "2. n_embd = 16384": lambda p, b: _model_args(p, n_embd=16384),
    "2. n_embd = 1e6": lambda p, b: _model_args(p, n_embd=1_000_000),
    "2. corpus_chars = 1e10": lambda p, b: _data_state(p, corpus_chars=10**10),
    "2. saved batch_size = 1e9": lambda p, b: _saved_config(p, "data", "batch_size", 10**9),
    "3. zeros(1).expand(2**40)": lambda p, b: _tensor(p, torch.zeros(1).expand(2**40)),
    "3. zeros(1).expand(2**28), float64": lambda p, b: _tensor(p, torch.zeros(1, dtype=torch.float64).expand(2**28)),
    "3. sparse tensor": lambda p, b: _tensor(
        p, torch.sparse_coo_tensor([[0, 1]], [1.0, 2.0], (2**40,), check_invariants=True)
    ),
    "3. meta tensor": lambda p, b: _tensor(p, torch.empty(2**40, device="meta")),
    "4. deflated data.pkl (zip bomb)": lambda p, b: _zip_bomb(_saved(p)),
    "5. n_head = 0": lambda p, b: _model_args(p, n_head=0),
    "5. n_head does not divide n_embd": lambda p, b: _model_args(p, n_head=3),
    "5. duplicate vocabulary": lambda p, b: _data_state(p, vocab="aa" + p["meta"]["data_state"]["vocab"][2:]),
    "5. short vocabulary": lambda p, b: _data_state(p, vocab=p["meta"]["data_state"]["vocab"][:5]),
    "5. saved eval_iters = 0": lambda p, b: _saved_config(p, "runtime", "eval_iters", 0),
    "5. saved seed = 2**70": lambda p, b: _saved_config(p, "runtime", "seed", 2**70),
    "5. val_fraction = NaN": lambda p, b: _data_state(p, val_fraction=float("nan")),
    "5. optimizer state that does not fit": lambda p, b: _optimizer_mismatch(p),
    "5. RNG state that does not fit": lambda p, b: _valid(
        {**p, "rng_state": {**p["rng_state"], "torch": torch.zeros(3)}}
    ),
    "5. model state with an extra weight": lambda p, b: _valid({**p, "model": {**p["model"], "x": torch.zeros(1)}}),
    "5. NaN weights": lambda p, b: _weights(p, float("nan")),
    "5. inf weights": lambda p, b: _weights(p, float("inf")),
}

_MODEL = {"sample": 1, "eval": 1, "train": 2}  # train compares the saved setup with its config first: exit 2
EXPECTED: dict[str, dict[str, int]] = {
    "control (a valid checkpoint)": dict.fromkeys(COMMANDS, 0),
    "2. n_embd = 16384": {**_SOUND_BYTES, **_MODEL},
    "2. n_embd = 1e6": {**_SOUND_BYTES, **_MODEL},
    "2. corpus_chars = 1e10": {**_SOUND_BYTES, "sample": 0, "eval": 1, "train": 2},
    "2. saved batch_size = 1e9": {**_SOUND_BYTES, "sample": 0, "eval": 1, "train": 0},
    "5. n_head = 0": {**_SOUND_BYTES, **_MODEL},
    "5. n_head does not divide n_embd": {**_SOUND_BYTES, **_MODEL},
    "5. duplicate vocabulary": {**_SOUND_BYTES, **_MODEL},
    "5. short vocabulary": {**_SOUND_BYTES, **_MODEL},
    "5. saved eval_iters = 0": {**_SOUND_BYTES, "sample": 0, "eval": 1, "train": 0},
    "5. saved seed = 2**70": {**_SOUND_BYTES, "sample": 0, "eval": 1, "train": 0},
    "5. val_fraction = NaN": {**_SOUND_BYTES, "sample": 0, "eval": 1, "train": 2},
    "5. optimizer state that does not fit": {**_SOUND_BYTES, "sample": 0, "eval": 0, "train": 1},
    "5. RNG state that does not fit": {**_SOUND_BYTES, "sample": 0, "eval": 0, "train": 1},
    "5. model state with an extra weight": {**_SOUND_BYTES, "sample": 1, "eval": 1, "train": 1},
    # a diverged run's weights: sample/eval name them; a resume goes on and says once that the loss is NaN
    "5. NaN weights": {**_SOUND_BYTES, "sample": 1, "eval": 1, "train": 0},
    "5. inf weights": {**_SOUND_BYTES, "sample": 1, "eval": 1, "train": 0},
}
for _case in BUILDERS:
    EXPECTED.setdefault(_case, _FAIL)


def build(base_file: Path, out_dir: Path) -> dict[str, Path]:
    """Every case's file, each as ``out_dir/<n>/ckpt_last_00000000.pt``; returns case -> file."""
    base = base_file.read_bytes()
    payload = torch.load(base_file, weights_only=True)
    files = {}
    for index, (case, builder) in enumerate(BUILDERS.items()):
        run = out_dir / f"case{index:02d}"
        run.mkdir(parents=True)
        (run / BASE_NAME).write_bytes(builder(payload, base))
        files[case] = run / BASE_NAME
    return files
