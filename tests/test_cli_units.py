"""Quick in-process checks: --set parsing through the CLI, the bundled data, the tokenizer and the model."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from ml_playground.cli.common import load_config
from ml_playground.errors import CheckpointSchemaError, ConfigError
from ml_playground.locations import LocalLocation
from ml_playground.workload.data import BatchSampler, CharTokenizer, generate_corpus, load_splits
from ml_playground.workload.model import GPT, GPTArgs


def loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *sets: str, experiment: str | None = None) -> object:
    monkeypatch.chdir(tmp_path)
    return load_config(argparse.Namespace(experiment=experiment, config=None, set=list(sets)))


def test_set_values_are_toml_literals_or_plain_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = loaded(tmp_path, monkeypatch, "train.runtime.out_dir=runs/x", "train.runtime.max_iters=7")
    quoted = loaded(tmp_path, monkeypatch, 'train.runtime.out_dir="runs/x"', "train.runtime.max_iters=7")
    assert plain == quoted
    assert plain.train.runtime.out_dir == LocalLocation(path=tmp_path / "runs" / "x")  # type: ignore[attr-defined]
    assert plain.train.runtime.max_iters == 7  # type: ignore[attr-defined]
    assert loaded(tmp_path, monkeypatch, "train.runtime.ema_decay=0.5").train.runtime.ema_decay == 0.5  # type: ignore[attr-defined]
    assert loaded(tmp_path, monkeypatch, "train.model.bias=false").train.model.bias is False  # type: ignore[attr-defined]
    assert loaded(tmp_path, monkeypatch, "sample.sample.start=Ada").sample.sample.start == "Ada"  # type: ignore[attr-defined]


def test_the_last_of_repeated_set_keys_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = loaded(tmp_path, monkeypatch, "train.runtime.max_iters=7", "train.runtime.max_iters=9")
    assert cfg.train.runtime.max_iters == 9  # type: ignore[attr-defined]


def test_default_experiment_writes_to_out_tiny_chars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = loaded(tmp_path, monkeypatch)
    assert cfg.train.runtime.out_dir == LocalLocation(path=tmp_path / "out" / "tiny_chars")  # type: ignore[attr-defined]
    assert cfg.sample.runtime.out_dir == cfg.train.runtime.out_dir  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.runtime.no_such_key=1", "train.runtime.no_such_key: unknown key"),
        ("train.runtime.max_iters=3.5", "train.runtime.max_iters"),
        ("train.runtime.max_iters=ten", "train.runtime.max_iters"),
        ("train.runtime.checkpointing.keep.last=-1", "train.runtime.checkpointing.keep.last"),
        ("train.model=3", "train.model is a table"),
    ],
)
def test_bad_set_values_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, needle: str
) -> None:
    with pytest.raises(ConfigError) as info:
        loaded(tmp_path, monkeypatch, override)
    assert needle in str(info.value)


def test_the_corpus_is_deterministic_and_structured() -> None:
    text = generate_corpus(5000)
    assert text == generate_corpus(5000)
    assert len(text) == 5000
    assert text != generate_corpus(5000, seed=1)
    words = text.split()
    assert len(set(words)) < len(words) / 4  # a small vocabulary of words, repeated: learnable structure
    assert "\n\n" in text


def test_the_tokenizer_round_trips_and_refuses_unknown_characters() -> None:
    tokenizer = CharTokenizer.from_text("hello world")
    assert tokenizer.vocab == " dehlorw"
    assert tokenizer.decode(tokenizer.encode("hello")) == "hello"
    with pytest.raises(ConfigError, match="'z'"):
        tokenizer.encode("zoo")


def test_splits_refuse_a_block_longer_than_the_validation_text() -> None:
    with pytest.raises(ConfigError, match="block_size"):
        load_splits(10_000, 0.001, 64)


def test_the_batch_sampler_resumes_from_its_saved_state() -> None:
    data = torch.arange(1000)
    a = BatchSampler(data, 8, 4, seed=3)
    for _ in range(5):
        a.next()
    b = BatchSampler(data, 8, 4, seed=99)
    b.restore(a.state(), a.batches_drawn)
    for _ in range(3):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb)
        assert torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one
    assert b.batches_drawn == 8


def test_the_model_generates_within_its_vocabulary_and_context() -> None:
    torch.manual_seed(0)
    model = GPT(GPTArgs(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4, dropout=0.0, bias=False))
    generator = torch.Generator().manual_seed(0)
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 10, temperature=0.7, top_k=3, generator=generator)
    assert out.shape == (1, 11)
    assert int(out.max()) < 11
    again = model.generate(
        torch.zeros((1, 1), dtype=torch.long), 10, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, again)
    logits, loss = model(out[:, :4], out[:, 1:5])
    assert logits.shape == (1, 4, 11)
    assert loss is not None
    assert loss.item() > 0


def test_model_args_round_trip_as_plain_data() -> None:
    args = GPTArgs(vocab_size=11, n_layer=1, n_head=2, n_embd=8, block_size=4, dropout=0.0, bias=False)
    assert GPTArgs.from_plain(args.to_plain(), source="x") == args
    with pytest.raises(CheckpointSchemaError, match="model_args.n_layer"):
        GPTArgs.from_plain({**args.to_plain(), "n_layer": "1"}, source="x")


def test_the_renderer_draws_a_bar_on_a_terminal_and_plain_lines_otherwise(capsys: pytest.CaptureFixture[str]) -> None:
    from ml_playground.cli.render import Renderer
    from ml_playground.flows.events import Note, Started, Stepped

    with Renderer(bar=False) as plain:
        plain(Started(10, 0))
        plain(Stepped(1, 1.0))
        plain(Note("iter 1/10"))
    out, err = capsys.readouterr()
    assert out == "iter 1/10\n"
    assert err == ""
    with Renderer(bar=True) as bar:
        bar(Started(10, 4))
        bar(Stepped(5, 0.5))
        bar(Note("eval at iter 5"))
    out, err = capsys.readouterr()
    assert "eval at iter 5" in out
    assert "5/10" in err


def test_the_renderer_announces_large_remote_reads_and_draws_a_byte_bar_for_large_copies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ml_playground.cli.render import Renderer
    from ml_playground.flows.events import Fetching, Transferred

    with Renderer(bar=True) as render:
        render(Fetching("s3://b/run/ckpt_last_00000001.pt", 64 << 20))
        render(Fetching("s3://b/run/small.pt", 1024))
        for done in (8 << 20, 16 << 20):
            render(Transferred("ckpt_last_00000001.pt -> s3://b/copy", done, 16 << 20))
    _, err = capsys.readouterr()
    assert "fetching s3://b/run/ckpt_last_00000001.pt (64.0 MiB) ..." in err
    assert "small.pt" not in err
    assert "B/s" in err  # a byte bar, sized to the copy
    with Renderer(bar=False) as quiet:
        quiet(Fetching("s3://b/run/ckpt_last_00000001.pt", 64 << 20))
    assert capsys.readouterr() == ("", "")


def test_sampling_reports_a_remote_read_and_loads_unchanged(tmp_path: Path) -> None:
    from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore, open_store
    from ml_playground.config_loader import parse_location
    from ml_playground.flows import sampling
    from ml_playground.flows.events import Event, Fetching
    from ml_playground.locations import LocalLocation
    from tests.conftest import make_checkpoint

    location = parse_location("memory://download-events/run", base_dir=Path.cwd())
    writer = CheckpointManager(open_store(location, create=True), KeepPolicy(last=1, best=0))
    original = make_checkpoint(iter_num=4, width=64)
    writer.save_last(original)
    events: list[Event] = []
    weights, source = sampling.load_checkpoint(location, name="ckpt_last_00000004.pt", on_event=events.append)
    size = {obj.name: obj.size for obj in writer.store.list()}["ckpt_last_00000004.pt"]
    assert events == [Fetching(source, size)]
    assert torch.equal(weights.model["0.weight"], original.model["0.weight"])
    local = tmp_path / "run"
    CheckpointManager(LocalStore(local, create=True), KeepPolicy(last=1, best=0)).save_last(original)
    events.clear()
    sampling.load_checkpoint(LocalLocation(path=local), name="ckpt_last_00000004.pt", on_event=events.append)
    assert events == []  # a local file is not fetched


@pytest.mark.parametrize("torchrun_worker", [False, True])
def test_the_command_exits_with_mains_code_inside_and_outside_torchrun(tmp_path: Path, torchrun_worker: bool) -> None:
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TORCHELASTIC_RUN_ID"}
    if torchrun_worker:
        env["TORCHELASTIC_RUN_ID"] = "test"  # leaves through os._exit: the output must still be flushed
    (tmp_path / "run").mkdir()
    for args, code, stream, text in (
        (["ckpt", "ls", "run"], 0, "stdout", "0 checkpoints in"),
        (["ckpt", "ls", "missing"], 1, "stderr", "does not exist"),
        (["train", "--set", "nonsense"], 2, "stderr", "--set"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "ml_playground", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == code, done.stderr
        assert text in getattr(done, stream)
        assert "Traceback" not in done.stderr
