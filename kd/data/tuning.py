"""Data-loader worker count: ``data.num_workers: auto`` and ``kd tune-loader``.

Too few workers starve the accelerator; too many oversubscribe the CPUs, and the training step
itself slows down (one team's backward pass swung between 8 s and 30 s until they *lowered*
``num_workers``). So kd measures instead of guessing.

**The cap.** Workers per rank are capped by the CPUs each local rank can have, minus one for the
main process, which runs the training loop and, on GPUs, feeds the device and the collectives.
The CPUs of a rank (:func:`cpus_per_rank`) are its CPU affinity set, divided among the local
ranks only as far as they share it: torchrun's workers inherit one set, the node's, while
``srun`` with one task per GPU (and ``mpirun`` with its default binding) give each rank its own
CPUs, already a share of the node, which kd must not divide again (that gave 0 workers). So the
number of ranks sharing the set is estimated from its size: ``local_world_size`` × set / node,
rounded, between 1 and ``local_world_size``, the node being the CPUs the job has on this machine
(:func:`node_cpus`: Slurm's count, a container's or job's cpuset, or every CPU). Whole node: all
ranks share it; one rank's share or less: its own; a socket of a two-socket node: half the
ranks. A CPU quota (Docker's ``--cpus``, Kubernetes limits), shared by the whole container, is
divided among all local ranks and caps the result.

**``auto``** (:func:`resolve_num_workers`) runs a short sweep at start-up through the real loader
path (:func:`kd.data.build_train_loader` with the real dataset, transform and collate):
candidates 0, 1, 2, 4, 6, 8, 12, … up to the cap, each measured for whole "rounds" of batches (one
batch per worker) after a warm-up that drains the batches made ahead while the workers started,
within a time budget per candidate and in total; the sweep stops once more workers no longer add
5 % throughput. It picks the *fewest* workers that
reach 95 % of the best measured images/s. To keep the sweep to a few seconds even for
ImageNet-sized JPEGs, it uses a probe batch (fewer images per batch than training, sized so one
batch takes ~0.05 s of one CPU): throughput per image is what is compared, and decoding, transform,
collation and inter-process transfer all stay real.

**The cache.** The choice is stored in ``$KD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/kd`` or
``~/.cache/kd``) under ``loader/<key>.json``, one file per key. The key is the hostname, the CPU
count, the CPUs this process may use (affinity, quota), the local world size, the torch version
and a hash of the data config the caller passes (``cache_key``), so a restart on the same machine
with the same data does not sweep again; delete the file to measure again. Files are replaced
atomically (temporary file in the same folder, then ``os.replace``), so readers see a whole entry
or none; an unreadable or corrupt entry is ignored and rewritten.

**Ranks on one node agree without a process group.** Every rank computes the same key; the first
to take an exclusive lock on ``loader/<key>.lock`` (``fcntl.flock``, released by the kernel if its
holder dies) sweeps and writes the entry while the others wait (up to
:data:`LOCK_TIMEOUT_S`), then they read the entry it wrote. Measuring while the other ranks wait
also keeps their loaders from disturbing the measurement. Where no lock can be taken (no
``fcntl``, a file system without locks, an unwritable cache), each rank sweeps on its own and,
before writing, adopts an entry another rank wrote meanwhile: the first to finish wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd.data.cache_dir import default_cache_dir
from kd.data.loaders import build_train_loader
from kd.errors import DataError, UserError

log = logging.getLogger(__name__)

TOLERANCE = 0.95  # fewest workers within 5 % of the best throughput
IMPROVEMENT = 1.05  # a candidate must beat the best so far by 5 % to keep sweeping
AUTO_BUDGET_S = 5.0  # the whole start-up sweep
CANDIDATE_MIN_S = 0.25  # measure one candidate at least this long (cheap data: less noise)
CANDIDATE_BUDGET_S = 1.0  # ... and at most this long (whole rounds, the warm-up not counted)
PROBE_BATCH_S = 0.05  # one CPU's time for one probe batch
LOCK_TIMEOUT_S = 120.0  # how long a rank waits for another rank's sweep
CACHE_VERSION = 1  # bump when the measurement or the choice rule changes

# A loader factory: (num_workers, prefetch_factor) -> an iterable of batches.
LoaderFactory = Callable[[int, int], Iterable[Any]]


# ------------------------------------------------------------------------------------------ CPUs
def available_cpus() -> list[int]:
    """The logical CPUs this process may run on (its affinity set)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this container (cgroup v2 ``cpu.max`` or v1 CFS), in CPUs; None if none.

    Docker's ``--cpus`` and Kubernetes CPU limits set a quota while the affinity set still lists
    every CPU of the host.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _parse_cpu_list(text: str) -> int:
    """The number of CPUs in a kernel CPU list such as ``0-3,8,10-11``."""
    count = 0
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            count += int(last or first) - int(first) + 1
    return count


