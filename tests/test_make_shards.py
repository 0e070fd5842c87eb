import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import make_shards
import pytest
from PIL import Image

from pipeline.shards import writer
from pipeline.shards.format import LOCK_FILE, Settings
from pipeline.shards.jpeg import decoder_available, has_restart_markers
from pipeline.shards.verify import same_pixels
from tests.shard_runs import interrupt_at_member
from tests.shard_runs import run_make_shards as _run

region_built = pytest.mark.skipif(not decoder_available("region"),
                                  reason="the region decoder is not built (no libjpeg headers at install)")


def _webdataset():
    """webdataset, as the independent reader of the shards a test checks; make_shards itself never imports it, so
    where it is not installed only the tests that read shards back with it skip."""
    return pytest.importorskip("webdataset", reason="webdataset is not installed: it reads the shards back here")


def _outputs(dst):
    """Every file make_shards writes (not the .parts records, nor the lock, whose line names the run that held it:
    pid, host, start time), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(Path(dst).iterdir())
            if p.is_file() and p.name not in (".plan.json", LOCK_FILE)}


def _labels_by_key(folder):
    classes = sorted(p.name for p in (folder / "train").iterdir())
    out = {}
    for split in ("train", "val"):
        for label, c in enumerate(classes):
            for p in (folder / split / c).iterdir():
                key = p.stem if p.stem.startswith(c + "_") else f"{c}_{p.stem}"
                out[(split, key)] = (label, p.read_bytes())
    return out


def _jpeg(mode="RGB", size=(40, 30), fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (200, 30, 60, 0)[:len(mode)]).save(buf, fmt)
    return buf.getvalue()


def test_round_trip_webdataset_and_tarfile(sample_folder, sample_shards):
    wds = _webdataset()
    truth = _labels_by_key(sample_folder)
    for split, n in (("train", 48), ("val", 16)):
        urls = [str(p) for p in sorted(sample_shards.glob(f"{split}-*.tar"))]
        seen = {}
        for sample in wds.WebDataset(urls, shardshuffle=False):
            seen[sample["__key__"]] = (int(sample["cls"]), sample["jpg"])
        assert len(seen) == n
        for key, (label, data) in seen.items():
            want_label, source = truth[(split, key)]
            assert label == want_label
            if decoder_available("region"):  # recoded by default: the same pixels, a restart marker per MCU
                assert has_restart_markers(data) and same_pixels(data, source)
            else:
                assert data == source
        with tarfile.open(urls[0]) as tar:
            names = tar.getnames()
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o444 for m in tar.getmembers())
        assert [n.split(".", 1)[1] for n in names[:4]] == ["jpg", "cls", "jpg", "cls"]
    # a short last shard, and shards mix classes
    lengths = [s["num_samples"] for s in json.loads((sample_shards / "manifest.json").read_text())
               ["splits"]["train"]["shards"]]
    assert lengths == [10, 10, 10, 10, 8]
    with tarfile.open(sample_shards / "train-000000.tar") as tar:
        labels = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
    assert len(labels) > 1


def test_without_restart_markers_the_source_bytes_are_kept(sample_folder, tmp_path):
    wds = _webdataset()
    dst = tmp_path / "plain"
    assert _run(sample_folder, dst, "--no-restart-markers", "--verify") == 0
    truth = _labels_by_key(sample_folder)
    for sample in wds.WebDataset([str(p) for p in sorted(dst.glob("train-*.tar"))], shardshuffle=False):
        assert sample["jpg"] == truth[("train", sample["__key__"])][1]
    assert json.loads((dst / "manifest.json").read_text())["restart_markers"] is False


@region_built
def test_a_set_made_before_restart_markers_resumes_as_it_was(sample_folder, tmp_path, capsys):
    wds = _webdataset()
    dst = tmp_path / "old"
    assert _run(sample_folder, dst, "--no-restart-markers") == 0
    plan = json.loads((dst / ".plan.json").read_text())
    # As the version before the option wrote the set: format vitshards-1, no restart_markers field, and its plan id
    # (sha256 of the settings without that field, then the source fingerprint) in every file that carries one.
    settings = {k: v for k, v in plan.items() if k not in ("plan_id", "fingerprint", "restart_markers")}
    settings["format"] = "vitshards-1"
    old_id = hashlib.sha256((json.dumps(settings, sort_keys=True) + plan["fingerprint"]).encode()).hexdigest()[:16]
    for path in [dst / ".plan.json", dst / "manifest.json", *(dst / ".parts").iterdir()]:
        obj = json.loads(path.read_text())
        obj.pop("restart_markers", None)
        obj.update({"plan_id": old_id}, **({"format": "vitshards-1"} if "format" in obj else {}))
        path.write_text(json.dumps(obj))
    (dst / "val-000001.tar").unlink()
    before = _outputs(dst)
    assert _run(sample_folder, dst) == 0  # no flag: the set's own setting, not the new default
    after = _outputs(dst)
    kept = {k: v for k, v in before.items() if k != "manifest.json"}
    assert "val-000001.tar" in after and {k: v for k, v in after.items() if k in kept} == kept
    rebuilt = wds.WebDataset(str(dst / "val-000001.tar"), shardshuffle=False)
    assert not any(has_restart_markers(s["jpg"]) for s in rebuilt)
    resumed = json.loads((dst / "manifest.json").read_text())
    assert resumed["format"] == "vitshards-1" and resumed["plan_id"] == old_id  # resumed in its own format
    capsys.readouterr()
    assert _run(sample_folder, dst, "--restart-markers") == 2  # other settings: refused without --overwrite
    assert "restart_markers: False -> True" in capsys.readouterr().err  # the old set's missing field: its default


def test_without_the_region_decoder_restart_markers_are_off_by_default_and_refused_when_asked(
        sample_folder, tmp_path, monkeypatch, capsys):
    import pipeline.shards.jpeg
    monkeypatch.setattr(pipeline.shards.jpeg, "_jpegregion", None)
    assert _run(sample_folder, tmp_path / "asked", "--restart-markers") == 2
    assert "--restart-markers needs the region decoder" in capsys.readouterr().err
    assert _run(sample_folder, tmp_path / "default") == 0
    assert json.loads((tmp_path / "default" / "manifest.json").read_text())["restart_markers"] is False
    assert "region decoder (pipeline.shards._jpegregion) is not built, so this set gets no restart markers" in \
        capsys.readouterr().err


def test_index_points_at_member_bytes(sample_shards):
    for idx in sorted(sample_shards.glob("*.idx")):
        blob = idx.with_suffix(".tar").read_bytes()
        lines = idx.read_text().splitlines()
        with tarfile.open(idx.with_suffix(".tar")) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        assert lines[0] == f"v1.2 {len(members) // 2}"
        for line in lines[1:]:
            f = line.split()
            for ext, off, size, name in zip(f[0::4], f[1::4], f[2::4], f[3::4]):
                assert name.endswith("." + ext)
                assert blob[int(off):int(off) + int(size)] == members[name]


def test_side_files(sample_folder, sample_shards):
    classes = json.loads((sample_shards / "classes.json").read_text())
    assert classes == sorted(p.name for p in (sample_folder / "train").iterdir())
    info = json.loads((sample_shards / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == [f"train-00000{i}.tar" for i in range(5)]
    assert info["splits"]["train"]["shard_lengths"] == [10, 10, 10, 10, 8]
    assert info["splits"]["validation"]["num_samples"] == 16
    m = json.loads((sample_shards / "manifest.json").read_text())
    assert {"format", "seed", "samples_per_shard", "max_side", "quality", "source", "num_classes",
            "splits", "converted", "rejected"} <= set(m)
    assert m["format"] == "vitshards-2" and m["num_classes"] == 4 and m["source"] == str(sample_folder)
    shard = m["splits"]["val"]["shards"][1]
    assert set(shard) == {"name", "index", "num_samples", "bytes", "sha256"} and shard["num_samples"] == 6
    assert m["splits"]["train"]["num_files"] == 48 and m["converted"] == m["rejected"] == []


def test_parallel_equals_sequential(sample_folder, sample_shards, tmp_path):
    assert _run(sample_folder, tmp_path / "par", workers=2) == 0
    assert _outputs(tmp_path / "par") == _outputs(sample_shards) | {
        "_info.json": (tmp_path / "par" / "_info.json").read_bytes()}  # _info names the folder


def test_resume_after_deleted_shard_and_stale_temp(sample_folder, sample_shards, tmp_path):
    dst = tmp_path / "shards"  # same folder name as the fixture's, so _info.json matches too
    shutil.copytree(sample_shards, dst)
    (dst / "train-000002.tar").unlink()
    stale = dst / ".train-000003.tar.99999.tmp"
    stale.write_bytes(b"half a shard")
    assert _run(sample_folder, dst) == 0
    assert not stale.exists()
    assert _outputs(dst) == _outputs(sample_shards)


def test_interrupted_run_resumes_to_identical_bytes(sample_folder, sample_shards, tmp_path, monkeypatch):
    interrupt_at_member(monkeypatch, 55)
    dst = tmp_path / "shards"
    assert _run(sample_folder, dst) == 130
    assert not list(dst.glob(".*.tmp")) and not (dst / "manifest.json").exists()
    assert (dst / "train-000001.tar").exists() and not (dst / "train-000002.tar").exists()
    monkeypatch.undo()
    assert _run(sample_folder, dst) == 0
    assert _outputs(dst) == _outputs(sample_shards)


def test_disk_full_is_one_clean_error(sample_folder, tmp_path, monkeypatch, capsys):
    def no_space(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_add_member", no_space)
    dst = tmp_path / "out"
    assert _run(sample_folder, dst) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert not list(dst.glob(".*.tmp")) and not list(dst.glob("*.tar"))


@pytest.fixture
def bad_folder(tmp_path):
    """A tree with every kind of bad input ImageNet is known to contain, and then some."""
    root = tmp_path / "bad"
    good = _jpeg()
    files = {
        "train/n01/good.JPEG": good,
        "train/n01/cmyk.JPEG": _jpeg("CMYK"),
        "train/n01/gray.JPEG": _jpeg("L"),
        "train/n01/png named.JPEG": _jpeg(fmt="PNG"),
        "train/n01/truncated.JPEG": good[: len(good) // 2],
        "train/n01/empty.JPEG": b"",
        "train/n01/notes.txt": b"not an image",
        "train/n01/.DS_Store": b"\0\0\0\1Bud1",
        "train/n01/Thumbs.db": b"\0",
        "train/n01/.ipynb_checkpoints/copy.JPEG": good,
        "train/n02/a b.JPEG": good,
        "train/n02/a_b.JPEG": good,
        "train/n02/ünïcödé.JPEG": good,
        "train/n02/dots.in.stem.JPEG": good,
        "train/stray.csv": b"a,b",
        "val/n02/v1.JPEG": good,
        "val/.DS_Store": b"\0",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_bad_inputs_are_converted_or_rejected(bad_folder, tmp_path, capsys):
    wds = _webdataset()
    dst = tmp_path / "out"
    assert make_shards.main(["--data_path", str(bad_folder), "--out", str(dst), "--workers", "1",
                             "--verify"]) == make_shards.EXIT_REJECTED
    m = json.loads((dst / "manifest.json").read_text())
    assert {c["path"]: c["reason"] for c in m["converted"]} == {
        "train/n01/cmyk.JPEG": "CMYK -> RGB", "train/n01/gray.JPEG": "L -> RGB",
        "train/n01/png named.JPEG": "PNG -> JPEG"}
    rejected = {r["path"]: r["reason"] for r in m["rejected"]}
    assert set(rejected) == {"train/n01/truncated.JPEG", "train/n01/empty.JPEG", "train/n01/notes.txt",
                             "train/stray.csv"}
    assert rejected["train/n01/truncated.JPEG"].startswith("truncated JPEG")
    assert {i["path"] for i in m["ignored"]} == {"train/n01/.DS_Store", "train/n01/Thumbs.db",
                                                 "train/n01/.ipynb_checkpoints/copy.JPEG", "val/.DS_Store"}
    train = m["splits"]["train"]
    assert (train["num_samples"], train["num_rejected"], train["num_ignored"], train["num_files"]) == (8, 4, 3, 15)
    out = capsys.readouterr().out
    assert "train: 15 files = 8 in 1 shards + 4 rejected + 3 ignored" in out and "verify: OK" in out
    samples = list(wds.WebDataset([str(dst / "train-000000.tar")], shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 8 and not any("." in k for k in keys) and "n02_dots_in_stem" in keys
    for s in samples:
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")


def test_link_loops_and_empty_class_folders_are_named_and_nothing_is_read_twice(tmp_path, capsys):
    wds = _webdataset()
    root, good = tmp_path / "links", _jpeg()
    for rel in ("train/n01/a.JPEG", "train/n01/b.JPEG", "train/n02/c.JPEG", "val/n01/v.JPEG"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(good)
    (root / "train" / "n02" / "uploop").symlink_to("..")  # train/ again: n01's images would get n02's label
    (root / "val" / "n02").symlink_to("../train/n02")  # train images in val: read once, under train
    (root / "val" / "n03").mkdir()
    (root / "val" / "n03" / "v3.JPEG").write_bytes(good)
    (root / "train" / "n03").mkdir()
    (root / "train" / "n03" / "more").symlink_to("../../val/n03")  # and val's in train: read under val only
    (root / "train" / "n04").mkdir()
    (root / "train" / "n04" / ".DS_Store").write_bytes(b"\0")  # a class folder with no image
    dst = tmp_path / "out"
    assert _run(root, dst) == make_shards.EXIT_REJECTED
    m = json.loads((dst / "manifest.json").read_text())
    rejected = {r["path"]: r["reason"] for r in m["rejected"]}
    assert rejected == {
        "train/n02/uploop/": "a link to a folder already read (train): not read twice",
        "train/n03/more/": "a link into val/: another split's images are not read here",
        "train/n04/": "no image files: class n04 gets no train samples",
        "val/n02/": "a link into train/: another split's images are not read here"}
    assert m["splits"]["train"]["num_samples"] == 3 and m["splits"]["val"]["num_samples"] == 2
    samples = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset([str(dst / "train-000000.tar")],
                                                                   shardshuffle=False)}
    assert samples == {"n01_a": 0, "n01_b": 0, "n02_c": 1}
    out = capsys.readouterr().out
    assert "  train/n04/: no image files: class n04 gets no train samples" in out


def _without_root_powers(cmd: list) -> list:
    """`cmd` as a process that file permissions bind: as root, with the capabilities that bypass them dropped."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): file permissions cannot bind here")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", *cmd]


