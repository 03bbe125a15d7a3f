"""Read-only http(s) URLs of one checkpoint (issue 15, item 4): presigned S3 URLs read with no AWS credentials,
ranged weights-only reads, ETag pinning, servers that ignore Range, and the query string never shown.

Presigned URLs come from boto3 against the moto server, through :class:`tests.http_servers.PresignGateway`,
which checks their signature and expiry as S3 does (moto checks neither).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground.checkpoint import CheckpointManager, KeepPolicy, LocalStore, open_store
from ml_playground.config_loader import is_file_ref, parse_checkpoint_ref, parse_location
from ml_playground.errors import CheckpointNotFoundError, ConfigError, StorageError, StorageUnavailableError
from ml_playground.locations import RemoteLocation
from tests.cli_support import TINY, assert_clean_failure, cli_env, run_main, sets
from tests.conftest import make_checkpoint
from tests.http_servers import ObjectServer, PresignGateway
from tests.servers import TEST_REGION, MotoServer

SECRET = "X-Amz-Signature"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of a finished tiny run (iteration 20), trained once in this process."""
    from ml_playground.cli import main

    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, *sets(max_iters=20, out_dir=str(run), checkpointing__keep__best=0)]) == 0
    return run / "ckpt_last_00000020.pt"


@pytest.fixture
def gateway(moto_server: MotoServer) -> Iterator[PresignGateway]:
    with PresignGateway(moto_server.endpoint) as running:
        yield running


Presign = Callable[..., str]


@pytest.fixture
def presign(gateway: PresignGateway, s3_admin: Any, s3_bucket: str) -> Presign:
    """``presign(data, name, expires=600)``: the object uploaded to moto; its presigned GET URL via the gateway."""
    import boto3
    from botocore.config import Config

    signer = boto3.client(
        "s3",
        endpoint_url=gateway.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=TEST_REGION,
        config=Config(signature_version="s3v4"),
    )

    def make(data: bytes, name: str = "ckpt_last_00000020.pt", expires: int = 600) -> str:
        s3_admin.put_object(Bucket=s3_bucket, Key=f"runs/a/{name}", Body=data)
        url: str = signer.generate_presigned_url(
            "get_object", Params={"Bucket": s3_bucket, "Key": f"runs/a/{name}"}, ExpiresIn=expires
        )
        return url

    return make