def node_cpus(env: Mapping[str, str] | None = None, root: Path = Path("/sys/fs/cgroup"),
              self_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this job has on this node: Slurm's ``SLURM_CPUS_ON_NODE`` (the job's share of a
    node it may share with other jobs), else the cpuset of this process's cgroup (a container
    limited by ``--cpuset-cpus``, Kubernetes' static CPU manager, a batch system's job cgroup),
    else every online CPU."""
    env = os.environ if env is None else env
    slurm = env.get("SLURM_CPUS_ON_NODE", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    files = []
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/path" (cgroup v2), "3:cpuset:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            files.append(root / path.lstrip("/") / "cpuset.cpus.effective")
        elif "cpuset" in controllers.split(","):
            files.append(root / "cpuset" / path.lstrip("/") / "cpuset.effective_cpus")
    files += [root / "cpuset.cpus.effective", root / "cpuset" / "cpuset.effective_cpus"]
    for file in files:
        try:
            count = _parse_cpu_list(file.read_text())
        except (OSError, ValueError):
            continue
        if count > 0:
            return count
    return os.cpu_count() or 1


def cpu_budget() -> int:
    """CPUs this process may keep busy: its affinity set, or the container's quota if lower."""
    cpus = len(available_cpus())
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, math.floor(limit))) if limit is not None else cpus


def ranks_sharing_cpus(local_world_size: int, cpus: int | None = None,
                       node: int | None = None) -> int:
    """How many local ranks share this process's affinity set (see the module docstring).

    The whole node's CPUs: all ``local_world_size`` ranks (torchrun, a bare ``mpirun``). One
    rank's share of the node or less: this rank alone (``srun`` binding each task to its
    CPUs). In between, a set bound per socket or NUMA node, the ranks bound to it.
    """
    lws = max(1, local_world_size)
    cpus = len(available_cpus()) if cpus is None else cpus
    node = node_cpus() if node is None else node
    return min(lws, max(1, round(cpus * lws / max(cpus, node))))


def cpus_per_rank(local_world_size: int) -> int:
    """CPUs this process may use: its affinity set shared among the local ranks that share it
    (not among all of them when the launcher gave each rank its own CPUs), and the container's
    CPU quota shared among all local ranks."""
    lws = max(1, local_world_size)
    cpus = len(available_cpus())
    share = cpus // ranks_sharing_cpus(lws, cpus)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        share = min(share, max(1, math.floor(limit)) // lws)
    return max(1, share)


def max_workers(local_world_size: int) -> int:
    """The most workers a rank should start: its CPUs minus one for the main process."""
    return max(0, cpus_per_rank(local_world_size) - 1)


def _cpu_times() -> list[Any]:
    import psutil

    return psutil.cpu_times(percpu=True)


