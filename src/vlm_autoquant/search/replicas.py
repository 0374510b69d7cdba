"""Data-parallel replicas: one process per GPU, each holding the whole LM, each searching part of
the batches, with ModelOpt reducing what the search measured.

When the LM fits on one GPU, splitting its layers across several (accelerate's device_map) leaves
all but one GPU waiting at any moment: the layers run one after another. Replicas keep every GPU
busy instead. ModelOpt's AutoQuantize is data-parallel under torch.distributed already: every
QuantModule gets a `parallel_state` whose data-parallel group defaults to the whole world, max
calibration all-reduces each input amax (max), and `QuantRecipeHparam.get_score` sums each
score over the group. So rank r searches `batches[r::world]` and every rank ends with the same
amax (bit for bit: max is order-free) and the same scores (summed in another order) as one
process over all batches (tests/search/test_replicas.py).

This process is rank 0: it loads its replica like any single-GPU run, and alone writes search checkpoints,
evaluates, saves and tracks. The other ranks are spawned processes (`_worker`) that load their
replica on their GPU, join the process group and run each search rank 0 hands them, in order,
through a queue (a sweep searches several families; a narrower family may start from a wider
one's calibration, which rank 0 writes before handing the search out). The group is torn down
after the last search, so everything after it runs exactly as in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

from ..core import lean_imports
from ..core.errors import RunFailed
from .spec import SearchCheckpoint

log = logging.getLogger(__name__)
# Rendezvous and collectives: a replica loading a 72B checkpoint from a cold disk may take minutes.
GROUP_TIMEOUT = timedelta(minutes=30)
# After a replica dies, how long this process may take to see it before it is stopped outright.
_GRACE_S = 20.0


@dataclass(frozen=True)
class Setup:
    """What every replica needs to load the same LM and search the same way."""

    model_dir: Path
    text_config: object  # transformers Qwen2Config (pickled to the workers)
    devices: tuple[str, ...]  # one per rank, rank 0 first: "cuda:0", "cuda:1" (or "cpu": tests)

    @property
    def world(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


def shard(n: int, rank: int, world: int) -> int:
    """How many of the first `n` batches rank `rank` gets under `batches[rank::world]`."""
    return len(range(rank, n, world))


def spec_for_rank(spec, rank: int, world: int):
    """The family's SearchSpec with this rank's share of the calibration and score steps."""
    return dataclasses.replace(
        spec,
        num_calib_steps=shard(spec.num_calib_steps, rank, world),
        num_score_steps=shard(spec.num_score_steps, rank, world),
    )


def device_name(gpu: int | str) -> str:
    """A replica's torch device: "cuda:<index>" for a GPU index (a name such as "cpu" as is)."""
    return gpu if isinstance(gpu, str) else f"cuda:{gpu}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(setup: Setup, rank: int, port: int) -> None:
    import torch  # torch: this module is imported on the refusal path
    import torch.distributed as dist  # torch: as above

    kwargs = {}
    if setup.backend == "nccl":
        device = torch.device(setup.devices[rank])
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        setup.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=setup.world,
        timeout=GROUP_TIMEOUT,
        **kwargs,
    )


def _peak_gib(device: str) -> float:
    import torch  # torch: this module is imported on the refusal path

    if not device.startswith("cuda"):
        return 0.0
    return torch.cuda.max_memory_allocated(torch.device(device)) / 1024**3