def test_an_unreadable_class_folder_is_named(tmp_path):
    root, good = tmp_path / "perm", _jpeg()
    for rel in ("train/n01/a.JPEG", "train/n02/b.JPEG"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(good)
    (root / "train" / "n02").chmod(0)
    dst = tmp_path / "out"
    try:
        proc = subprocess.run(_without_root_powers([sys.executable, make_shards.__file__, "--data_path", str(root),
                                                    "--out", str(dst), "--workers", "1"]),
                              capture_output=True, text=True, timeout=120)
    finally:
        (root / "train" / "n02").chmod(0o755)
    assert proc.returncode == make_shards.EXIT_REJECTED, proc.stderr
    assert "  train/n02/: cannot read this folder (Permission denied)" in proc.stdout
    rejected = {r["path"]: r["reason"] for r in json.loads((dst / "manifest.json").read_text())["rejected"]}
    assert rejected == {"train/n02/": "cannot read this folder (Permission denied)"}


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, 0.6, 1.0])
def test_a_ctrl_c_at_any_moment_is_one_line_and_130(sample_folder, tmp_path, delay):
    """Real SIGINTs from the first of the script's imports to the end of the run; the run ends at 0 only once it is
    done. The clock starts when the script imports `pipeline` (python -X importtime says so), just after its first
    lines: before them it is the interpreter's own start-up, outside the script's reach (docs/data.md)."""
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-X", "importtime", make_shards.__file__, "--data_path",
                             str(sample_folder), "--out", str(dst), "--samples-per-shard", "1", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = False
    for line in proc.stderr:
        if line.startswith("import time:") and line.split("|")[-1].strip() == "pipeline":
            started = True
            break
    assert started and proc.poll() is None
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line  # not the progress bars
             and not line.startswith("import time:")]
    if proc.returncode == 0 and delay:  # the signal came after the work: a whole set
        assert (dst / "manifest.json").exists() and "train: 48 files = 48 in 48 shards" in out
    else:
        assert proc.returncode == make_shards.EXIT_INTERRUPTED, err[-2000:]
        assert lines[-1:] == [make_shards.INTERRUPTED] and "Traceback" not in err


