"""Which process this is, and joining the others: torchrun's environment, the seed's launch flags, or the seed's
--multiprocessing-distributed spawner.

Precedence: when RANK and WORLD_SIZE are in the environment (torchrun, or our spawner) they win and --rank,
--world-size, --addr and --dist-url are ignored. Otherwise a process is rank --rank of --world-size, and --addr /
--dist-url tcp://HOST:PORT become MASTER_ADDR / MASTER_PORT for the env:// rendezvous.
"""
from __future__ import annotations

import datetime
import gc
import logging
import math
import os
import socket
import sys
import traceback
import warnings
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from trainlib.config import ConfigError, TrainConfig

DEFAULT_PORT = "29500"  # torchrun's default, so mixed launches agree


class DistributedError(RuntimeError):
    """The process group could not be joined; the message says where and why."""


@dataclass(frozen=True)
class Placement:
    rank: int
    world_size: int
    local_rank: int  # device index on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def placement(cfg: TrainConfig, env=os.environ) -> Placement:
    if "RANK" in env and "WORLD_SIZE" in env:
        where = Placement(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        check_launch_flags(cfg, where, int(env.get("LOCAL_WORLD_SIZE", where.world_size)))
        return where
    if not 0 <= cfg.rank < cfg.world_size:
        raise ConfigError(f"--rank {cfg.rank} is outside --world-size {cfg.world_size}")
    return Placement(cfg.rank, cfg.world_size, cfg.gpu or 0)


def check_launch_flags(cfg: TrainConfig, where: Placement, per_node: int) -> None:
    """Under torchrun its environment places the process; a --world-size or --rank given beside it (not the defaults
    1 and 0, which launch scripts pass) that disagrees is a ConfigError rather than silently ignored. With
    --multiprocessing-distributed they count nodes, as in the seed."""
    nodes = cfg.multiprocessing_distributed
    world, rank = (where.world_size // per_node, where.rank // per_node) if nodes else (where.world_size, where.rank)
    unit = "nodes" if nodes else "processes"
    if cfg.world_size != 1 and cfg.world_size != world:
        raise ConfigError(f"--world-size {cfg.world_size}, but torchrun started {world} {unit} (WORLD_SIZE="
                          f"{where.world_size}); under torchrun leave --world-size out, or launch {cfg.world_size}")
    if cfg.rank != 0 and cfg.rank != rank:
        raise ConfigError(f"--rank {cfg.rank}, but torchrun made this process's rank {rank} (RANK={where.rank}); "
                          f"under torchrun leave --rank out")


def rendezvous_env(cfg: TrainConfig, env=os.environ) -> None:
    """Outside torchrun: the seed's --addr and --dist-url as MASTER_ADDR / MASTER_PORT (env:// reads those)."""
    url = urlparse(cfg.dist_url)
    if url.scheme == "tcp":
        env["MASTER_ADDR"], env["MASTER_PORT"] = url.hostname, str(url.port or DEFAULT_PORT)
    elif url.scheme != "env":
        raise ConfigError(f"--dist-url must be env:// or tcp://HOST:PORT, got {cfg.dist_url!r}")
    if cfg.addr:
        env["MASTER_ADDR"] = cfg.addr  # the seed's --addr names the master even when --dist-url says 127.0.0.1
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", DEFAULT_PORT)


def setup(cfg: TrainConfig, device, where: Placement) -> None:
    """Bind this process to its device and, for more than one process, join the group."""
    if device.kind != "cpu":
        device.set_device(where.local_rank)
    if not where.is_main:
        # Quiet non-zero ranks: rank 0 reports; a failure anywhere still raises and takes the job down.
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(logging.ERROR)
    if where.world_size == 1:
        return
    if "RANK" not in os.environ:
        rendezvous_env(cfg)
    timeout = datetime.timedelta(seconds=cfg.dist_timeout)
    where_to = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        # The store (hosted by rank 0, or by torchrun's agent). Its clients retry a refused connection until the
        # timeout themselves, so a rank that starts before the host waits for it.
        store, _, _ = next(dist.rendezvous("env://", where.rank, where.world_size, timeout=timeout))
    except (RuntimeError, ValueError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise DistributedError(f"rank {where.rank} of {where.world_size} could not join the process group at "
                               f"{where_to} within {cfg.dist_timeout:.0f} s (its store: "
                               f"{str(e).splitlines()[0][:200]})") from None
    # torchrun keeps its store across --max-restarts: without a key space of their own, restarted ranks read the
    # dead ones' addresses and gloo connects to ports nobody listens on (refused until it times out).
    store = dist.PrefixStore(f"vit-fast/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    try:
        # The timeout bounds joining the group and every collective after it: a lost peer becomes an error (which
        # torchrun's --max-restarts can act on), not a hang.
        dist.init_process_group(backend=cfg.dist_backend or device.dist_backend, store=store, rank=where.rank,
                                world_size=where.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {where.rank} of {where.world_size} could not join the process group at "
                               f"{where_to} within {cfg.dist_timeout:.0f} s ({str(e).splitlines()[0][:200]})") from None


COLLECTIVES = ("all_reduce", "all_gather_object", "all_gather", "broadcast", "barrier", "reduce_scatter")
# What gloo (transport/tcp/pair.cc) says when a peer's connection ends under a collective: the peer exited, crashed
# or was killed (the kernel closes its sockets at once), or its host went away.
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket closed",
             "Socket unexpectedly closed")


def lost_peer(error: BaseException, cfg: TrainConfig, where: Placement) -> DistributedError | None:
    """A collective that failed for want of a peer, as one line naming the collective, what became of the peer and,
    where it can be known, its rank; None for any other error. Silent: it gave up after --dist-timeout (gloo: "Timed
    out waiting ...ms for recv"), the peer stopped, hung or unreachable. Gone: its connection closed (gloo:
    "Connection reset by peer", "Connection closed by peer"), the peer exited, crashed or was killed. Which of several
    peers, gloo does not say. Under NCCL no such error reaches Python unless the user set TORCH_NCCL_BLOCKING_WAIT=1:
    its watchdog thread takes the process down first (docs/training.md, "Faults")."""
    text, frames = str(error), traceback.extract_tb(error.__traceback__)
    in_torch = any("torch/distributed" in f.filename or "torch/nn/parallel" in f.filename or "autograd" in f.filename
                   for f in frames)  # a collective's own wait, or DDP's all-reduce inside backward
    gone = any(phrase in text for phrase in PEER_GONE)
    if (where.world_size == 1 or type(error) is not RuntimeError and not isinstance(error, dist.DistError)
            or not in_torch or not (gone or "imed out" in text or "imeout" in text)):
        return None  # not ours to rename: a shard read that timed out says so itself
    calls = [f.name for f in frames if f.name in COLLECTIVES]
    what = calls[-1] if calls else "the gradient all-reduce (DDP, in backward)"
    peer = (f"rank {1 - where.rank}" if where.world_size == 2 else
            f"one or more of the other {where.world_size - 1} ranks")
    if gone:
        return DistributedError(f"rank {where.rank}: {what} failed: {peer} went away (its connection closed: it "
                                f"exited, crashed or was killed; its own output or the launcher's says why)")
    return DistributedError(f"rank {where.rank}: {what} timed out after --dist-timeout {cfg.dist_timeout:.0f} s: "
                            f"{peer} did not answer (stopped, hung or lost); raise --dist-timeout if a step or "
                            f"an evaluation can take longer")


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_gather(obj) -> list:
    """Every rank's `obj` (small: RNG states), in rank order; a one-item list in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def node_mates(where: Placement) -> list[int]:
    """The ranks (this one among them) on this machine, by host name: a collective."""
    hosts = all_gather(socket.gethostname())
    return [rank for rank, host in enumerate(hosts) if host == hosts[where.rank]]


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t


# --multiprocessing-distributed, once a process has failed: seconds the others get to end by themselves (a live rank
# meets the lost peer at its next collective, prints its line and exits; a checkpoint write under way finishes), then
# as long again after a SIGTERM before a SIGKILL. torch's own spawn() gives 0, then 30 s, which a stopped process
# (SIGSTOP) always takes in full.
SPAWN_GRACE_S = 5


def spawn(cfg: TrainConfig, device, entry) -> int:
    """The seed's --multiprocessing-distributed: one process per device on this node, --world-size nodes, this node
    being --rank. As in the seed, --batch-size and --workers are per node and are divided among its processes.
    `entry(cfg)` runs in each child and returns its exit status, its error (if any) printed already. Returns the
    status of the first process that failed, 0 when none did; one ended by a signal is a DistributedError."""
    nproc = cfg.nproc_per_node or device.count()
    if cfg.batch_size % nproc:
        raise ConfigError(f"--batch-size {cfg.batch_size} is per node here (--multiprocessing-distributed) and "
                          f"must divide by its {nproc} processes")
    rendezvous_env(cfg)
    processes = torch.multiprocessing.start_processes(_spawned, args=(cfg, nproc, entry), nprocs=nproc, join=False,
                                                      start_method="spawn")
    try:
        while not processes.join(grace_period=SPAWN_GRACE_S):
            pass
    except torch.multiprocessing.ProcessExitedException as e:
        if e.signal_name is None:
            return e.exit_code
        raise DistributedError(f"rank {cfg.rank * nproc + e.error_index} (pid {e.error_pid}) was ended by "
                               f"{e.signal_name}") from None
    return 0


def _spawned(local_rank: int, cfg: TrainConfig, nproc: int, entry) -> None:
    os.environ.update(RANK=str(cfg.rank * nproc + local_rank), WORLD_SIZE=str(cfg.world_size * nproc),
                      LOCAL_RANK=str(local_rank), LOCAL_WORLD_SIZE=str(nproc))
    cfg.batch_size //= nproc
    cfg.val_batch_size //= nproc
    cfg.workers = max(1, math.ceil(cfg.workers / nproc))
    status = entry(cfg)
    gc.freeze()  # a prompt end, as train.py's own: the interpreter's shutdown leaves its objects to the OS
    if status:
        # As the exit status: an exception would reach the parent as a pickled traceback, printed a second time there.
        sys.exit(status)