def _busy_percent(before: list[Any], after: list[Any], cpus: Sequence[int]) -> float:
    """Mean utilisation (%) of ``cpus`` between two ``psutil.cpu_times(percpu=True)`` samples."""
    cpus = [c for c in cpus if c < min(len(before), len(after))] or range(len(after))
    busy = total = 0.0
    for c in cpus:
        a, b = before[c], after[c]
        t = sum(b) - sum(a)
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
        busy, total = busy + t - idle, total + t
    # Clamped: over a few milliseconds the counters' float differences can fall just outside.
    return min(100.0, max(0.0, 100.0 * busy / total)) if total > 0 else 0.0


# ----------------------------------------------------------------------------- measurement
@dataclass
class Measurement:
    """Throughput of one loader setting."""

    workers: int
    prefetch_factor: int | None  # None with 0 workers (no prefetching)
    img_per_s: float
    cpu_percent: float  # mean utilisation of this process's CPUs while measuring
    wait_ms: float  # mean time the consumer waited for each batch
    batches: int  # batches measured (after the warm-up round)
    batch_size: int  # images per batch
    seconds: float  # measured time (warm-up excluded)
    loader_cpus: float = 0.0  # CPUs the loader kept busy: this process and its workers

    @property
    def img_per_core(self) -> float:
        """Images/s per CPU the loader kept busy: the per-core rate of the data pipeline (what
        ``kd plan`` multiplies by the cores a GPU has)."""
        return self.img_per_s / self.loader_cpus if self.loader_cpus > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "img_per_core": round(self.img_per_core, 2)}


def _batch_len(batch: Any) -> int:
    """Images in a batch: ``(images, labels, ...)`` tuples, dicts with ``image``, or tensors."""
    if isinstance(batch, dict):
        batch = batch.get("image", next(iter(batch.values())))
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    return len(batch)