def test_header_check_still_catches_cut_off_jpegs(bad_folder, tmp_path):
    dst = tmp_path / "out"
    assert _run(bad_folder, dst, "--check", "header") == make_shards.EXIT_REJECTED
    m = json.loads((dst / "manifest.json").read_text())
    assert "train/n01/truncated.JPEG" in {r["path"] for r in m["rejected"]}


def test_max_side_resizes(sample_folder, tmp_path):
    wds = _webdataset()
    dst = tmp_path / "out"
    assert _run(sample_folder, dst, "--max-side", "70") == 0
    m = json.loads((dst / "manifest.json").read_text())
    assert m["max_side"] == 70 and m["converted"]
    assert all(c["reason"].startswith("resized") for c in m["converted"])
    for s in wds.WebDataset([str(p) for p in sorted(dst.glob("*.tar"))], shardshuffle=False):
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert max(im.size) <= 70


def test_refuses_other_data_set_or_settings(sample_folder, sample_shards, tmp_path, capsys):
    dst = tmp_path / "shards"
    shutil.copytree(sample_shards, dst)
    before = _outputs(dst)
    assert _run(sample_folder, dst, "--seed", "1") == 2
    assert "seed: 0 -> 1" in capsys.readouterr().err
    assert _outputs(dst) == before
    assert _run(sample_folder, dst, "--seed", "1", "--overwrite") == 0
    assert _outputs(dst)["train-000000.tar"] != before["train-000000.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _run(sample_folder, foreign) == 2


def test_verify_catches_a_tampered_shard(sample_folder, sample_shards, tmp_path, capsys):
    dst = tmp_path / "shards"
    shutil.copytree(sample_shards, dst)
    assert _run(sample_folder, dst, "--verify") == 0
    blob = bytearray((dst / "val-000001.tar").read_bytes())
    blob[2000] ^= 0xFF
    (dst / "val-000001.tar").write_bytes(bytes(blob))
    assert _run(sample_folder, dst, "--verify") == make_shards.EXIT_VERIFY
    assert "val-000001.tar: size or sha256 differs" in capsys.readouterr().out


def test_usage_errors(tmp_path, sample_folder, capsys):
    assert _run(tmp_path / "missing", tmp_path / "o") == 2
    (tmp_path / "empty" / "train").mkdir(parents=True)
    assert _run(tmp_path / "empty", tmp_path / "o") == 2
    odd = tmp_path / "odd"
    shutil.copytree(sample_folder, odd)
    (odd / "val" / "n99999999").mkdir()
    assert _run(odd, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("make_shards: error:") == 3
    for argv in (["--out", str(tmp_path)], ["--data_path", " ", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as e:
            make_shards.main(argv)
        assert e.value.code == 2


def test_settings_flags_are_none_unless_given():
    args = make_shards.parse_args(["--data_path", "src", "--out", "s3://b//p", "--seed", "3", "--no-restart-markers"])
    assert args.data_path == Path("src") and args.out == "s3://b//p"  # the URL's // kept
    given = args.given()
    assert set(given) == {f.name for f in dataclasses.fields(Settings)} - {"format", "source"}  # a flag per setting
    assert given == dict.fromkeys(given) | {"seed": 3, "restart_markers": False}  # the rest: the plan's in DST


def test_make_shards_imports_no_torch():
    proc = subprocess.run([sys.executable, "-X", "importtime", make_shards.__file__, "-h"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "torch" not in proc.stderr


def test_timm_reads_the_shards(sample_shards):
    _webdataset()  # timm's wds reader
    timm_data = pytest.importorskip("timm.data")
    ds = timm_data.create_dataset("wds/sample", root=str(sample_shards), split="validation", is_training=False)
    assert sorted(int(t) for _, t in ds) == sorted([0, 1, 2, 3] * 4)


def test_dali_accepts_the_index(sample_shards):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in sample_shards.glob("val-*.tar"))

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def read():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                         ext=["jpg", "cls"], missing_component_behavior="error")
        return jpg, cls

    pipe = read()
    pipe.build()
    jpg, cls = pipe.run()
    assert sorted(int(bytes(cls.at(i))) for i in range(16)) == sorted([0, 1, 2, 3] * 4)


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_not_stale(sample_folder, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    # A first writer that holds the lock (the library call make_shards makes), then dies by SIGKILL.
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pipeline.shards import writer
        lock = writer.lock_folder(Path({str(dst)!r}), "out")
        print("locked", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert make_shards.main(["--data_path", str(sample_folder), "--out", str(dst), "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"being written by another make_shards (pid {holder.pid} on " in err
        assert not (dst / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert make_shards.main(["--data_path", str(sample_folder), "--out", str(dst), "--workers", "1"]) == 0


def test_an_unreadable_or_older_set_is_refused_for_what_differs_and_replaced_with_overwrite(sample_folder, tmp_path,
                                                                                           capsys):
    dst = tmp_path / "set"
    assert _run(sample_folder, dst) == 0
    for name in (".plan.json", "manifest.json"):  # a set of a format this version does not read
        obj = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps({**obj, "format": "vitshards-9", "plan_id": "9" * 16}))
    capsys.readouterr()
    assert _run(sample_folder, dst) == 2
    assert "shard format 'vitshards-9', which this version does not read" in capsys.readouterr().err
    assert _run(sample_folder, dst, "--overwrite") == 0
    assert json.loads((dst / "manifest.json").read_text())["format"] == "vitshards-2"
    # A vitshards-1 set whose source changed since: the source is named, not the format the rerun would write.
    for name in (".plan.json", "manifest.json"):
        obj = json.loads((dst / name).read_text())
        (dst / name).write_text(json.dumps({**obj, "format": "vitshards-1", "plan_id": "0" * 16}))
    capsys.readouterr()
    assert _run(sample_folder, dst) == 2
    err = capsys.readouterr().err
    assert "the source files changed" in err and "format" not in err.split("(", 1)[1]


def _script(src, dst, *extra) -> list:
    """A real make_shards process, as a user starts it (the same settings where the region decoder is not built)."""
    return [sys.executable, make_shards.__file__, "--data_path", str(src), "--out", str(dst), "--samples-per-shard",
            "20", "--workers", "1", "--no-restart-markers", *extra]


def _env() -> dict:
    """This tree's pipeline package, whatever an installed copy points at."""
    return {**os.environ, "PYTHONPATH": str(Path(make_shards.__file__).resolve().parent.parent)}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


def test_an_out_inside_its_source_or_holding_it_is_refused_before_anything_is_written(sample_folder, tmp_path):
    """An --out inside --data_path was accepted: its rerun was refused for a wrong reason ('the source files
    changed': its own shards read as source), and --overwrite then made a set with a class named after the output
    folder. Real runs; symlinks resolved."""
    src = tmp_path / "src"
    shutil.copytree(sample_folder, src)
    (tmp_path / "link").symlink_to(src)
    before = _tree(src)
    for dst in (src / "shards", src, src / "train" / "shards", tmp_path / "link" / "shards"):
        proc = subprocess.run(_script(src, dst), capture_output=True, text=True, timeout=120, env=_env())
        assert proc.returncode == make_shards.EXIT_USAGE and proc.stderr.count("\n") == 1, (dst, proc.stderr)
        assert proc.stderr.startswith(f"make_shards: error: --out {dst}") and f"is inside --data_path {src}" \
            in proc.stderr, proc.stderr
        assert _tree(src) == before  # nothing written, not even the folder
    # The staging folder of an object-store output likewise, refused before any request is made.
    proc = subprocess.run(_script(src, "s3://bucket/set", "--staging", str(src / "staging")), capture_output=True,
                          text=True, timeout=120, env=_env())
    assert proc.returncode == make_shards.EXIT_USAGE and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--staging {src / 'staging'} is inside --data_path {src}" in proc.stderr and _tree(src) == before
    holder = tmp_path / "holder"  # the other way round: a source inside the output (and through a symlink)
    shutil.copytree(sample_folder, holder / "src")
    (tmp_path / "holder-link").symlink_to(holder)
    for inner in (holder / "src", tmp_path / "holder-link" / "src"):
        proc = subprocess.run(_script(inner, holder), capture_output=True, text=True, timeout=120, env=_env())
        assert proc.returncode == make_shards.EXIT_USAGE and proc.stderr.count("\n") == 1, proc.stderr
        assert f"is inside --out {holder}; pick an --out that does not hold the source" in proc.stderr
    assert sorted(p.name for p in holder.iterdir()) == ["src"]


def test_a_run_refused_by_the_lock_removes_nothing_and_the_running_one_finishes(sample_folder, tmp_path):
    """A second make_shards on the same --out was refused, then deleted the first run's live temporary files on its
    way out, and the first died. Here the first is stopped (SIGSTOP) while it holds temporary files, a real second
    run is refused, and the first, resumed, finishes a set that check_shards passes."""
    src = tmp_path / "src"
    shutil.copytree(sample_folder, src)
    for image in sorted((src / "train").glob("*/*.JPEG")):  # 48 -> 960 images: a run long enough to catch
        for i in range(19):
            shutil.copy(image, image.with_name(f"{image.stem}_{i}.JPEG"))
    dst = tmp_path / "out"

    def temporary_files() -> list:
        return [p for folder in (dst, dst / ".parts") if folder.is_dir() for p in folder.iterdir()
                if writer.atomicio.is_temp_name(p.name)]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_script(src, dst), stdout=log, stderr=log, env=_env())
    try:
        live, deadline = [], time.monotonic() + 120
        while not live:
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended before it was caught"
            if temporary_files():
                first.send_signal(signal.SIGSTOP)  # frozen in the middle of a write: its temporary files are live
                live = temporary_files()
                if not live:
                    first.send_signal(signal.SIGCONT)
            else:
                time.sleep(0.002)
        second = subprocess.run(_script(src, dst), capture_output=True, text=True, timeout=120, env=_env())
        assert second.returncode == make_shards.EXIT_USAGE and second.stderr.count("\n") == 1, second.stderr
        assert f"is being written by another make_shards (pid {first.pid} on " in second.stderr
        assert all(p.exists() for p in live), "the refused run removed the running one's files"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert not temporary_files()
    check = subprocess.run([sys.executable, str(Path(make_shards.__file__).with_name("check_shards.py")),
                            "--data_path", str(dst), "--fresh"], capture_output=True, text=True, timeout=120,
                           env=_env())
    assert check.returncode == 0 and "shard contents: 49 shard(s) read" in check.stdout, check
