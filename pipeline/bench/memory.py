"""What a process tree uses, read from Linux /proc (None or nothing elsewhere): CPU seconds and memory.

`tree_cpu_seconds` and `workers_pss_mb` read this process's own tree once (`python -m pipeline.bench`); `Sampler`
follows another process's tree over its whole run (tools/bench_resume.py memory). A `Sampler` sample holds:
  rss       sum of resident memory (statm) over the processes. Pages that several processes map (shared-memory
            slots, the interpreter's libraries, memory a fork shares) count once per process, so this overstates
            what the tree holds;
  pss       sum of Pss (smaps_rollup): each shared page split between the processes that map it, so the sum is what
            the tree holds. The kernel walks every page table for it (~10 ms for a process with torch loaded), so it
            is read every `pss_every`-th sample only. Its library part moves with whatever else on the machine maps
            the same files (another python with torch lowers it), hence also
  pss_anon  Pss_Anon + Pss_Shmem: the tree's own heap and shared-memory pages, without mapped files;
  shm       bytes tmpfs holds for the tree's /dev/shm/vitpipe_* batch slots (allocated blocks: a slot nobody has
            written yet holds none), and `shm_apparent`, their sizes as created. A slot is the tree's when the pid in
            its name is one of the tree's processes (the others, another job's, are noted in `foreign`);
  workers   decode processes alive (descendants other than the forkserver and the resource tracker).
Each figure is also split by role: main (the root), worker (decode processes), helper (forkserver, resource tracker).
A child caught between its fork and its exec still runs the root's command line and maps all of the root's pages: it
is left out of every sum (counted in `forks`), as it would add the root's size once more for an instant.
"""
from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

SHM = Path("/dev/shm")
# A batch slot's name, vitpipe_<creating pid>_<token>_<worker>_<slot>: a copy of pipeline/host.py's SHM_NAME (keep
# the two alike), not imported from there because pipeline.host loads torch.
SHM_NAME = re.compile(r"vitpipe_(\d+)_[0-9a-f]{8}_\d+_\d+$")
ROLES = ("main", "worker", "helper")


def process_tree() -> tuple[dict[int, list[int]], dict[int, int]]:
    """(parent pid -> child pids, pid -> user+system clock ticks) of every process in Linux /proc."""
    children, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        except OSError:
            continue  # exited while we looked
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return children, cpu


def subtree(root: int, children: dict[int, list[int]]) -> dict[int, int]:
    """`root` and every process below it, each mapped to its parent (root's: 0)."""
    found, todo = {}, [(root, 0)]
    while todo:
        pid, parent = todo.pop()
        found[pid] = parent
        todo += [(child, pid) for child in children.get(pid, ())]
    return found


def tree_cpu_seconds() -> float | None:
    """User+system CPU seconds so far of this process and its live descendants (decode workers, DataLoader workers,
    a forkserver's children), from Linux /proc; None elsewhere. Images per CPU-second stays meaningful on a machine
    that other jobs share, where wall-clock img/s does not."""
    if not os.path.isdir("/proc"):
        return None
    children, cpu = process_tree()
    return sum(cpu.get(pid, 0) for pid in subtree(os.getpid(), children)) / os.sysconf("SC_CLK_TCK")


def workers_pss_mb() -> float | None:
    """The proportional set size of this process's descendants, in MB (Linux); None elsewhere."""
    if not os.path.isdir("/proc"):
        return None
    me = os.getpid()
    below = [pss_of(pid) for pid in subtree(me, process_tree()[0]) if pid != me]
    return round(sum(p[0] for p in below if p is not None) / 2**20, 1)  # exited, or not ours to read: none


