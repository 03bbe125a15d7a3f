"""config_loader: merging, strict validation, locations, overrides, and messages naming key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_playground import config_loader
from ml_playground.config_loader import (
    get_cfg_path,
    get_default_config_path,
    list_experiments,
    load,
    load_experiment,
    parse_checkpoint_ref,
    parse_location,
    parse_override,
)
from ml_playground.errors import ConfigError
from ml_playground.locations import LocalLocation, RemoteLocation


def _write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = '[train.runtime]\nout_dir = "runs/a"\n'


def test_bundled_default_experiment_loads_with_outputs_under_cwd(tmp_path: Path) -> None:
    assert "tiny_chars" in list_experiments()
    cfg = load_experiment("tiny_chars", cwd=tmp_path)
    assert cfg.train.runtime.out_dir == LocalLocation(path=tmp_path / "out" / "tiny_chars")
    assert cfg.sample.runtime.out_dir == cfg.train.runtime.out_dir
    assert cfg.train.runtime.checkpointing.keep.last == 2


def test_relative_out_dir_resolves_against_the_config_files_directory(tmp_path: Path) -> None:
    cfg = load(_write(tmp_path, MINIMAL), cwd=Path("/"))
    assert cfg.train.runtime.out_dir == LocalLocation(path=tmp_path / "runs" / "a")


def test_defaults_apply_and_experiment_wins(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "max_iters = 7\n[train.runtime.checkpointing.keep]\nbest = 3\n")
    cfg = load(path)
    assert cfg.train.runtime.max_iters == 7
    assert cfg.train.runtime.checkpointing.keep.best == 3
    assert cfg.train.runtime.checkpointing.keep.last == 1
    assert cfg.train.runtime.checkpointing.read_policy == "latest"
    assert cfg.sample.runtime.read_policy == "best"


def test_overrides_win_and_resolve_paths_against_cwd(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cfg = load(
        _write(tmp_path, MINIMAL),
        overrides={"train.runtime.max_iters": 50, "train.runtime.out_dir": "elsewhere"},
        cwd=cwd,
    )
    assert cfg.train.runtime.max_iters == 50
    assert cfg.train.runtime.out_dir == LocalLocation(path=cwd / "elsewhere")


def test_s3_out_dir_becomes_a_remote_location_with_typed_options(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[train.runtime]\nout_dir = "s3://my-bucket/runs/a/"\n'
        '[train.runtime.storage_options]\nregion = "eu-west-1"\nendpoint_url = "http://127.0.0.1:9"\n',
    )
    location = load(path).train.runtime.out_dir
    assert isinstance(location, RemoteLocation)
    assert (location.url, location.bucket) == ("s3://my-bucket/runs/a", "my-bucket")
    assert location.storage_options.region == "eu-west-1"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[train.runtime.checkpointing.keep]\nlast = -1\n", "train.runtime.checkpointing.keep.last"),
        ("[train.runtime.checkpointing.keep]\nbest = true\n", "train.runtime.checkpointing.keep.best"),
        ("[train.runtime.checkpointing.keep]\nlast = 1.5\n", "train.runtime.checkpointing.keep.last"),
        ('[train.runtime.checkpointing]\nread_policy = "newest"\n', "train.runtime.checkpointing.read_policy"),
        ("[train.runtime.checkpointing]\ninterval = 0\n", "train.runtime.checkpointing.interval"),
        ("max_itres = 3\n", "train.runtime.max_itres"),
        ('[train.optim]\nlearning_rate = "fast"\n', "train.optim.learning_rate"),
        ("[train.model]\nn_embd = 30\nn_head = 4\n", "train.model"),
    ],
)
def test_invalid_values_name_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, MINIMAL + text)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_key_message_says_unknown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.runtime\.max_itres: unknown key"):
        load(_write(tmp_path, MINIMAL + "max_itres = 3\n"))


def test_override_errors_name_the_command_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"keep\.last.*--set"):
        load(_write(tmp_path, MINIMAL), overrides={"train.runtime.checkpointing.keep.last": -2})


def test_missing_out_dir_in_a_user_config_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.runtime\.out_dir is required"):
        load(_write(tmp_path, "[train.runtime]\nmax_iters = 3\n"))


def test_invalid_toml_and_non_utf8_name_the_file(tmp_path: Path) -> None:
    bad = _write(tmp_path, "[train.runtime\n", "bad.toml")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="latin.toml is not valid UTF-8"):
        load(latin)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.runtime.max_iters=50", ("train.runtime.max_iters", 50)),
        ("train.runtime.out_dir=s3://b/run", ("train.runtime.out_dir", "s3://b/run")),
        ('train.runtime.out_dir="s3://b/run"', ("train.runtime.out_dir", "s3://b/run")),
        ("train.runtime.checkpointing.async_save=true", ("train.runtime.checkpointing.async_save", True)),
        ("sample.sample.temperature=0.5", ("sample.sample.temperature", 0.5)),
        ("sample.sample.start=hello world", ("sample.sample.start", "hello world")),
        ("a.b=", ("a.b", "")),
    ],
)
def test_parse_override_takes_toml_literals_else_strings(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["noequals", "=5", "a..b=1", "a b=1"])
def test_parse_override_rejects_malformed(text: str) -> None:
    with pytest.raises(ConfigError, match="--set"):
        parse_override(text)


def test_override_into_a_value_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a value, not a table"):
        load(_write(tmp_path, MINIMAL), overrides={"train.runtime.max_iters.x": 1})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://host/x", "unsupported URL scheme 'ftp'"),
        ("s3://", "has no bucket"),
        ("s3:///prefix", "has no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://bucket/../x", "'..'"),
        ("", "non-empty"),
    ],
)
def test_bad_locations_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_location(text, base_dir=tmp_path)


def test_locations_parse(tmp_path: Path) -> None:
    assert parse_location("runs", base_dir=tmp_path) == LocalLocation(path=tmp_path / "runs")
    assert parse_location("file:///data/x", base_dir=tmp_path) == LocalLocation(path=Path("/data/x"))
    assert parse_location("~/x", base_dir=tmp_path) == LocalLocation(path=Path.home() / "x")
    memory = parse_location("memory://tests/run", base_dir=tmp_path)
    assert isinstance(memory, RemoteLocation)
    assert memory.url == "memory://tests/run"


def test_checkpoint_refs_split_into_location_and_name(tmp_path: Path) -> None:
    location, name = parse_checkpoint_ref("s3://bkt/run/ckpt_last_00000010.pt", base_dir=tmp_path)
    assert (str(location), name) == ("s3://bkt/run", "ckpt_last_00000010.pt")
    location, name = parse_checkpoint_ref("ckpt_last_00000010.pt", base_dir=tmp_path)
    assert (location, name) == (LocalLocation(path=tmp_path), "ckpt_last_00000010.pt")


def test_suppliers(tmp_path: Path) -> None:
    bundled = get_cfg_path("tiny_chars", None)
    assert bundled.is_file()
    assert get_default_config_path(bundled).name == "default_config.toml"
    user = _write(tmp_path, MINIMAL)
    assert get_cfg_path(None, user) == user
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        get_cfg_path("nope", None)
    with pytest.raises(ConfigError, match="does not exist"):
        get_cfg_path(None, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not both"):
        get_cfg_path("tiny_chars", user)


def test_secrets_are_masked_in_redacted_options(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        '[train.runtime]\nout_dir = "s3://bkt/run"\n[train.runtime.storage_options]\n'
        'server_side_encryption = "aws:kms"\nsse_kms_key_id = "arn:aws:kms:secret-key"\n',
    )
    cfg = load(path)
    dumped = str(cfg.model_dump(mode="json"))
    assert "secret-key" not in dumped
    assert "secret-key" not in str(cfg.train.runtime.storage_options.redacted())


def test_only_config_loader_reads_config_files() -> None:
    """The boundary rule, checked on the source: no other module parses TOML or resolves user paths."""
    loader = Path(config_loader.__file__).parent
    package = loader.parent
    offenders = [
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if loader not in path.parents
        and any(token in path.read_text() for token in ("tomllib", "expanduser", ".resolve()"))
    ]
    assert offenders == []


def test_an_inline_table_set_merges_its_keys_and_records_them_as_overrides(tmp_path: Path) -> None:
    # it replaced the file's table wholesale (dropping its other keys) and blamed the file for its values
    config = load_experiment("tiny_chars", overrides={"train.runtime.checkpointing": {"interval": 5}}, cwd=tmp_path)
    bundled = load_experiment("tiny_chars", cwd=tmp_path)
    assert config.train.runtime.checkpointing.interval == 5
    assert config.train.runtime.checkpointing.keep == bundled.train.runtime.checkpointing.keep


def test_a_file_url_is_a_local_path_from_the_root(tmp_path: Path) -> None:
    location, name = parse_checkpoint_ref("file:///ckpt_last_00000005.pt", base_dir=tmp_path)
    assert (location, name) == (LocalLocation(path=Path("/")), "ckpt_last_00000005.pt")
    assert parse_location("file://localhost/a%20b", base_dir=tmp_path) == LocalLocation(path=Path("/a b"))


def test_a_file_url_decodes_its_file_name_and_needs_a_path(tmp_path: Path) -> None:
    location, name = parse_checkpoint_ref("file:///tmp/dir/model%20v1.pt", base_dir=tmp_path)
    assert (location, name) == (LocalLocation(path=Path("/tmp/dir")), "model v1.pt")
    with pytest.raises(ConfigError, match="'file://' has no path"):
        parse_location("file://", base_dir=tmp_path)  # it meant the directory the config was read from