def _endless(loader: Iterable[Any], epoch: int) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (small datasets run out during a measurement)."""
    sampler = getattr(loader, "batch_sampler", None)
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the data loader yielded no batches; the training split is smaller "
                            "than one batch (lower data.batch_size)")
        epoch += 1


def _process_cpu_s(procs: list[Any]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process still alive."""
    out = {}
    for p in procs:
        with contextlib.suppress(Exception):  # a process that just exited
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def measure_throughput(make_loader: LoaderFactory, workers: int, prefetch_factor: int = 2, *,
                       batches: int = 4, min_s: float = 0.0, budget_s: float | None = None,
                       step_s: float = 0.0, epoch: int = 0) -> Measurement:
    """Measure images/s of one loader setting.

    With ``n`` workers batches arrive in rounds of ``n`` (each worker makes one in parallel),
    and up to ``n × prefetch_factor`` are made ahead, some while the workers start. So the
    warm-up drains those first ``prefetch_factor`` rounds, and only whole rounds are measured
    after it: at least ``batches`` batches, two rounds and ``min_s`` seconds, but no more once
    ``budget_s`` is spent (never less than one round). ``step_s`` simulates a training step
    after each batch (the consumer sleeps, as a main process waiting for its GPU does), so
    ``wait_ms`` shows whether the loader keeps up.

    Example:
        >>> from kd.data import build_dataset, build_train_loader
        >>> ds = build_dataset("synthetic", "train", root=None, image_size=8, num_classes=2,
        ...                    augment=True, channels=3, synthetic_size=32)
        >>> m = measure_throughput(lambda w, p: build_train_loader(ds, 4, 0, 0, 1, w, False, p), 0)
        >>> m.workers, m.batch_size, m.img_per_s > 0
        (0, 4, True)
    """
    import psutil

    per_round = max(1, workers)
    target = per_round * max(2, math.ceil(batches / per_round))
    with warnings.catch_warnings():
        # torch warns when workers exceed the CPUs; measuring that is the point of a sweep.
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = make_loader(workers, prefetch_factor)
        stream = _endless(loader, epoch)
        try:
            for _ in range(per_round * (prefetch_factor if workers else 1)):  # warm-up
                next(stream)
            me = psutil.Process()
            procs = [me, *me.children()]  # this process and the loader's workers
            cpus = available_cpus()
            proc_before, cpu_before = _process_cpu_s(procs), _cpu_times()
            start = time.perf_counter()
            waited, images, n = 0.0, 0, 0
            while True:
                t = time.perf_counter()
                batch = next(stream)
                waited += time.perf_counter() - t
                images, n = images + _batch_len(batch), n + 1
                del batch
                if step_s > 0:
                    time.sleep(step_s)
                if n % per_round:
                    continue  # only whole rounds
                elapsed = time.perf_counter() - start
                if (n >= target and elapsed >= min_s) or (budget_s is not None and
                                                          elapsed > budget_s):
                    break
            cpu = _busy_percent(cpu_before, _cpu_times(), cpus)
            proc_after = _process_cpu_s(procs)
        finally:
            stream.close()  # drops the loader's iterator; its workers shut down with it
            del stream, loader
    used = sum(proc_after[pid] - proc_before[pid] for pid in proc_after if pid in proc_before)
    return Measurement(workers, prefetch_factor if workers > 0 else None,
                       images / elapsed if elapsed > 0 else 0.0, cpu, 1000 * waited / n, n,
                       images // n, elapsed, max(0.0, used / elapsed) if elapsed > 0 else 0.0)


# ---------------------------------------------------------------------------------- choice
def choose_workers(measurements: Iterable[Measurement], *, cap: int | None = None,
                   tolerance: float = TOLERANCE) -> int:
    """The fewest workers that reach ``tolerance`` × the best measured images/s.

    Measurements above ``cap`` are ignored; with none left the answer is 0.

    Example:
        >>> ms = [Measurement(w, 2, r, 0, 0, 4, 8, 1) for w, r in [(0, 100), (1, 180), (2, 200)]]
        >>> choose_workers(ms), choose_workers(ms, cap=1), choose_workers(ms, tolerance=0.9)
        (2, 1, 1)
    """
    ms = [m for m in measurements if cap is None or m.workers <= cap]
    return recommend(ms, tolerance=tolerance).workers if ms else 0


def recommend(measurements: Iterable[Measurement], *, cap: int | None = None,
              tolerance: float = TOLERANCE) -> Measurement:
    """The cheapest setting within ``tolerance`` of the best: fewest workers, then least
    prefetching (memory), among settings at or below ``cap``."""
    ms = [m for m in measurements if cap is None or m.workers <= cap]
    if not ms:
        raise ValueError("no measurements at or below the cap")
    best = max(m.img_per_s for m in ms)
    good = [m for m in ms if m.img_per_s >= tolerance * best]
    return min(good, key=lambda m: (m.workers, m.prefetch_factor or 0))


def auto_candidates(cap: int) -> list[int]:
    """Worker counts the start-up sweep tries: 0, 1, 2, 4, 6, 8, 12, 16, 24, 32, … and the cap."""
    steps = {0, 1, 2, 4, 6, 8}
    k = 3
    while 2**k < cap:  # then powers of two and 1.5 times them: 12, 16, 24, 32, 48, ...
        steps |= {3 * 2 ** (k - 1), 2 ** (k + 1)}
        k += 1
    return sorted({c for c in steps if c <= cap} | {cap})


def tune_candidates(cap: int) -> list[int]:
    """Worker counts ``kd tune-loader`` tries: every count up to 8, then the auto steps."""
    return sorted(set(range(min(cap, 8) + 1)) | set(auto_candidates(cap)))


def sweep_workers(make_loader: LoaderFactory, cap: int, *, prefetch_factor: int = 2,
                  batches: int = 4, budget_s: float = AUTO_BUDGET_S,
                  candidate_min_s: float = CANDIDATE_MIN_S,
                  candidate_budget_s: float = CANDIDATE_BUDGET_S,
                  improvement: float = IMPROVEMENT) -> list[Measurement]:
    """The start-up sweep: candidates up to ``cap`` until throughput stops improving.

    From 2 workers on, a candidate that does not beat the best so far by ``improvement`` ends
    the sweep (0 and 1 worker are always both tried: one worker alone often just matches the main
    process). The sweep also ends when ``budget_s`` is spent.
    """
    out: list[Measurement] = []
    start = time.perf_counter()
    for i, n in enumerate(auto_candidates(cap)):
        if out and time.perf_counter() - start > budget_s:
            log.info("data.num_workers=auto: sweep budget (%.0f s) spent after %d workers",
                     budget_s, out[-1].workers)
            break
        best = max((m.img_per_s for m in out), default=0.0)
        # Each candidate reads other images (another epoch), so page-cache warmth is comparable.
        m = measure_throughput(make_loader, n, prefetch_factor, batches=batches,
                               min_s=candidate_min_s, budget_s=candidate_budget_s, epoch=i)
        out.append(m)
        if n >= 2 and m.img_per_s < improvement * best:
            break
    return out


def probe_batch_size(dataset: Any, batch_size: int, target_s: float = PROBE_BATCH_S,
                     max_probe_s: float = 0.5) -> int:
    """Images per probe batch: about ``target_s`` of one CPU, at most ``batch_size``.

    Times a few samples in this process (``dataset[(index, seed)]``, augmented as in training).
    """
    times: list[float] = []
    start = time.perf_counter()
    for i in range(min(len(dataset), 9)):
        t = time.perf_counter()
        dataset[(i, i)]
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_probe_s:
            break
    per_sample = statistics.median(times[1:] or times)  # the first pays lazy imports
    size = round(target_s / max(per_sample, 1e-6))
    return max(1, min(batch_size, len(dataset), size))


def train_loader_factory(dataset: Any, batch_size: int, seed: int,
                         pin_memory: bool = False) -> LoaderFactory:
    """``(workers, prefetch_factor) ->`` the training loader of one rank, as the trainer builds
    it (:func:`kd.data.build_train_loader`)."""

    def make(workers: int, prefetch_factor: int) -> Iterable[Any]:
        return build_train_loader(dataset, batch_size, seed, 0, 1, workers, pin_memory,
                                  prefetch_factor)

    return make


def pipeline_rate(dataset: Any, samples: int = 32, seed: int = 0, warmup: int = 4) -> float:
    """Training samples per second one core produces: ``dataset[(i, seed + i)]`` in this
    process with one torch thread (as a loader worker runs), after ``warmup`` samples.

    With ``data.decode: device`` the dataset's samples are the loader's share only (the bytes
    and the plan), so this is the per-core rate of the loader either way.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = len(dataset)
        for i in range(min(warmup, n)):
            dataset[(i, seed + i)]
        count = min(samples, n)
        t = time.perf_counter()
        for i in range(count):
            dataset[((warmup + i) % n, seed + warmup + i)]
        return count / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- cache
def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_fields(local_world_size: int, cache_key: dict[str, Any]) -> dict[str, Any]:
    """What a cached choice depends on: this machine, the rank layout, torch and the data."""
    import torch

    return {"version": CACHE_VERSION, "host": socket.gethostname(), "cpu_count": os.cpu_count(),
            "cpus": cpu_budget(), "local_world_size": local_world_size,
            "cpus_per_rank": cpus_per_rank(local_world_size),
            "torch": torch.__version__, "data": _hash(cache_key)}


def cache_path(fields: dict[str, Any], cache_dir: str | Path | None = None) -> Path:
    """The cache file of one key."""
    return Path(cache_dir or default_cache_dir()) / "loader" / f"{_hash(fields)}.json"


def read_cache(path: Path, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The cached entry for ``fields``, or None if absent, unreadable, corrupt or another key's."""
    try:
        entry = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring the unreadable loader cache %s (%s); measuring again", path, e)
        return None
    workers = entry.get("num_workers") if isinstance(entry, dict) else None
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        log.warning("ignoring the corrupt loader cache %s; measuring again", path)
        return None
    if entry.get("key") != fields:  # a hash collision, or an edited file
        log.warning("ignoring the loader cache %s: it holds another key; measuring again", path)
        return None
    return entry


def write_cache(path: Path, entry: dict[str, Any]) -> bool:
    """Replace ``path`` atomically with ``entry``; False (and a warning) if it cannot be written."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as e:
        log.warning("cannot write the loader cache %s (%s); the next start measures again",
                    path, e)
        return False
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _exclusive(lock_path: Path, timeout_s: float) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yields False where none could be taken."""
    try:
        import fcntl

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock_path, "a")  # noqa: SIM115 (held open for the lock's lifetime)
    except (ImportError, OSError):
        yield False
        return
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("data.num_workers=auto: waited %.0f s for another rank's sweep "
                                "(%s); measuring here", timeout_s, lock_path)
                    yield False
                    return
                if not waited:
                    log.info("data.num_workers=auto: waiting for another rank's sweep")
                    waited = True
                time.sleep(0.05)
            except OSError:  # e.g. ENOLCK: a file system without locks
                yield False
                return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()


