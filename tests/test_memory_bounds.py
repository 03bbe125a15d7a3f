"""Memory regression guards: peak RSS of saves and loads of a ~192 MiB checkpoint, measured in a subprocess.

Bounds, not timings (timings are noisy; see benchmarks/ and docs/performance.md). Each phase resets the
subprocess's peak RSS (VmHWM, via /proc/self/clear_refs) first and reports the peak over its start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

MIB = 2**20
TENSOR_MIB = 192

PROBE = textwrap.dedent(
    """
    import gc, json, re, sys
    from pathlib import Path
    import torch
    from ml_playground.checkpoint import AsyncCheckpointSaver, Checkpoint, CheckpointManager, KeepPolicy, LocalStore

    def status():
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(rf"^{k}:\\s+(\\d+) kB", text, re.M).group(1)) / 1024
                for k in ("VmRSS", "VmHWM", "RssAnon")}

    def measure(action):
        gc.collect()
        start = status()
        Path("/proc/self/clear_refs").write_text("5")
        kept = action()
        end = status()
        return kept, {"peak": end["VmHWM"] - start["VmRSS"], "anon": end["RssAnon"] - start["RssAnon"]}

    total, mib = int(sys.argv[2]), 2**20
    model = {f"w{i}": torch.rand(8 * mib // 4) for i in range(total // 8 // 3)}
    state = {i: {"exp_avg": torch.rand_like(w), "exp_avg_sq": torch.rand_like(w), "step": torch.tensor(1.0)}
             for i, w in enumerate(model.values())}
    checkpoint = Checkpoint(model=model, optimizer={"state": state, "param_groups": [{"params": list(state)}]},
                            model_args={}, iter_num=1, best_val_loss=1.0)
    manager = CheckpointManager(LocalStore(Path(sys.argv[1]), create=True), KeepPolicy(last=3, best=0))
    out = {}
    _, out["save"] = measure(lambda: manager.save_last(checkpoint))
    name = manager.latest().filename
    loaded, out["load"] = measure(lambda: manager.load(name))
    del loaded
    mapped, out["mmap_load"] = measure(lambda: manager.load(name, mmap=True, verify=False))
    del mapped
    weights, out["weights"] = measure(lambda: manager.load_weights(name))
    del weights
    _, out["verify"] = measure(lambda: manager.verify(name))
    saver = AsyncCheckpointSaver(manager)
    _, out["async_first"] = measure(lambda: (saver.save_last(Checkpoint(**{**vars(checkpoint), "iter_num": 2})),
                                             saver.wait()))
    _, out["async_second"] = measure(lambda: (saver.save_last(Checkpoint(**{**vars(checkpoint), "iter_num": 3})),
                                              saver.wait()))
    saver.close()
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    run_dir = tmp_path_factory.mktemp("memory") / "run"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(run_dir), str(TENSOR_MIB)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.timeout(150)
def test_local_save_peak_is_within_5_percent_of_the_checkpoint(peaks: dict[str, dict[str, float]]) -> None:
    # Streaming: no BytesIO, no per-tensor copies; only a 1 MiB buffer and the pickled metadata.
    assert peaks["save"]["peak"] <= 0.05 * TENSOR_MIB, peaks["save"]


@pytest.mark.timeout(150)
def test_full_load_peak_is_the_result_itself(peaks: dict[str, dict[str, float]]) -> None:
    # a verified load reads every storage straight into its own memory (format/_reader.py): no buffer beside it
    assert peaks["load"]["peak"] <= 1.05 * TENSOR_MIB, peaks["load"]


@pytest.mark.timeout(150)
def test_weights_only_load_peak_is_the_weights_themselves(peaks: dict[str, dict[str, float]]) -> None:
    # read straight into the tensors' own memory: no mapped pages of the file next to a copy of them
    model_mib = TENSOR_MIB / 3
    assert peaks["weights"]["peak"] <= 1.05 * model_mib, peaks["weights"]


@pytest.mark.timeout(150)
def test_mmap_load_and_verify_make_no_anonymous_copy(peaks: dict[str, dict[str, float]]) -> None:
    # file-backed pages are reclaimable page cache; anonymous memory would be a copy
    assert peaks["mmap_load"]["anon"] <= 0.05 * TENSOR_MIB, peaks["mmap_load"]
    assert peaks["verify"]["anon"] <= 0.05 * TENSOR_MIB, peaks["verify"]


@pytest.mark.timeout(150)
def test_async_saver_holds_one_snapshot_and_reuses_it(peaks: dict[str, dict[str, float]]) -> None:
    assert peaks["async_first"]["peak"] <= 1.08 * TENSOR_MIB, peaks["async_first"]
    assert peaks["async_second"]["peak"] <= 0.05 * TENSOR_MIB, peaks["async_second"]
