"""make_shards as the tests run it: in-process, ten samples a shard; the files that must not depend on the source's
form; an interrupt in the middle of a run."""
import make_shards

from pipeline.shards import writer


def run_make_shards(src, dst, *extra, per_shard=10, workers=1) -> int:
    return make_shards.main(["--data_path", str(src), "--out", str(dst), "--samples-per-shard", str(per_shard),
                             "--workers", str(workers), *extra])


def shard_files(dst) -> dict:
    """Shards, their indexes and the class lists, name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(dst.iterdir())
            if p.suffix in (".tar", ".idx") or p.name in ("classes.json", "_info.json")}


def interrupt_at_member(monkeypatch, n: int) -> None:
    """Ctrl-C as the n-th member is written (55: in the middle of the third shard of ten); undo with
    `monkeypatch.undo()`."""
    real_add, calls = writer._add_member, []

    def add_then_interrupt(tar, name, data):
        calls.append(name)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_add(tar, name, data)

    monkeypatch.setattr(writer, "_add_member", add_then_interrupt)