def _worker(rank: int, port: int, jobs, results) -> None:
    """A replica: import, wait for its Setup (None: not needed after all), load the LM on its
    device, join the group, run every search handed to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C and stops the replicas
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s replica {rank}: %(message)s", datefmt="%H:%M:%S"
    )
    lean_imports.install()  # before ModelOpt's import, as in rank 0
    try:
        import torch  # torch: this module is imported on the refusal path
        import torch.distributed as dist  # torch: as above

        from ..model.lm import load_lm  # in the spawned worker: replicas.py stays cheap to import
        from ..model.weights import sharing_weights  # in the spawned worker, as load_lm
        from . import autoquant, fp8_kernel  # the slow imports, before the Setup is known

        setup = jobs.get()
        if setup is None:
            return
        device = torch.device(setup.devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        t0 = time.perf_counter()
        model = load_lm(setup.model_dir, setup.text_config, device)
        results.put(("loaded", rank, time.perf_counter() - t0))
        _init_group(setup, rank, port)
        kernel = None
        while (job := jobs.get()) is not None:
            run_kernel, spec, batches, checkpoint, grad_checkpointing = job
            if run_kernel != kernel and device.type == "cuda":  # rank 0's choice, not a new one
                fp8_kernel.select_fp8_kernel("cuda-ext" if run_kernel == "cuda-ext" else "eager")
            kernel = run_kernel
            replica = sharing_weights(model)
            batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
            autoquant.search(
                replica,
                spec,
                batches,
                SearchCheckpoint(checkpoint, _no_checkpoint),
                None,
                grad_checkpointing,
            )
            del replica, batches
            if device.type == "cuda":
                torch.cuda.empty_cache()
            results.put(("done", rank, _peak_gib(setup.devices[rank])))
        dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, which names it
        results.put(("error", rank, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


class Pool:
    """The other ranks' processes, started before their Setup is known: they import torch,
    transformers and ModelOpt (the slow part of a start) while this process validates."""

    def __init__(self, devices: tuple[str, ...]) -> None:
        import multiprocessing as mp  # torch's tensor reductions apply once torch is imported

        self.devices = devices
        self.port = _free_port()
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in devices[1:]]
        self.procs = [
            ctx.Process(
                target=_worker,
                name=f"replica-{r}",
                args=(r, self.port, self.jobs[r - 1], self.results),
                daemon=True,
            )
            for r in range(1, len(devices))
        ]
        for p in self.procs:
            p.start()

    def dismiss(self) -> None:
        """Not needed after all (the plan split the layers, or the inputs were refused)."""
        for p in self.procs:  # still importing, most likely: nothing of theirs to keep
            p.terminate()
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()


def prestart_devices(gpus: str | None, parallel: str) -> tuple[str, ...] | None:
    """The devices replicas would use, from the flags alone (explicit indices only: "all" needs
    the device count, which waits for torch), or None when they cannot be wanted."""
    if parallel == "layers" or not gpus:
        return None
    try:
        ids = [int(x) for x in gpus.split(",") if x.strip()]
    except ValueError:
        return None
    if len(ids) < 2 or len(set(ids)) != len(ids) or min(ids) < 0:
        return None
    return tuple(device_name(i) for i in ids)


@contextlib.contextmanager
def prestart(gpus: str | None, parallel: str) -> Iterator[Pool | None]:
    """Start the other ranks' processes before validation when `--gpus` asks for several GPUs;
    whatever `start_for` does not claim is dismissed on exit."""
    devices = prestart_devices(gpus, parallel)
    pool = Pool(devices) if devices else None
    try:
        yield pool
    finally:
        if pool is not None and not getattr(pool, "claimed", False):
            pool.dismiss()


@contextlib.contextmanager
def start_for(inputs, placement, pool: Pool | None = None) -> Iterator[Replicas | None]:
    """The replicas `placement` asks for (None: this process searches alone), in `pool`'s
    processes when they match, else started now.

    Started as soon as the inputs are validated, before this process imports ModelOpt and loads
    its own replica, so the others load meanwhile. Stopped on exit (the pipeline closes them
    earlier, after the last search).
    """
    if placement is None or not placement.replicas:
        yield None
        return
    devices = tuple(device_name(g) for g in placement.replicas)
    if pool is not None and pool.devices == devices:
        pool.claimed = True
    else:
        pool = None
    with Replicas(Setup(inputs.options.model_dir, inputs.text_config, devices), pool) as replicas:
        yield replicas


def _no_checkpoint(*_args) -> str:
    raise AssertionError("only rank 0 writes search checkpoints")


class Replicas:
    """Rank 0's side: spawn the other replicas, hand them each search, collect what they report.

    Use as a context manager around the searches: on exit the group is torn down and the
    replicas stopped (terminated, if a search failed). A replica that dies makes the search fail
    with its reason instead of leaving this process waiting in a collective.
    """

    def __init__(self, setup: Setup, pool: Pool | None = None) -> None:
        pool = pool or Pool(setup.devices)
        self.setup = setup
        self.port, self.results, self.jobs, self.procs = pool.port, pool.results, pool.jobs, pool.procs
        for q in self.jobs:
            q.put(setup)
        self.joined = False
        self.closed = False
        self.fp8_kernel = "eager"  # set by the pipeline once it has chosen (fp8_kernel.py)
        self.failure: str | None = None
        # Measured peaks of the other ranks' GPUs, for the manifest next to this process's own.
        self.worker_peaks_gib: dict[str, float] = {}
        self._pending: list[tuple[str, int, object]] = []
        self._searching = threading.Event()
        self._closing = False
        self._watch = threading.Thread(target=self._watchdog, name="replica-watchdog", daemon=True)
        self._watch.start()
        log.info(
            "data-parallel replicas: %d processes on %s, each searching 1/%d of the batches",
            setup.world,
            ", ".join(setup.devices),
            setup.world,
        )

    # -- failure handling -------------------------------------------------------------------
    def _watchdog(self) -> None:

        pending = {p.sentinel: p for p in self.procs}
        while pending and not self._closing:
            for s in wait(list(pending), timeout=1.0):
                p = pending.pop(s)
                if p.exitcode != 0 and not self._closing:
                    self._failed(p)
                    return

    def _describe(self, rank: int, what: str) -> str:
        return f"the replica on {self.setup.devices[rank]} (rank {rank}) failed: {what}"

    def _failed(self, p) -> None:
        msg = self._drain_error() or f"exited with code {p.exitcode}"
        self.failure = self._describe(self.procs.index(p) + 1, msg)
        log.error("%s", self.failure)
        if not self._searching.wait(0):
            return  # rank 0 is not in a collective: the next search or close() raises it
        # gloo raises at once when a peer's connection closes; NCCL waits for its timeout, so
        # abort the communicators, and stop this process outright if even that does not return.
        deadline = time.monotonic() + _GRACE_S
        while self._searching.is_set() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self._searching.is_set() and self.setup.backend == "nccl":
            import torch.distributed as dist  # torch: this module is imported on the refusal path

            dist.distributed_c10d._abort_process_group()
            deadline = time.monotonic() + _GRACE_S
            while self._searching.is_set() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self._searching.is_set():
            log.error("stopping: the search did not return after the replica failed")
            self._terminate()
            os._exit(1)

    def _drain_error(self) -> str | None:
        """The error a dead replica reported, if it could (a killed one cannot)."""
        try:
            while True:
                report = self.results.get(timeout=0.5)
                if report[0] == "error":
                    return str(report[2])
                self._pending.append(report)
        except queue.Empty:
            return None

    def _raise_failure(self, exc: BaseException | None = None) -> None:
        raise RunFailed(
            f"{self.failure}. Rerun with --parallel layers (one process, the LM "
            "split across the GPUs) or fewer --gpus"
        ) from exc

    def _get(self, kind: str, rank: int):
        """The report of `kind` from `rank` (waiting for it); raises if a replica failed."""
        while True:
            for i, (got_kind, got_rank, payload) in enumerate(self._pending):
                if got_kind == "error":
                    self.failure = self._describe(got_rank, payload)
                if (got_kind, got_rank) == (kind, rank):
                    del self._pending[i]
                    return payload
            if self.failure:
                self._raise_failure()
            try:
                self._pending.append(self.results.get(timeout=1.0))
            except queue.Empty:
                continue

    def _dead(self, wait_s: float) -> str | None:
        """A replica that has exited with an error (waiting up to `wait_s` for one to show)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if p.exitcode not in (None, 0):
                    return self._describe(rank, f"exited with code {p.exitcode}")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # -- the searches ---------------------------------------------------------------------------
    def join(self) -> None:
        """Wait for every replica to load, then form the process group: before the first search."""
        if self.joined:
            return
        t0 = time.perf_counter()
        loads = [self._get("loaded", r) for r in range(1, self.setup.world)]
        self._searching.set()
        try:
            _init_group(self.setup, 0, self.port)
        finally:
            self._searching.clear()
        self.joined = True
        log.info(
            "replicas ready (their loads %s s; waited %.1f s for them)",
            ", ".join(f"{s:.1f}" for s in loads),
            time.perf_counter() - t0,
        )

    def search(self, model, spec, batches: list, checkpoint: SearchCheckpoint, stop, checkpointing=True):
        """`autoquant.search` on rank 0's share of `batches`, the replicas on theirs (every
        rank with gradient checkpointing as `checkpointing` says).

        Returns rank 0's Search, whose calibration and scores are those of all the batches.
        """
        from . import autoquant  # ModelOpt: replicas.py is imported on the CLI's cheap path

        world = self.setup.world
        if min(spec.num_calib_steps, spec.num_score_steps) < world:
            raise RunFailed(
                f"{world} replicas need at least {world} calibration and score steps "
                f"(have {spec.num_calib_steps} and {spec.num_score_steps}); use "
                "--parallel layers or fewer --gpus"
            )
        if self.failure:
            self._raise_failure()
        self.join()
        cpu = [{k: v.cpu() for k, v in b.items()} for b in batches]
        for r in range(1, world):
            job = (self.fp8_kernel, spec_for_rank(spec, r, world), cpu[r::world], checkpoint.path)
            self.jobs[r - 1].put((*job, checkpointing))
        self._searching.set()
        try:
            found = autoquant.search(
                model,
                spec_for_rank(spec, 0, world),
                batches[0::world],
                checkpoint,
                stop,
                checkpointing,
            )
        except BaseException as exc:
            self.failure = self.failure or self._dead(wait_s=3.0)
            if self.failure:
                self._raise_failure(exc)
            # The replicas may be waiting in a collective this process will not reach: stop
            # them, and let any later search say so.
            self.failure = f"this process's search stopped ({type(exc).__name__}: {exc})"
            self._closing = True
            self._terminate()
            raise
        finally:
            self._searching.clear()
        for r in range(1, world):
            self.worker_peaks_gib[self.setup.devices[r].removeprefix("cuda:")] = round(
                self._get("done", r), 2
            )
        return dataclasses.replace(found, spec=spec, worker_peaks_gib=dict(self.worker_peaks_gib))

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()

    def close(self, ok: bool = True) -> None:
        """Tear the group down and stop the replicas (idempotent). This process leaves the group
        first: a replica's own teardown may wait for it."""
        if self.closed:
            return
        import torch.distributed as dist  # torch: this module is imported on the refusal path

        self.closed = self._closing = True
        clean = ok and not self.failure
        if clean:
            for q in self.jobs:
                q.put(None)
        if dist.is_initialized():
            dist.destroy_process_group()
        if clean:
            for p in self.procs:
                p.join(timeout=30)
        self._terminate()

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
