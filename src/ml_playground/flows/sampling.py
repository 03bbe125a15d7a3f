"""Sampling and evaluation from a checkpoint: the model is built from the checkpoint's own ``model_args``.

Neither needs the config that trained the run, nor any data file: the vocabulary travels in
``Checkpoint.data_state`` and the bundled corpus is regenerated from it for evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from ml_playground.checkpoint import CheckpointInfo, CheckpointManager, ModelWeights, open_store
from ml_playground.config import DataConfig, SamplingConfig, TrainRuntimeConfig
from ml_playground.errors import CheckpointNotFoundError, CheckpointRotatedAwayError, CheckpointSchemaError
from ml_playground.flows import limits
from ml_playground.flows.evaluation import eval_batches
from ml_playground.flows.evaluation import evaluate as evaluate_batches
from ml_playground.flows.events import EventSink, Fetching
from ml_playground.locations import Location
from ml_playground.workload.data import splits_for_checkpoint, tokenizer_for_checkpoint
from ml_playground.workload.model import GPT, GPTArgs

__all__ = [
    "LoadedModel",
    "evaluate",
    "generate",
    "load_checkpoint",
    "load_model",
]

Weights = Literal["ema", "raw"]


@dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint, with the file it came from and which weights it holds."""

    model: GPT
    checkpoint: ModelWeights
    source: str
    weights: Weights


def load_checkpoint(
    location: Location,
    *,
    name: str | None = None,
    policy: Literal["latest", "best"] = "best",
    mode: Literal["min", "max"] = "min",
    on_event: EventSink | None = None,
) -> tuple[ModelWeights, str]:
    """Read one checkpoint's weights: ``name`` in ``location``, or the one ``policy`` picks; returns them and the URL.

    ``mode`` says which best checkpoint is best: the lowest metric (``"min"``) or the highest.

    A checkpoint is read without its optimizer state (from a remote store only the model's and EMA's
    bytes are fetched). A file with another name (a copy such as ``model.pt``) is read and verified, with
    no name to match. A read from a store without local files is reported to ``on_event`` first. A
    chosen checkpoint that rotation deletes before it is read is chosen again (three attempts in all).
    """
    manager = CheckpointManager(open_store(location), mode=mode)
    remote = manager.store.capabilities.local_path is None

    def announce(info: CheckpointInfo) -> None:
        if on_event is not None and remote:
            on_event(Fetching(f"{manager.store.url}/{info.filename}", info.size))

    if name is not None:
        if on_event is not None and remote:
            sizes = {obj.name: obj.size for obj in manager.store.list()}
            on_event(Fetching(f"{manager.store.url}/{name}", sizes.get(name)))
        return manager.load_weights(name), f"{manager.store.url}/{name}"
    try:
        chosen, weights = manager.load_chosen_weights(policy, on_choose=announce)
    except CheckpointRotatedAwayError:
        raise
    except CheckpointNotFoundError as exc:
        other = "latest" if policy == "best" else "best"
        raise CheckpointNotFoundError(
            f"{exc} (sample.runtime.read_policy = {policy!r}); train there first, pass --checkpoint FILE, "
            f"or use --set sample.runtime.read_policy={other}"
        ) from None
    return weights, f"{manager.store.url}/{chosen.filename}"


def load_model(checkpoint: ModelWeights, source: str, *, use_ema: bool, device: str = "cpu") -> LoadedModel:
    """Build the network from ``checkpoint.model_args``; EMA weights when present and ``use_ema``."""
    args = GPTArgs.from_plain(checkpoint.model_args, source=source)
    weights: Weights = "raw"
    state = checkpoint.model
    if use_ema and checkpoint.ema is not None:
        weights, state = "ema", checkpoint.ema
    # before anything is built: the arguments' bounds, the weights' names and shapes, the memory it takes
    limits.check_model(args, state, source)
    limits.check_finite(state, "ema" if weights == "ema" else "model", source)
    tokenizer = tokenizer_for_checkpoint(checkpoint.data_state, source=source)
    if tokenizer.size != args.vocab_size:
        raise CheckpointSchemaError(
            f"{source}: its vocabulary has {tokenizer.size} characters, but model_args.vocab_size is {args.vocab_size}"
        )
    model = GPT(args)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointSchemaError(f"{source}: its weights do not fit its model_args ({exc})") from None
    model.to(torch.device(device))
    model.eval()
    return LoadedModel(model, checkpoint, source, weights)


def generate(loaded: LoadedModel, settings: SamplingConfig, device: str = "cpu") -> list[str]:
    """``settings.num_samples`` texts, each ``start`` followed by ``max_new_tokens`` sampled characters."""
    tokenizer = tokenizer_for_checkpoint(loaded.checkpoint.data_state, source=loaded.source)
    start = tokenizer.encode(settings.start)
    if not start:
        start = [0]
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    idx = torch.tensor([start], dtype=torch.long, device=device)
    texts = []
    for _ in range(settings.num_samples):
        out = loaded.model.generate(
            idx,
            settings.max_new_tokens,
            temperature=settings.temperature,
            top_k=settings.top_k or None,
            generator=generator,
        )
        texts.append(tokenizer.decode(out[0].tolist()))
    return texts


def evaluate(loaded: LoadedModel, device: str = "cpu") -> dict[str, float]:
    """Training and validation loss on the bundled data, on the batches the trainer evaluated."""
    ckpt = loaded.checkpoint
    args = loaded.model.args
    batch_size, eval_iters, seed = _eval_settings(ckpt.config, loaded.source)
    limits.check_data_state(ckpt.data_state, loaded.source)  # before the corpus is generated
    limits.require_memory(
        limits.evaluation_bytes(args, batch_size, eval_iters),
        f"evaluating {loaded.source} (its saved train.data.batch_size = {batch_size}, "
        f"train.runtime.eval_iters = {eval_iters})",
        CheckpointSchemaError,
    )
    splits = splits_for_checkpoint(ckpt.data_state, args.block_size, source=loaded.source)
    return evaluate_batches(
        loaded.model, eval_batches(splits, args.block_size, batch_size, eval_iters, seed), torch.device(device)
    )


def _eval_settings(config: Mapping[str, object], source: str) -> tuple[int, int, int]:
    """The trainer's evaluation settings (batch size, eval_iters, seed), from the checkpoint's saved config."""
    settings = (
        (DataConfig, "batch_size", ("train", "data", "batch_size")),
        (TrainRuntimeConfig, "eval_iters", ("train", "runtime", "eval_iters")),
        (TrainRuntimeConfig, "seed", ("train", "runtime", "seed")),
    )
    values = [
        limits.saved_setting(model, field, _lookup(config, keys), ".".join(keys), source)
        for model, field, keys in settings
    ]
    return values[0], values[1], values[2]


def _lookup(tree: object, keys: tuple[str, ...]) -> object:
    for key in keys:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree
