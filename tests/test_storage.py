"""pipeline/shards/storage.py against a real S3 server (SeaweedFS on loopback): shards written to s3:// by
tools/make_shards.py, read back by both backends with the same epoch contract as from disk, train.py from s3://, and
the failures: a server that goes away mid-epoch, wrong credentials, a missing object."""
from __future__ import annotations

import json
import os
import tempfile
import time

import make_shards
import pytest
import torch

import train
from pipeline import ShardError, build_loader
from pipeline.shards import contents, repack, storage
from pipeline.shards.format import read_manifest, shard_list
from tests.s3server import S3Server

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed: s3:// paths need it (the s3 extra)")

BUCKET = "shards"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s3 = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    yield s3
    s3.stop()


@pytest.fixture
def s3_env(server, monkeypatch):
    for key, value in server.environment().items():
        monkeypatch.setenv(key, value)
    return server


@pytest.fixture(scope="module")
def s3_shards(server, sample_folder, tmp_path_factory) -> str:
    """The shared sample set, sharded straight into s3://shards/sample (10 samples per shard, as sample_shards)."""
    env = server.environment()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/sample"
        assert make_shards.main(["--data_path", str(sample_folder), "--out", url, "--samples-per-shard", "10",
                                 "--workers", "2", "--staging", str(tmp_path_factory.mktemp("staging"))]) == 0
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return url


def labels(path, split, backend, rank=0, world_size=1, epoch=0, batch_size=4):
    with build_loader(data_path=path, split=split, backend=backend, batch_size=batch_size, device="cpu",
                      rank=rank, world_size=world_size, workers=2, img_size=16, dtype=torch.uint8) as loader:
        loader.set_epoch(epoch)
        return [y.tolist() for _, y in loader]


def test_make_shards_to_s3_writes_the_same_set_and_resumes(s3_env, s3_shards, sample_shards, capsys):
    remote, local = read_manifest(s3_shards), read_manifest(sample_shards)
    assert remote.splits == local.splits and remote.num_classes == local.num_classes  # byte-identical shards
    objects = storage.sizes(s3_shards)
    assert {"manifest.json", "classes.json", "_info.json", ".plan.json"} <= set(objects)
    assert all(objects[s.name] == s.bytes for split in remote.splits.values() for s in split.shards)
    capsys.readouterr()
    assert make_shards.main(["--data_path", str(local.settings.source), "--out", s3_shards,
                             "--samples-per-shard", "10", "--workers", "1"]) == 0  # a rerun: nothing to build
    assert "resuming: 7 shards already built, 0 to build" in capsys.readouterr().out


def test_a_failed_start_to_s3_leaves_no_staging_folder(s3_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where make_shards makes its staging folder
    (tmp_path / "tmp").mkdir()
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "a.JPEG").write_bytes(b"x")  # no class folders: a usage error at the scan
    boto3.client("s3").create_bucket(Bucket="failed-start")
    assert make_shards.main(["--data_path", str(tmp_path / "flat"), "--out", "s3://failed-start/never"]) == \
        make_shards.EXIT_USAGE
    assert "has no class folders" in capsys.readouterr().err
    assert not list((tmp_path / "tmp").iterdir())


def test_parquet_to_s3_uploads_each_window_of_shards(s3_env, sample_folder, tmp_path):
    # A parquet source builds a window of shards per job: all of them reach the bucket, equal to a local run.
    pytest.importorskip("pyarrow", reason="pyarrow is not installed: it writes and reads the parquet source")
    hub = repack.write_parquet(sample_folder, tmp_path / "hub")
    boto3.client("s3").create_bucket(Bucket="from-parquet")  # its own bucket: the test runs alone too
    staging, local, url = tmp_path / "staging", tmp_path / "local", "s3://from-parquet/set"
    args = ["--data_path", str(hub), "--samples-per-shard", "2", "--workers", "2"]
    assert make_shards.main([*args, "--out", str(local)]) == 0
    assert make_shards.main([*args, "--out", url, "--staging", str(staging)]) == 0
    assert read_manifest(url).splits == read_manifest(local).splits  # 24 + 8 shards, the same bytes
    assert not [p for p in staging.iterdir() if p.suffix in (".tar", ".idx")]  # uploaded, then removed


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_s3_batches_equal_local_batches_for_two_ranks(s3_env, s3_shards, sample_shards, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    for rank in range(2):
        for split in ("train", "val"):
            remote = labels(s3_shards, split, backend, rank, 2, epoch=1)
            assert remote == labels(sample_shards, split, "host", rank, 2, epoch=1)  # same samples, same batches
    seen = [x for rank in range(2) for b in labels(s3_shards, "val", backend, rank, 2) for x in b if x >= 0]
    assert len(seen) == 16  # val exact over both ranks


def test_train_py_runs_an_epoch_from_s3(s3_env, s3_shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--model", "test_vit", "--img-size", "32", "--device", "cpu", "--workers", "1",
                       "--data_path", s3_shards, "--batch-size", "8", "--epochs", "1", "--output", str(out),
                       "--no-plots"]) == 0
    assert " * Acc@1 " in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["global_step"] == 6