# ------------------------------------------------------------------------------------ auto
@dataclass
class AutoChoice:
    """What ``data.num_workers: auto`` chose, and why."""

    num_workers: int
    cap: int
    cached: bool
    cache_file: Path | None
    measurements: list[Measurement] = field(default_factory=list)
    probe_batch_size: int | None = None
    seconds: float = 0.0

    def describe(self) -> str:
        """One log line: the choice, the cap and the images/s measured per worker count."""
        rates = ", ".join(f"{m.workers}: {m.img_per_s:.0f}" for m in self.measurements)
        source = f"cached in {self.cache_file}" if self.cached else (
            f"measured in {self.seconds:.1f} s, probe batch {self.probe_batch_size}")
        return (f"data.num_workers=auto -> {self.num_workers} (cap {self.cap}; images/s by "
                f"workers: {rates or 'not measured'}; {source})")


def _entry(choice: AutoChoice, fields: dict[str, Any], cache_key: dict[str, Any]) -> dict:
    return {"key": fields, "num_workers": choice.num_workers, "cap": choice.cap,
            "probe_batch_size": choice.probe_batch_size, "seconds": round(choice.seconds, 3),
            "measurements": [m.to_dict() for m in choice.measurements],
            "data_config": json.loads(json.dumps(cache_key, default=str)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _from_entry(entry: dict[str, Any], cap: int, path: Path) -> AutoChoice:
    measurements = []
    for m in entry.get("measurements") or []:
        with contextlib.suppress(TypeError):  # derived values (img_per_core) are not fields
            measurements.append(Measurement(**{k: v for k, v in m.items()
                                               if k in Measurement.__dataclass_fields__}))
    return AutoChoice(min(entry["num_workers"], cap), cap, True, path, measurements,
                      entry.get("probe_batch_size"))


def auto_num_workers(dataset: Any, batch_size: int, local_world_size: int,
                     cache_key: dict[str, Any], *, cache_dir: str | Path | None = None,
                     seed: int = 0, prefetch_factor: int = 2, pin_memory: bool = False,
                     make_loader: LoaderFactory | None = None,
                     budget_s: float = AUTO_BUDGET_S) -> AutoChoice:
    """Measure (or read from the cache) the worker count for ``data.num_workers: auto``.

    ``make_loader(workers, prefetch_factor)`` builds the loader to measure; by default it is
    :func:`kd.data.build_train_loader` over ``dataset`` with a probe batch (see the module's
    documentation). See :func:`resolve_num_workers` for the other arguments.
    """
    cap = max_workers(local_world_size)
    fields = cache_fields(local_world_size, cache_key)
    path = cache_path(fields, cache_dir)
    entry = read_cache(path, fields)
    if entry is not None:
        return _from_entry(entry, cap, path)
    if cap == 0:  # one CPU for this rank: nothing to choose, nothing to measure
        return AutoChoice(0, cap, False, None)
    with _exclusive(path.with_suffix(".lock"), LOCK_TIMEOUT_S) as locked:
        entry = read_cache(path, fields)  # another rank may have swept while this one waited
        if entry is not None:
            return _from_entry(entry, cap, path)
        start = time.perf_counter()
        probe = None
        if make_loader is None:
            probe = probe_batch_size(dataset, batch_size)
            make_loader = train_loader_factory(dataset, probe, seed, pin_memory)
        measurements = sweep_workers(make_loader, cap, prefetch_factor=prefetch_factor,
                                     budget_s=budget_s)
        choice = AutoChoice(choose_workers(measurements, cap=cap), cap, False, path,
                            measurements, probe, time.perf_counter() - start)
        if not locked:  # no lock: the first rank to finish wins, the others adopt its entry
            entry = read_cache(path, fields)
            if entry is not None:
                return _from_entry(entry, cap, path)
        if not write_cache(path, _entry(choice, fields, cache_key)):
            choice.cache_file = None
    return choice


def resolve_num_workers(setting: int | str, dataset: Any, batch_size: int,
                        local_world_size: int, cache_key: dict[str, Any], *,
                        cache_dir: str | Path | None = None, seed: int = 0,
                        prefetch_factor: int = 2, pin_memory: bool = False,
                        make_loader: LoaderFactory | None = None) -> int:
    """The number of data-loader workers for this rank from ``data.num_workers``.

    Args:
        setting: an integer (returned as is; a warning if it exceeds the CPUs of this rank) or
            ``"auto"`` (a cached or measured choice, see the module's documentation).
        dataset: the training dataset (a :class:`~kd.data.KeyedDataset`).
        batch_size: images per process per batch.
        local_world_size: ranks on this node, which share its CPUs.
        cache_key: the data config (any JSON-able dict); a different one measures again.
        cache_dir: where choices are cached; default :func:`default_cache_dir`.
        seed: seed of the batches measured.
        prefetch_factor: ``data.prefetch_factor``, used while measuring.
        pin_memory: as the training loader will (CUDA).
        make_loader: measure this loader factory instead of the default (e.g. an iterable
            dataset with its own loader).

    Returns:
        The worker count, between 0 and :func:`max_workers` for ``auto``.

    Example:
        >>> from kd.data import build_dataset
        >>> ds = build_dataset("synthetic", "train", root=None, image_size=8, num_classes=2,
        ...                    augment=True, channels=3, synthetic_size=32)
        >>> resolve_num_workers(3, ds, 8, 1, {"name": "synthetic"})  # doctest: +SKIP
        3
    """
    if isinstance(setting, int) and not isinstance(setting, bool):
        cap = max_workers(local_world_size)
        if setting > cap:
            log.warning("data.num_workers=%d is more than this rank's CPUs allow (%d CPUs for "
                        "this rank, one of %d on this node, one kept for the training process: "
                        "at most %d workers); too many workers saturate the CPUs and slow the "
                        "training step itself; consider data.num_workers=auto", setting,
                        cpus_per_rank(local_world_size), local_world_size, cap)
        return setting
    if setting != "auto":
        raise UserError(f"invalid value for 'data.num_workers': {setting!r} (an integer >= 0 "
                        f"or auto)")
    choice = auto_num_workers(dataset, batch_size, local_world_size, cache_key,
                              cache_dir=cache_dir, seed=seed, prefetch_factor=prefetch_factor,
                              pin_memory=pin_memory, make_loader=make_loader)
    log.info(choice.describe())
    return choice.num_workers
