"""Tar listings by headers alone: every way a tar can end early is named, and what precedes it stands."""
import io
import os
import tarfile

import pytest

from pipeline.shards.tarindex import list_members

MEMBER = 512 + 1024  # a header and 700 bytes of data padded to two blocks


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(4):
            info = tarfile.TarInfo(f"m{i}.jpg")
            info.size = 700
            tar.addfile(info, io.BytesIO(os.urandom(700)))
    path = tmp_path_factory.mktemp("tars") / "four.tar"
    path.write_bytes(buf.getvalue())
    return path


def test_an_intact_tar_lists_every_member_in_place(four):
    listing = list_members(four)
    assert listing.problem is None and [m[0] for m in listing.members] == ["m0.jpg", "m1.jpg", "m2.jpg", "m3.jpg"]
    raw = four.read_bytes()
    with tarfile.open(four) as tar:
        for (name, offset, size), info in zip(listing.members, tar.getmembers()):
            assert raw[offset:offset + size] == tar.extractfile(info).read()


@pytest.mark.parametrize("damage", ["cut at a member boundary", "cut inside a header", "a corrupt header checksum"])
def test_a_tar_that_ends_early_is_named(four, tmp_path, damage):
    raw = four.read_bytes()
    at = 3 * MEMBER
    bad = {"cut at a member boundary": raw[:at], "cut inside a header": raw[:at + 100],
           "a corrupt header checksum": raw[:at] + b"x" * 512 + raw[at + 512:]}[damage]
    path = tmp_path / "bad.tar"
    path.write_bytes(bad)
    listing = list_members(path)
    assert [m[0] for m in listing.members] == ["m0.jpg", "m1.jpg", "m2.jpg"]
    assert listing.problem is not None and "cut short or corrupt after 3 members" in listing.problem[1]


def test_a_cut_inside_member_data_names_the_member_and_what_exists(four, tmp_path):
    path = tmp_path / "cut.tar"
    path.write_bytes(four.read_bytes()[:3 * MEMBER + 512 + 300])
    listing = list_members(path)
    assert len(listing.members) == 3 and listing.problem[0] == "m3.jpg"
    assert listing.cut == ("m3.jpg", 3 * MEMBER + 512, 300)
