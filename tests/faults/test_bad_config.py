"""Bad configuration: each case has one exact outcome, a ConfigError naming the key (or URL) and the file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_playground import config_loader
from ml_playground.errors import ConfigError
from ml_playground.locations import LocalLocation

BASE = '[train.runtime]\nout_dir = "run"\n'


@dataclass(frozen=True)
class Case:
    id: str
    text: bytes
    must_say: tuple[str, ...]  # besides the file's path, which every message names


def _case(id: str, text: str | bytes, *must_say: str) -> Case:
    return Case(id, text if isinstance(text, bytes) else text.encode(), must_say)


KEEP = "[train.runtime.checkpointing.keep]\n"
CKPT = "[train.runtime.checkpointing]\n"
CASES = [
    _case(
        "keep-negative",
        BASE + KEEP + "last = -1\n",
        "train.runtime.checkpointing.keep.last",
        "greater than or equal to 0",
        "-1",
    ),
    _case(
        "keep-best-negative",
        BASE + KEEP + "best = -3\n",
        "train.runtime.checkpointing.keep.best",
        "greater than or equal to 0",
    ),
    _case("keep-float", BASE + KEEP + "last = 1.5\n", "keep.last", "valid integer", "1.5"),
    _case("keep-bool", BASE + KEEP + "best = true\n", "keep.best", "valid integer", "True"),
    _case("keep-string", BASE + KEEP + 'last = "2"\n', "keep.last", "valid integer", "'2'"),
    _case("unknown-key", BASE + "max_iter = 5\n", "train.runtime.max_iter", "unknown key"),
    _case("unknown-section", BASE + "[train.optimiser]\nlr = 1.0\n", "train.optimiser", "unknown key"),
    _case("unknown-top-level", BASE + "[evaluate]\nx = 1\n", "evaluate", "unknown key"),
    _case("wrong-type-int", BASE + 'max_iters = "5"\n', "train.runtime.max_iters", "valid integer"),
    _case("wrong-type-bool", BASE + "[train.model]\nbias = 1\n", "train.model.bias", "valid boolean"),
    _case("wrong-type-table", "train = 5\n", "train must be a table"),
    _case("missing-section", "[train.model]\nn_layer = 2\n", "train.runtime.out_dir is required"),
    _case("missing-out-dir", "[train.runtime]\nmax_iters = 5\n", "train.runtime.out_dir is required"),
    _case("out-dir-not-string", "[train.runtime]\nout_dir = 5\n", "train.runtime.out_dir", "string path or URL"),
    _case("invalid-toml", "[train.runtime\nout_dir = 'run'\n", "not valid TOML", "line 1"),
    _case("invalid-toml-value", "[train.runtime]\nout_dir = \n", "not valid TOML", "line 2"),
    _case("duplicate-key", BASE + 'out_dir = "other"\n', "not valid TOML"),
    _case("not-utf8", b'[train.runtime]\nout_dir = "r\xff\xfeun"\n', "not valid UTF-8", "byte 28"),
    _case("latin1", '[train.runtime]\nout_dir = "caf\u00e9"\n'.encode("latin-1"), "not valid UTF-8"),
    _case("scheme-ftp", '[train.runtime]\nout_dir = "ftp://host/run"\n', "unsupported URL scheme 'ftp'", "s3://"),
    _case("scheme-http", '[train.runtime]\nout_dir = "https://host/run"\n', "https:// URLs are read-only", "out_dir"),
    _case("s3-no-bucket", '[train.runtime]\nout_dir = "s3://"\n', "'s3://' has no bucket", "s3://BUCKET/PREFIX"),
    _case("s3-empty-bucket", '[train.runtime]\nout_dir = "s3:///runs/a"\n', "has no bucket"),
    _case("s3-bad-bucket", '[train.runtime]\nout_dir = "s3://My_Bucket/run"\n', "not a valid bucket name"),
    _case("s3-dotdot", '[train.runtime]\nout_dir = "s3://bucket/../run"\n', "'..' path segments"),
    _case("read-policy-misspelt", BASE + CKPT + 'read_policy = "lastest"\n', "read_policy", "'latest' or 'best'"),
    _case("sample-read-policy", BASE + '[sample.runtime]\nread_policy = "bets"\n', "sample.runtime.read_policy"),
    _case("interval-zero", BASE + CKPT + "interval = 0\n", "train.runtime.checkpointing.interval", "greater than 0"),
    _case("interval-negative", BASE + CKPT + "interval = -5\n", "checkpointing.interval", "(got -5)"),
    _case("mode-misspelt", BASE + CKPT + 'mode = "minimum"\n', "checkpointing.mode", "'min' or 'max'"),
    _case("metric-bad-name", BASE + CKPT + 'metric = "val loss"\n', "checkpointing.metric"),
    _case("storage-option-unknown", BASE + "[train.runtime.storage_options]\nendpoint = 'x'\n", "endpoint"),
    _case("storage-option-secret-key", BASE + "[train.runtime.storage_options]\nsecret = 'x'\n", "unknown key"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_config_is_a_clear_config_error(tmp_path: Path, case: Case) -> None:
    path = tmp_path / "experiment.toml"
    path.write_bytes(case.text)
    with pytest.raises(ConfigError) as caught:
        config_loader.load(path, cwd=tmp_path)
    message = str(caught.value)
    assert str(path) in message, message
    for needle in case.must_say:
        assert needle in message, f"{needle!r} not in: {message}"


def test_keep_zero_and_large_values_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "experiment.toml"
    path.write_text(BASE + KEEP + "last = 0\nbest = 1000000\n")
    keep = config_loader.load(path, cwd=tmp_path).train.runtime.checkpointing.keep
    assert (keep.last, keep.best) == (0, 1_000_000)


def test_an_override_is_validated_like_a_file_value(tmp_path: Path) -> None:
    path = tmp_path / "experiment.toml"
    path.write_text(BASE)
    key, value = config_loader.parse_override("train.runtime.checkpointing.keep.last=-2")
    with pytest.raises(ConfigError, match=r"train\.runtime\.checkpointing\.keep\.last: .*\[from --set\]"):
        config_loader.load(path, overrides={key: value}, cwd=tmp_path)


def test_a_missing_config_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does-not-exist.toml"):
        config_loader.load_experiment(exp_config=tmp_path / "does-not-exist.toml")


def test_relative_out_dir_resolves_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "experiment.toml"
    path.write_text(BASE)
    out_dir = config_loader.load(path, cwd=tmp_path).train.runtime.out_dir
    assert out_dir == LocalLocation(path=tmp_path / "conf" / "run")