def _without_aws() -> dict[str, str]:
    env = {key: value for key, value in cli_env().items() if not key.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"  # never probe the metadata address (still no credentials)
    return env


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ml_playground", *args],
        cwd=cwd,
        env=_without_aws(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _query(url: str) -> str:
    return url.partition("?")[2]


def _assert_secret_kept(url: str, *outputs: str) -> None:
    query = _query(url)
    signature = query.partition(f"{SECRET}=")[2]
    for text in outputs:
        assert query not in text
        assert signature not in text
        assert SECRET not in text


# ---------------------------------------------------------------- presigned URLs (moto)


@pytest.mark.s3
@pytest.mark.slow
def test_a_presigned_url_is_read_by_every_command_with_no_aws_credentials(
    trained: Path,
    presign: Presign,
    gateway: PresignGateway,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = presign(trained.read_bytes())
    shown = url.partition("?")[0]
    # two commands in fresh processes whose environment holds no AWS variable at all
    evaluated = _cli(["eval", "--checkpoint", url, "--raw-weights"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{shown} (iteration 20, raw weights): val loss" in evaluated.stdout
    verified = _cli(["ckpt", "verify", url], tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "1 checkpoint in" in verified.stdout
    # the others in this process, its AWS variables removed too
    for name in [key for key in os.environ if key.startswith("AWS_") and key != "AWS_EC2_METADATA_DISABLED"]:
        monkeypatch.delenv(name)
    sampled = run_main(["sample", "--checkpoint", url, "--set", "sample.sample.max_new_tokens=5"], tmp_path, capsys)
    assert sampled.returncode == 0, sampled.stderr
    assert f"sampling from {shown}" in sampled.stderr
    shown_out = run_main(["ckpt", "show", url], tmp_path, capsys)
    assert shown_out.returncode == 0, shown_out.stderr
    assert "iteration:" in shown_out.stdout
    copied = run_main(["ckpt", "cp", url, str(tmp_path / "copy")], tmp_path, capsys)
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "copy" / trained.name).read_bytes() == trained.read_bytes()
    exported = run_main(["ckpt", "export", url, str(tmp_path / "model.safetensors")], tmp_path, capsys)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "model.safetensors").stat().st_size > 0
    results = (evaluated, verified, sampled, shown_out, copied, exported)
    _assert_secret_kept(url, *(r.stdout + r.stderr for r in results))
    assert {method for method, _ in gateway.requests} == {"GET"}  # never HEAD: a presigned GET URL refuses it


@pytest.mark.s3
def test_an_expired_presigned_url_fails_clearly_without_its_query(
    trained: Path, presign: Presign, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = presign(trained.read_bytes(), expires=1)
    time.sleep(2.1)
    for args in (["ckpt", "show", url], ["eval", "--checkpoint", url]):
        result = run_main(args, tmp_path, capsys)
        assert_clean_failure(result, 1, "access denied", "HTTP 403", "Request has expired", url.partition("?")[0])
        _assert_secret_kept(url, result.stdout + result.stderr)


@pytest.mark.s3
def test_a_presigned_url_with_a_changed_signature_is_refused(
    trained: Path, presign: Presign, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = presign(trained.read_bytes())
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    result = run_main(["ckpt", "verify", tampered], tmp_path, capsys)
    assert result.returncode == 1
    assert "SignatureDoesNotMatch" in result.stdout + result.stderr
    _assert_secret_kept(tampered, result.stdout + result.stderr)


@pytest.mark.s3
@pytest.mark.parametrize("ema", [False, True], ids=["no-ema", "ema"])
def test_a_weights_only_load_fetches_only_the_models_bytes(
    presign: Presign, gateway: PresignGateway, temp_dir: Path, ema: bool
) -> None:
    checkpoint = make_checkpoint(7, width=1024, ema=ema)  # model 4 MiB, AdamW's state 8 MiB more
    local = LocalStore(temp_dir / "writer", create=True)
    name = CheckpointManager(local, KeepPolicy(last=1, best=0)).save_last(checkpoint)
    assert name is not None
    data = (temp_dir / "writer" / name.filename).read_bytes()
    url = presign(data, name.filename)
    location, filename = parse_checkpoint_ref(url, base_dir=temp_dir)
    gateway.sent = 0
    weights = CheckpointManager(open_store(location)).load_weights(filename)
    fetched = gateway.sent
    states = [checkpoint.model, *([checkpoint.ema] if checkpoint.ema is not None else [])]
    wanted = sum(t.untyped_storage().nbytes() for state in states for t in state.values())
    assert wanted <= fetched <= 1.1 * wanted, (fetched, wanted, len(data))
    for key, tensor in checkpoint.model.items():
        assert torch.equal(weights.model[key], tensor)
    assert list(temp_dir.glob("ml_playground-*")) == []


# ---------------------------------------------------------------- what a URL may name


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["eval", "--from", "http://127.0.0.1:9/bkt/run"], "http:// URLs are read-only and name one checkpoint file"),
        (["sample", "--from", "https://example.com/run/ckpt_last_00000001.pt?sig=secret"], "never a run location"),
        (["train", "--set", "train.runtime.out_dir=https://example.com/run"], "train.runtime.out_dir"),
        (["ckpt", "ls", "http://127.0.0.1:9/bkt/run"], "never a run location"),
        (["ckpt", "cp", "run/ckpt_last_00000001.pt", "http://127.0.0.1:9/b/x.pt?sig=secret"], "read-only"),
        (["ckpt", "cp", "run", "http://127.0.0.1:9/b/dir"], "read-only"),
        (["ckpt", "export", "http://127.0.0.1:9/b/x.pt", "https://example.com/m.safetensors"], "read-only"),
        (["ckpt", "show", "http://user:hunter2@127.0.0.1:9/b/x.pt"], "presigned URL"),
        (["ckpt", "show", "http://127.0.0.1:9/b/x.pt#frag"], "fragment"),
        (["ckpt", "show", "http://127.0.0.1:9/b/x.pt", "-o", "region=eu-west-1"], "region"),
    ],
)
def test_http_urls_are_read_only_and_name_one_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    result = run_main(args, tmp_path, capsys)
    assert_clean_failure(result, 2, needle)
    assert "secret" not in result.stderr
    assert "hunter2" not in result.stderr


def test_a_url_is_a_file_reference_by_its_path_not_its_query() -> None:
    assert is_file_ref("https://h/b/ckpt_last_00000001.pt?X-Amz-Signature=abc")
    assert not is_file_ref("https://h/b/run?name=x.pt")
    assert is_file_ref("s3://b/run/ckpt_last_00000001.pt")


def test_the_location_keeps_the_query_secret_and_out_of_every_dump(tmp_path: Path) -> None:
    location, name = parse_checkpoint_ref("https://h.example:8443/b/r/ckpt_last_00000001.pt?sig=abc", base_dir=tmp_path)
    assert isinstance(location, RemoteLocation)
    assert (location.url, name, location.object_name) == ("https://h.example:8443/b/r", name, name)
    assert location.query is not None
    assert location.query.get_secret_value() == "sig=abc"
    for text in (str(location), repr(location), location.model_dump_json(), str(location.model_dump())):
        assert "abc" not in text
    with pytest.raises(ConfigError, match=r"https://h\.example/b/x\.pt\?\.\.\.") as caught:
        parse_location("https://h.example/b/x.pt?sig=abc", base_dir=tmp_path)
    assert "abc" not in str(caught.value)
    with pytest.raises(ConfigError) as typo:
        parse_location("https:/h.example/b/x.pt?sig=abc", base_dir=tmp_path)
    assert "abc" not in str(typo.value)


# ---------------------------------------------------------------- servers of every kind (ObjectServer)


def _store_for(server: ObjectServer, name: str = "ckpt_last_00000020.pt", query: str = "token=s3cr3t") -> Any:
    location, _ = parse_checkpoint_ref(f"{server.endpoint}/files/{name}?{query}", base_dir=Path.cwd())
    return open_store(location)


@pytest.mark.parametrize("kind", ["ranges", "no-ranges", "no-etag", "weak-etag"])
def test_full_weights_and_streamed_reads_from_any_server(trained: Path, kind: str, temp_dir: Path) -> None:
    data = trained.read_bytes()
    with ObjectServer(data, etag={"no-etag": None, "weak-etag": 'W/"v1"'}.get(kind, '"v1"')) as server:
        server.ranges = kind != "no-ranges"
        manager = CheckpointManager(_store_for(server))
        assert [info.filename for info in manager.checkpoints()] == [trained.name]
        whole = manager.load(trained.name)
        weights = manager.load_weights(trained.name)
        with manager.store.open(trained.name) as stream:
            stream.seek(-100, os.SEEK_END)
            tail = stream.read()
            stream.seek(0)
            streamed = stream.read()
        gets = [headers for method, headers in server.requests if method == "GET"]
    assert (tail, streamed) == (data[-100:], data)
    reference = CheckpointManager(LocalStore(trained.parent)).load(trained.name)
    for key, tensor in reference.model.items():
        assert torch.equal(whole.model[key], tensor)
        assert torch.equal(weights.model[key], tensor)
    if kind == "ranges":
        assert all(h.get("If-Match") == '"v1"' for h in gets[1:] if "If-Match" in h)
        assert sum("If-Match" in h for h in gets) >= 3
    if kind == "weak-etag":
        assert not any("If-Match" in h for h in gets)  # a weak ETag is compared, never sent
    assert list(temp_dir.iterdir()) == []


@pytest.mark.parametrize("honour_if_match", [True, False], ids=["if-match", "etag-compared"])
def test_an_object_that_changes_mid_read_fails_and_never_mixes_bytes(
    trained: Path, honour_if_match: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = trained.read_bytes()
    with ObjectServer(data) as server:
        server.honour_if_match = honour_if_match

        def replace_after_the_probe(gets: int) -> None:
            if gets == 2:
                server.replace(data[::-1], '"v2"')

        server.on_get = replace_after_the_probe
        with pytest.raises(StorageError, match="changed while it was being read"):
            CheckpointManager(_store_for(server)).load_weights(trained.name)
        server.replace(data, '"v1"')
        server.requests.clear()
        result = run_main(["ckpt", "show", f"{server.endpoint}/files/{trained.name}?token=s3cr3t"], tmp_path, capsys)
    assert_clean_failure(result, 1, "changed while it was being read")
    assert "s3cr3t" not in result.stderr


def test_server_errors_name_the_url_without_its_query(trained: Path, temp_dir: Path) -> None:
    with ObjectServer(b"") as server:
        server.failure = (404, b"<Error><Code>NoSuchKey</Code><Message>gone token=s3cr3t</Message></Error>")
        with pytest.raises(CheckpointNotFoundError, match=f"no checkpoint .*/files/{trained.name}") as missing:
            CheckpointManager(_store_for(server)).load(trained.name)
        assert CheckpointManager(_store_for(server)).checkpoints() == []  # a 404: nothing there
        server.failure = (500, b"internal error for token=s3cr3t")
        with pytest.raises(StorageError, match="500") as failed:
            CheckpointManager(_store_for(server)).load(trained.name)
        server.failure = (403, b"<Error><Code>AccessDenied</Code><Message>no token=s3cr3t</Message></Error>")
        with pytest.raises(StorageUnavailableError, match=r"HTTP 403: AccessDenied: no \.\.\.\)") as denied:
            CheckpointManager(_store_for(server)).load(trained.name)
    for caught in (missing, failed, denied):
        assert "s3cr3t" not in str(caught.value)
        assert f"/files/{trained.name}" in str(caught.value)
    closed = parse_checkpoint_ref("http://127.0.0.1:9/files/x.pt?token=s3cr3t", base_dir=temp_dir)[0]
    with pytest.raises(StorageUnavailableError, match="unreachable.*check the URL and the network") as unreachable:
        CheckpointManager(open_store(closed)).load("x.pt")
    assert "s3cr3t" not in str(unreachable.value)


def test_an_http_store_is_read_only_and_holds_one_file(trained: Path, tmp_path: Path) -> None:
    with ObjectServer(trained.read_bytes()) as server:
        location, name = parse_checkpoint_ref(f"{server.endpoint}/files/x.pt?token=s3cr3t", base_dir=tmp_path)
        with pytest.raises(StorageUnavailableError, match="read-only"):
            open_store(location, create=True)
        store = open_store(location)
        with pytest.raises(StorageUnavailableError, match="read-only"):
            store.write(name)
        with pytest.raises(StorageUnavailableError, match="read-only"):
            store.delete(name)
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
            CheckpointManager(store).load("ckpt_last_00000001.pt")
        with pytest.raises(CheckpointNotFoundError, match="names only x.pt"):
            store.open("ckpt_last_00000001.pt").__enter__()
        assert [obj.name for obj in store.list()] == ["x.pt"]
