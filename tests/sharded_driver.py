"""Run under torchrun by tests/test_sharded.py: a sharded (FSDP2) training state saved, or loaded at any world
size, through the training flow's own functions; rank 0 then writes the full (gathered) state to DUMP.

    sharded_driver.py save RUN_DIR STEPS DUMP [async]   train STEPS steps, save ckpt_last_<STEPS>, dump
    sharded_driver.py load RUN_DIR NAME DUMP            load NAME into a fresh sharded state, dump
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from ml_playground.checkpoint import CheckpointKind, CheckpointManager, LocalStore, sharded
from ml_playground.cli import leave
from ml_playground.config_loader import load_experiment
from ml_playground.flows.distributed import Ranks
from ml_playground.flows.fsdp import ShardedSaver, load_sharded, shard
from ml_playground.flows.train_state import TrainState, plain_config
from ml_playground.workload.data import load_splits

TINY = {
    "train.model.n_layer": 2,
    "train.model.n_head": 2,
    "train.model.n_embd": 16,
    "train.model.block_size": 16,
    "train.model.dropout": 0.1,
    "train.data.batch_size": 4,
    "train.data.corpus_chars": 20000,
    "train.runtime.ema_decay": 0.9,
    "train.runtime.distributed.strategy": "fsdp",
    "train.runtime.distributed.timeout_s": 60,
}


def main(mode: str, run: Path, what: str, dump: Path, *options: str) -> None:
    config = load_experiment("tiny_chars", overrides={**TINY, "train.runtime.out_dir": str(run)})
    tc = config.train
    ranks = Ranks.start(tc.runtime.distributed, "cpu")
    splits = load_splits(tc.data.corpus_chars, tc.data.val_fraction, tc.model.block_size)
    state = TrainState.fresh(tc, splits, ranks.device, ranks.rank)
    shard(state, tc, ranks)
    manager = CheckpointManager(LocalStore(run, create=True))
    if mode == "save":
        for _ in range(int(what)):
            state.step(tc.optim.grad_clip, tc.runtime.ema_decay)
        state.iter_num = int(what)
        saver = ShardedSaver(manager, ranks, async_save="async" in options, timeout_s=60)
        describe = partial(state.to_checkpoint, plain_config(config), splits, ranks.gather(state.randomness()))
        saver.save(CheckpointKind.LAST, describe, state)
        saver.close()
    else:
        load_sharded(state, manager, what, manager.load_manifest(what))
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0 only
    model = get_model_state_dict(state.model, options=full)
    optim = get_optimizer_state_dict(state.model, state.optimizer, options=full)
    ema = {key: value.full_tensor() for key, value in (state.ema or {}).items()}
    if ranks.is_main:
        torch.save({"model": model, "optim": sharded.torch_optimizer_state(optim, str(dump)), "ema": ema}, dump)
    ranks.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), *sys.argv[5:])
    leave(0)  # as the ml-playground command does: a torchrun worker leaves without the interpreter's teardown
