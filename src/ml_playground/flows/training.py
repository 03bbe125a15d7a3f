"""The training loop: a small GPT on the bundled corpus, checkpointed through the manager's public API.

Order at iteration ``i`` (``i = start .. max_iters``, the training step skipped at ``max_iters``)::

    evaluate        if i % eval_interval == 0
    save best       if the metric strictly improved (NaN / inf never do)
    save last       if i % interval == 0, or i == 0, or i == max_iters
    training step i

A checkpoint at ``i`` therefore holds the state after ``i``'s evaluation and before ``i``'s step, and a
resumed run continues with the training step of the checkpoint's iteration (no evaluation or save
repeats), which makes it bitwise identical to an uninterrupted run on CPU.

Under torchrun (docs/distributed.md) every rank runs this loop on its own batches, DDP averages the
gradients, and rank 0 takes every decision (resume point, each evaluation's metric, each save) and
writes every checkpoint; a save's outcome reaches every rank before the next step.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from ml_playground.checkpoint import (
    Checkpoint,
    CheckpointManager,
    KeepPolicy,
    Lease,
    open_saver,
    open_store,
)
from ml_playground.config import ExperimentConfig, TrainConfig
from ml_playground.errors import CheckpointNotFoundError, ConfigError, StorageUnavailableError
from ml_playground.flows import limits
from ml_playground.flows._loop import Saves, SingleFileSaves, TrainingLoop
from ml_playground.flows.distributed import Ranks
from ml_playground.flows.events import Event, EventSink, Note, Started, log_events
from ml_playground.flows.preemption import Preemption
from ml_playground.flows.resume import check_resumable, model_args_for, restored_randomness
from ml_playground.flows.train_state import TrainState
from ml_playground.workload.data import Splits, load_splits
from ml_playground.workload.model import runtime_device

__all__ = ["TrainResult", "train"]


@dataclass(frozen=True)
class TrainResult:
    """What a ``train`` call did: where, up to which iteration, and which checkpoints the location holds.

    ``main`` is False on the ranks other than 0 of a torchrun launch (they report nothing). ``stopped_at``
    is set when a SIGTERM stopped the run before ``max_iters`` (docs/cli.md, preemption).
    """

    location: str
    start_iter: int
    end_iter: int
    nothing_to_do: bool
    last_metrics: dict[str, float]
    best_metric: float
    checkpoints: list[str]
    main: bool = True
    stopped_at: int | None = None
    """The iteration a SIGTERM stopped the run at (the CLI then exits 143); None when it completed."""


def train(config: ExperimentConfig, *, on_event: EventSink | None = None, take_over: bool = False) -> TrainResult:
    """Train (or resume) the run in ``config.train.runtime.out_dir``, reporting to ``on_event`` as it goes
    (default: the run's logger, ``config.context.logger``); under torchrun only rank 0 reports.

    A local or ``s3://`` run location is held under the manager's writer lease for the whole run, so a
    second ``train`` on the same location stops with LocationLockedError instead of interleaving saves.
    ``take_over=True`` takes a live writer's lease (an explicit user action; that writer stops at its next save).
    """
    rt = config.train.runtime
    runtime_device("train.runtime.device", rt.device)
    ranks = Ranks.start(rt.distributed, rt.device)
    try:
        emit = (on_event or log_events(config.context.logger)) if ranks.is_main else _silent
        tc = config.train
        splits = load_splits(tc.data.corpus_chars, tc.data.val_fraction, tc.model.block_size)
        _require_training_memory(tc, splits)
        manager, lease = _open_run(config, ranks, take_over, emit)
        try:
            _check_shared_location(manager, ranks)
            result = _train(config, splits, manager, ranks, emit)
        finally:
            if lease is not None:
                lease.release()
    except BaseException:
        ranks.close(together=False)
        raise
    ranks.close()
    return result


def _silent(event: Event) -> None:
    """The sink of ranks other than 0: logs, progress and the summary come from rank 0 only."""


def _open_run(
    config: ExperimentConfig, ranks: Ranks, take_over: bool, emit: EventSink
) -> tuple[CheckpointManager, Lease | None]:
    """Rank 0 makes the location, takes the writer lease; then every rank opens it (only rank 0 writes)."""
    rt = config.train.runtime
    ck = rt.checkpointing
    keep = KeepPolicy(last=ck.keep.last, best=ck.keep.best)

    def writer() -> tuple[CheckpointManager, Lease | None]:
        manager = CheckpointManager(open_store(rt.out_dir, create=True), keep, mode=ck.mode)
        lease = manager.acquire_writer(force=take_over) if manager.supports_writer_lease else None
        if lease is None:
            emit(
                Note(f"note: {manager.store.url} has no writer lease; never run two trainers on this location at once")
            )
            manager.remove_leftovers()  # what acquire_writer does for a store with leases
        return manager, lease

    def reader() -> CheckpointManager:
        if opened is not None:
            return opened[0]
        try:
            return CheckpointManager(open_store(rt.out_dir), keep, mode=ck.mode)
        except CheckpointNotFoundError:  # rank 0 made it: this rank does not see the same location
            raise _not_shared(str(rt.out_dir), ranks.rank) from None

    opened = ranks.on_main(writer)
    try:
        manager = ranks.everywhere(reader)
    except BaseException:
        if opened is not None and opened[1] is not None:
            opened[1].release()
        raise
    return manager, opened[1] if opened is not None else None


def _check_shared_location(manager: CheckpointManager, ranks: Ranks) -> None:
    """Every rank must see the location rank 0 writes (a local out_dir: one directory shared by every node)."""
    if not ranks.distributed:
        return
    store = manager.store
    name = ranks.decide(f".ml_playground.ranks.{secrets.token_hex(8)}")
    token = name.rpartition(".")[2].encode()

    def write() -> None:
        with store.write(name) as stream:
            stream.write(token)

    def read() -> None:
        try:
            with store.open(name) as stream:
                seen = stream.read()
        except Exception as exc:
            seen = repr(exc).encode()
        if seen != token:
            raise _not_shared(store.url, ranks.rank)

    ranks.on_main(write)
    try:
        ranks.everywhere(read)
    finally:
        ranks.on_main(lambda: store.delete(name))


def _not_shared(url: str, rank: int) -> StorageUnavailableError:
    return StorageUnavailableError(
        f"{url} is not the location rank 0 writes to (rank {rank} cannot see what rank 0 wrote there): every "
        "rank must see one out_dir; a local out_dir of a multi-node run must be one shared directory (the same "
        "path on a shared file system, e.g. an absolute path)"
    )


def _train(
    config: ExperimentConfig, splits: Splits, manager: CheckpointManager, ranks: Ranks, emit: EventSink
) -> TrainResult:
    tc = config.train
    rt = tc.runtime
    ck = rt.checkpointing
    url = manager.store.url
    chosen = ranks.on_main(lambda: manager.resume_point(ck.read_policy))
    name, sharded = ranks.decide(
        (ranks.observed(chosen.filename), chosen.sharded) if chosen is not None else (None, False)
    )
    strategy = rt.distributed.strategy
    if name is not None and sharded != (strategy == "fsdp"):
        raise ConfigError(
            f"{url}/{name} is a {'sharded' if sharded else 'single-file'} checkpoint, written with "
            f"train.runtime.distributed.strategy = {'fsdp' if sharded else 'ddp'!r}, and this run uses "
            f"{strategy!r}: a run keeps its strategy. Set strategy = {'fsdp' if sharded else 'ddp'!r}"
            + (", or write it as a single file with `ml-playground ckpt consolidate`" if sharded else "")
        )
    load = manager.load_manifest if sharded else manager.load
    resumed = ranks.everywhere(lambda: load(name)) if name is not None else None
    if ck.keep.last == 0 and ck.keep.best == 0:
        emit(Note("keep.last = 0 and keep.best = 0: this run writes no checkpoints"))
    if resumed is not None and resumed.iter_num >= rt.max_iters:
        emit(
            Note(
                f"nothing to do: {url} is already at iteration {resumed.iter_num} "
                f"and train.runtime.max_iters is {rt.max_iters}; raise max_iters to train further"
            )
        )
        names = _names(manager)
        return TrainResult(
            url, resumed.iter_num, resumed.iter_num, True, {}, resumed.best_val_loss, names, ranks.is_main
        )
    state = _state(tc, splits, manager, ranks, name, resumed)
    if resumed is not None and resumed.world_size != ranks.world_size:
        emit(
            Note(
                f"note: {name} was written by {resumed.world_size} process(es) and this run has "
                f"{ranks.world_size}: the data order differs from an uninterrupted run's"
            )
        )
    start = state.iter_num
    what = f"resuming from iteration {start}" if resumed is not None else "starting a fresh run"
    processes = f", {ranks.world_size} processes" if ranks.world_size > 1 else ""
    sharding = ", sharded (FSDP)" if strategy == "fsdp" else ""
    emit(
        Note(
            f"{what} in {url} ({state.param_count():,} parameters, vocabulary of {splits.tokenizer.size}"
            f"{processes}{sharding})"
        )
    )
    saves: Saves
    if strategy == "fsdp":
        from ml_playground.flows import fsdp  # see _state

        saves = fsdp.ShardedSaver(manager, ranks, async_save=ck.async_save, timeout_s=rt.distributed.timeout_s)
    else:
        saves = SingleFileSaves(ranks.on_main(lambda: open_saver(manager, async_save=ck.async_save)), ranks)
    emit(Started(rt.max_iters, start))
    try:
        with Preemption(save_first=ck.save_on_sigterm) as preemption:
            loop = TrainingLoop(config, splits, state, saves, url, ranks, emit, preemption)
            resumed_last = name is not None and name.startswith("ckpt_last_")
            stop = loop.run(resumed=resumed is not None, resumed_last=resumed_last)
            saves.close()  # an asynchronous save still in flight commits (or raises, on every rank) before we report
    except BaseException as exc:
        try:
            saves.close(failed=True)
        except BaseException as background:  # the training error wins; the background one is attached
            exc.add_note(f"and the background checkpoint save failed too: {background!r}")
        raise
    names = _names(manager) if ranks.is_main else []
    end = stop.stopped_at if stop.stopped_at is not None else rt.max_iters
    return TrainResult(url, start, end, False, stop.metrics, state.best, names, ranks.is_main, stop.stopped_at)


def _state(
    tc: TrainConfig,
    splits: Splits,
    manager: CheckpointManager,
    ranks: Ranks,
    name: str | None,
    resumed: Checkpoint | None,
) -> TrainState:
    """The run's state: fresh or resumed, then spread over the ranks (DDP) or sharded across them (FSDP)."""
    source = f"{manager.store.url}/{name}"
    if tc.runtime.distributed.strategy == "fsdp":
        # imported here: torch.distributed's FSDP and checkpoint modules take half a second, which no other
        # command (and no DDP run) should pay
        from ml_playground.flows import fsdp

        if resumed is None:
            state = TrainState.fresh(tc, splits, ranks.device, ranks.rank)
        else:
            check_resumable(tc, splits, resumed, source)
            state = TrainState.fresh(tc, splits, ranks.device, ranks.rank)
            state.sampler = restored_randomness(tc, splits, resumed, source, ranks.rank)
            state.iter_num = state.start_iter = resumed.iter_num
            state.best = resumed.best_val_loss
        fsdp.shard(state, tc, ranks)
        if resumed is not None and name is not None:
            ranks.everywhere(lambda: fsdp.load_sharded(state, manager, name, resumed))
        return state
    if resumed is None:
        state = TrainState.fresh(tc, splits, ranks.device, ranks.rank)
    else:
        state = TrainState.restore(tc, splits, ranks.device, resumed, source=source, rank=ranks.rank)
    if ranks.distributed:
        state.distribute()
    return state


def _require_training_memory(tc: TrainConfig, splits: Splits) -> None:
    """A model or batch this machine cannot hold is a ConfigError naming the setting, before it is built."""
    m = tc.model
    params, activations = limits.training_bytes(
        model_args_for(tc, splits), tc.data.batch_size, ema=tc.runtime.ema_decay > 0
    )
    if params >= activations:
        what = f"train.model.n_embd = {m.n_embd} (with train.model.n_layer = {m.n_layer}): training that model"
    else:
        what = f"train.data.batch_size = {tc.data.batch_size} (with train.model.block_size = {m.block_size}): a batch"
    limits.require_memory(params + activations, what, ConfigError)


def _names(manager: CheckpointManager) -> list[str]:
    return sorted(info.filename for info in manager.checkpoints())