def test_an_object_rewritten_at_the_same_size_is_checked_again_by_its_etag(s3_env, s3_shards, tmp_path):
    """pipeline/shards/contents.py over S3: a verified object's marker holds its ETag, which a rewrite changes."""
    client, copy = boto3.client("s3"), f"s3://{BUCKET}/etag-copy"
    for obj in client.list_objects_v2(Bucket=BUCKET, Prefix="sample/")["Contents"]:
        if "/" not in obj["Key"][len("sample/"):]:
            client.copy_object(Bucket=BUCKET, Key="etag-copy/" + obj["Key"][len("sample/"):],
                               CopySource={"Bucket": BUCKET, "Key": obj["Key"]})
    manifest, cache = read_manifest(copy), tmp_path / "cache"
    first = contents.check(copy, manifest, ["train"], cache=cache)
    assert first.problems == {} and first.shards_read == 5
    assert contents.check(copy, manifest, ["train"], cache=cache).shards_read == 0
    blob = bytearray(client.get_object(Bucket=BUCKET, Key="etag-copy/train-000002.tar")["Body"].read())
    blob[3000] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key="etag-copy/train-000002.tar", Body=bytes(blob))
    again = contents.check(copy, manifest, ["train"], cache=cache)
    assert again.shards_read == 1 and list(again.problems) == ["train-000002.tar"]


def test_wrong_credentials_are_one_line(server, s3_shards, monkeypatch, tmp_path, capsys):
    for key, value in server.environment(secret="not-the-secret").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ShardError, match=r"s3://shards/sample/manifest.json: wrong secret key") as e:
        read_manifest(s3_shards)
    assert "\n" not in str(e.value)
    assert train.main(["--data_path", s3_shards, "--device", "cpu", "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong secret key (AWS_SECRET_ACCESS_KEY)" in err
    assert not (tmp_path / "o").exists()


def test_a_missing_object_is_named(s3_env, s3_shards, tmp_path):
    boto3.client("s3").copy_object(Bucket=BUCKET, Key="gappy/manifest.json",
                                   CopySource={"Bucket": BUCKET, "Key": "sample/manifest.json"})
    with pytest.raises(ShardError, match=r"s3://shards/gappy/train-000000.tar: listed in the manifest but missing"):
        shard_list("s3://shards/gappy", "train")
    with pytest.raises(ShardError, match="no shard manifest here"):
        read_manifest("s3://shards/nothing-here")


@pytest.mark.parametrize("backend", ["host", "dali"])
def test_a_server_that_goes_away_mid_epoch_is_a_clear_error(sample_folder, tmp_path, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    s3 = S3Server(tmp_path / "weed")
    try:
        for key, value in s3.environment().items():
            monkeypatch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/set"
        assert make_shards.main(["--data_path", str(sample_folder), "--out", url, "--samples-per-shard", "10",
                                 "--workers", "1"]) == 0
        loader = build_loader(data_path=url, split="train", backend=backend, batch_size=2, device="cpu", workers=1,
                              img_size=16, dtype=torch.uint8)
        batches = iter(loader)
        next(batches)
        s3.stop()
        t0 = time.monotonic()
        with pytest.raises(ShardError, match=r"s3://shards/set/train-\d+\.(tar|idx)") as e:
            for _ in batches:
                pass
        assert time.monotonic() - t0 < 60 and "\n" not in str(e.value)
        loader.close()
    finally:
        s3.stop()