def rss_of(pid: int) -> int | None:
    """Resident bytes (statm: cheap); None when the process is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def pss_of(pid: int) -> tuple[int, int] | None:
    """(Pss, Pss_Anon + Pss_Shmem) in bytes, from smaps_rollup (the kernel walks every page table); None when it
    cannot be read. Pss_File (libraries, mapped files) is left out of the second: its share moves with whatever else
    on the machine maps the same files."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"Pss", b"Pss_Anon", b"Pss_Shmem"):
                    fields[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if b"Pss" not in fields:
        return None
    return fields[b"Pss"], fields.get(b"Pss_Anon", 0) + fields.get(b"Pss_Shmem", 0)


def cmdline_of(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def role_of(pid: int, parent: int, root: int, root_cmdline: bytes | None) -> str:
    """main (the root), fork (a child between its fork and its exec), helper (forkserver server, resource tracker),
    worker (any other), gone."""
    if pid == root:
        return "main"
    cmdline = cmdline_of(pid)
    if cmdline is None:
        return "gone"
    if cmdline == root_cmdline:
        return "fork"
    if b"multiprocessing.resource_tracker" in cmdline:
        return "helper"
    if b"multiprocessing.forkserver" in cmdline and parent == root:
        return "helper"  # the server itself; the workers it forks carry its command line but not its parent
    return "worker"


def shm_of(seen_pids: set[int]) -> tuple[int, int, int, set[str]]:
    """(allocated bytes, apparent bytes, files) of the tree's /dev/shm/vitpipe_* slots, and the names of other
    vitpipe files. A slot is the tree's when the pid in its name (SHM_NAME) is one of `seen_pids`."""
    alloc = apparent = files = 0
    others = set()
    for entry in os.scandir(SHM):
        if not entry.name.startswith("vitpipe"):
            continue
        m = SHM_NAME.match(entry.name)
        if m is None or int(m.group(1)) not in seen_pids:
            others.add(entry.name)
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        alloc, apparent, files = alloc + st.st_blocks * 512, apparent + st.st_size, files + 1
    return alloc, apparent, files, others


class Sampler(threading.Thread):
    """Samples `root`'s process tree every `interval` s until `done` is set, PSS every `pss_every`-th sample only
    (it costs ~100x the rest). `samples`: dicts of t (s after `start_time`), rss, pss (None without), pss_anon,
    shm, shm_apparent, shm_files, workers, procs, forks, and {role}_rss, {role}_pss, {role}_pss_anon; `cpu_s`: the
    CPU time the sampling took; `foreign`: vitpipe files of other processes seen."""

    def __init__(self, root: int, interval: float, pss_every: int):
        super().__init__(daemon=True)
        self.root, self.interval, self.pss_every, self.samples = root, interval, pss_every, []
        self.done, self.start_time, self.cpu_s = threading.Event(), time.monotonic(), 0.0
        self.roles, self.seen, self.foreign = {}, set(), set()

    def run(self) -> None:
        next_t = time.monotonic()
        while not self.done.is_set():
            cpu0 = time.thread_time()
            self.samples.append(self.sample(with_pss=len(self.samples) % self.pss_every == 0))
            self.cpu_s += time.thread_time() - cpu0
            next_t += self.interval
            self.done.wait(max(0.0, next_t - time.monotonic()))

    def sample(self, with_pss: bool) -> dict:
        t = time.monotonic() - self.start_time
        tree = subtree(self.root, process_tree()[0])
        self.seen.update(tree)
        root_cmdline = cmdline_of(self.root)
        rss = dict.fromkeys(ROLES, 0)
        pss = dict.fromkeys(ROLES, 0) if with_pss else None
        anon = dict.fromkeys(ROLES, 0) if with_pss else None
        procs = workers = forks = 0
        for pid, parent in tree.items():
            r = rss_of(pid)
            if r is None:
                continue
            role = self.roles.get(pid) or role_of(pid, parent, self.root, root_cmdline)
            if role == "fork":  # not counted: its pages are the root's until it execs; asked again next sample
                forks += 1
                continue
            if role == "gone":
                continue
            self.roles[pid] = role
            procs += 1
            workers += role == "worker"
            rss[role] += r
            if pss is not None:
                p = pss_of(pid)
                if p is None:
                    pss = anon = None
                else:
                    pss[role] += p[0]
                    anon[role] += p[1]
        alloc, apparent, files, others = shm_of(self.seen)
        self.foreign.update(others)
        out = {"t": round(t, 3), "rss": sum(rss.values()), "pss": None if pss is None else sum(pss.values()),
               "shm": alloc, "shm_apparent": apparent, "shm_files": files, "workers": workers, "procs": procs,
               "forks": forks}
        out.update({f"{role}_rss": v for role, v in rss.items()})
        out.update({f"{role}_pss": None if pss is None else pss[role] for role in ROLES})
        out["pss_anon"] = None if anon is None else sum(anon.values())
        out.update({f"{role}_pss_anon": None if anon is None else anon[role] for role in ROLES})
        return out
