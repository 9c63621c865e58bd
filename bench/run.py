"""``make bench``: the harvester against curl and a plain aiohttp script on loopback, with small
and with real-sized images, memory at 10x the input, slow links, the rate limit and overload,
each measured in one run and checked against the targets of issues 11, 12 and 21.

Every output (curl's, the plain script's, the harvester's, and their logs) goes to a tmpfs the
bench mounts over ``bench-out/runs`` (as root; otherwise a folder under /dev/shm, with a note),
so that the disk's cost of creating files right after deleting thousands decides no ratio. Each
contender's output is deleted before the next contender starts, so none runs beside another's
files (the tmpfs is memory).

Sections (all by default; ``--only speed,memory,large,s3,slow,rps,overload,compact,cluster,serve``
picks some):

speed   a world of N requests with 1-4 images of ~30 KB, served by nginx on 127.0.0.1. Each
        round times ``curl --parallel --parallel-max 64`` downloading every result and image
        URL into files (a floor no harvester can beat), then ``plain.py`` (what a skilled user
        would write instead: 64 aiohttp tasks on uvloop, sha256 while streaming, no retries,
        no manifest), then the harvester with ``--workers 1``, then the harvester with its
        defaults (both with the bench's ``--rps 100000 --concurrency 64``). Checked, at 20,000
        requests, within each round, medians of the rounds' ratios: the CPU of ``--workers 1``
        at most 1.5x plain.py's, the wall of the defaults at most plain.py's; and the peak RSS
        of either harvest: at most 200 MB for its largest process, 300 MB summed over its
        processes. curl's ratio and the CPU-seconds per 1,000 requests are printed, not checked.
memory  the harvester (defaults) once on a world of 10x N requests with tiny images: its peak
        RSS, summed over its processes, must stay within 1.2x of the speed section's median
        for the defaults.
large   real-sized images: a world of 1,000 requests (BENCH_LARGE_N) with 1-4 images of ~1 MB
        each (JPEG and PNG, random bytes after the header), curl, plain.py and the harvester
        (defaults) in each of 3 rounds (BENCH_LARGE_RUNS); MB/s is the world's image bytes over
        a contender's wall. Checked at 1,000 requests: the harvester's MB/s at least 0.9x
        plain.py's (median of the rounds' ratios). Its peak RSS is shown.
s3      the speed world harvested once into a folder and once into Ceph's S3 gateway on
        127.0.0.1 (``--out s3://bench/night``, the gateway started as the tests start it):
        wall and CPU side by side; nothing checked against a target.
slow    nginx adds 200 ms to every response; ``--concurrency 64`` should reach 90% of the ideal
        64 / 0.2 s = 320 results/s, measured from the server's access log.
rps     ``--rps 50`` for a minute; the rate and every one-second window come from the
        server's access log (when each request started, on the server's clock).
overload  the sandbox (in this process, its clock) in two modes: 10% of request ids answer 429
        twice before their result (half with Retry-After: 1), with 3% pending twice, at
        ``--rps 50 --pending-wait 15``: the rate must stay at 80% of --rps and the run end
        with every pair ok; then a sandbox that answers 429 above X accepted requests a
        second, at ``--rps 50``: the accepted rate must settle between 0.8X and X.
compact the latest-state query over 365 nightly runs of N requests (parts generated with the
        manifest's schema, no HTTP), before and after ``harvester compact``: after, at most 2x
        the same query over one night (bench/compaction.py).
cluster the slow link again, the harvest on Ray (``--engine ray``): one node, then two nodes
        (``ray.cluster_utils`` on 127.0.0.1), one shard of ``--concurrency 32`` per node; two nodes
        should reach 1.8x one node's results/s, from the server's access log.
serve   ``harvester serve`` under ``BENCH_SERVE_N`` (100,000) signed deliveries of ~30 KB, each a
        result of the speed world (1-4 images on nginx) under a request id of its own, POSTed
        from ``BENCH_SERVE_CONCURRENCY`` (32) connections (bench/deliveries.py). Its ``--out``
        is on the disk (``bench-out/serve-out``, deleted after), not the tmpfs: an
        acknowledgement waits for fsync. Checks item 6 of issue 22: at least 500
        deliveries/s acknowledged, p99 acknowledgement under 250 ms (the sender's clock), RSS
        at the end within 1.2x of RSS at 10% of the deliveries, the backlog drained (every
        delivery ends as ok rows) and SIGTERM's exit 0 within the grace period.

Worlds are cached under the output folder (``bench-out/``) and reused by later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tests.s3gateway

import compaction
import deliveries
import nginx
import raynodes
import world

from harvester.api.ratelimit import most_starts_in_window
from harvester.sandbox import FaultRates, SandboxConfig, running_sandbox

ROOT: Final = Path(__file__).resolve().parent.parent
HARVESTER: Final = [sys.executable, "-m", "harvester"]
KEY: Final = "bench-key"

PLAIN: Final = [sys.executable, str(Path(__file__).parent / "plain.py")]

# Issue 21's speed targets, each a ratio within one round (the median of the rounds' ratios).
TARGET_N: Final = 20_000
"""The speed section's targets are for this many requests."""
MAX_CPU_VS_PLAIN: Final = 1.5
"""CPU (user + system) of the harvester with ``--workers 1`` / the plain script's."""
MAX_WALL_VS_PLAIN: Final = 1.0
"""Wall time of the harvester with its defaults / the plain script's."""
MAX_RSS_MB: Final = 200.0
"""Peak RSS of the largest process of a harvest."""
MAX_RSS_SUM_MB: Final = 300.0
"""Peak RSS summed over a harvest's processes."""
MAX_RSS_GROWTH: Final = 1.2
LARGE_TARGET_N: Final = 1_000
"""The large section's target is for this many requests."""
LARGE_IMAGE_BYTES: Final = 1_000_000
LARGE_FORMATS: Final = "jpeg,png"
MIN_LARGE_MBPS_VS_PLAIN: Final = 0.9
"""The harvester's MB/s (defaults) / the plain script's, real-sized images."""
SLOW_LATENCY: Final = 0.2
SLOW_CONCURRENCY: Final = 64
MIN_SLOW_SHARE: Final = 0.9
CLUSTER_CONCURRENCY: Final = 32
"""Result fetches in flight per Ray node in the cluster section."""
MIN_CLUSTER_GAIN: Final = 1.8
RPS: Final = 50.0
RPS_TOLERANCE: Final = 0.05
# Issue 12's overload targets.
THROTTLE_SHARE: Final = 0.1
THROTTLE_TIMES: Final = 2
PENDING_SHARE: Final = 0.03
PENDING_WAIT: Final = 15
MIN_THROTTLED_SHARE_OF_RPS: Final = 0.8
MAX_RPS_X: Final = 20.0
MIN_SETTLED_SHARE_OF_X: Final = 0.8
SETTLE_SECONDS: Final = 5.0
"""The start of a capped run the settled rate leaves out."""
TMPFS_SIZE: Final = "16g"
# Issue 22's targets for serve.
MIN_SERVE_RATE: Final = 500.0
"""Deliveries acknowledged per second."""
MAX_SERVE_P99: Final = 0.25
"""Seconds from a delivery's POST to its 2xx, 99th percentile."""
SERVE_BODY_BYTES: Final = 30_000
SERVE_STOP_GRACE: Final = 30.0
"""Seconds SIGTERM may take to exit 0 with the backlog drained."""


@dataclass(frozen=True, slots=True)
class Timed:
    wall: float
    cpu: float
    """user + system seconds of the process and every process it waited for."""
    max_rss_mb: float
    """The peak of the resident memory summed over the process and its children."""
    returncode: int
    top_rss_mb: float = 0.0
    """The peak resident memory of the largest one of those processes."""


def _tree_rss_bytes(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` and all its descendants now, summed, and the largest high-water
    mark (``VmHWM``: the peak between two samples too) of any one of them; 0 once gone."""
    total = top = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if line.startswith("Vm"))
            total += int(fields["VmRSS"].split()[0]) * 1024
            top = max(top, int(fields["VmHWM"].split()[0]) * 1024)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError, KeyError):
            continue  # it exited meanwhile
    return total, top


RSS_SAMPLE_SECONDS: Final = 0.02


def timed(args: Sequence[str], *, env: dict[str, str] | None = None, log: Path) -> Timed:
    """Run a command, with its own rusage (wait4), not the bench's. Its peak RSS is sampled
    every 20 ms over its whole process tree: the summed peak is at least the largest
    high-water mark of any one of its processes, which is the largest process's peak. Not
    ``ru_maxrss``: a child started by vfork and exec inherits the high-water mark of the
    bench's own memory (which holds a whole world's plan)."""
    peak = top = 0
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, top
            while not done.wait(RSS_SAMPLE_SECONDS):
                total, largest = _tree_rss_bytes(proc.pid)
                peak, top = max(peak, total, largest), max(top, largest)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    mb = 1024 * 1024
    return Timed(wall, usage.ru_utime + usage.ru_stime, peak / mb, proc.returncode, top / mb)


def fresh(path: Path) -> Path:
    """An output folder that does not exist yet."""
    if path.exists():
        raise SystemExit(f"bench: {path} exists; it should be a fresh folder")
    return path


def drop(path: Path) -> None:
    """Delete a contender's output, so that the next one starts beside none of it."""
    shutil.rmtree(path)


def one_round(
    w: world.World, out: Path, base_url: str, harvests: Sequence[Sequence[str]]
) -> tuple[Timed, Timed, list[Timed]]:
    """One round: curl, plain.py, then a harvest with each of ``harvests``' extra arguments,
    each contender's output deleted before the next starts (the last round's logs go too: the
    tmpfs is memory)."""
    folder = clear_runs(out)
    config = curl_config(w, folder / "curl", folder / "curl.cfg")
    c = curl(config, folder / "curl", log=folder / "curl.log")
    drop(folder / "curl")
    p = plain(w.csv, folder / "plain", base_url, log=folder / "plain.log")
    drop(folder / "plain")
    timed_harvests = []
    for i, extra in enumerate(harvests):
        target = folder / f"harvest-{i}"
        timed_harvests.append(
            harvest(w.csv, target, base_url, extra, log=folder / f"harvest-{i}.log")
        )
        drop(target)
    return c, p, timed_harvests


def clear_runs(out: Path) -> Path:
    """Empty the scratch tmpfs (``scratch``) of earlier outputs; return it."""
    runs = out / "runs"
    for child in runs.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    return runs


@contextlib.contextmanager
def scratch(out: Path) -> Iterator[Path]:
    """Mount a tmpfs over ``out/runs`` for every output of the bench, and unmount it at the end.
    Where mounting is refused (not root, a container without CAP_SYS_ADMIN), ``out/runs`` is a
    link to a fresh folder under /dev/shm (also memory), removed at the end."""
    runs = out / "runs"
    if runs.is_symlink():
        runs.unlink()
    elif runs.is_dir() and os.path.ismount(runs):
        subprocess.run(["umount", str(runs)], check=False)  # left by an interrupted bench
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(runs)],
            capture_output=True,
            text=True,
            check=False,
        )
        refused = (mount.stderr.strip() or f"exit {mount.returncode}").splitlines()[-1]
    except OSError as exc:  # no mount command
        mount, refused = None, str(exc)
    if mount is not None and mount.returncode == 0:
        print(f"bench: outputs on a tmpfs mounted at {runs} (size {TMPFS_SIZE})", flush=True)
        try:
            yield runs
        finally:
            subprocess.run(["umount", str(runs)], check=False)
            runs.rmdir()
        return
    runs.rmdir()
    shm = Path(f"/dev/shm/harvester-bench-{os.getpid()}")  # noqa: S108 (the bench's own folder)
    shm.mkdir(mode=0o700)
    runs.symlink_to(shm)
    print(f"bench: note: cannot mount a tmpfs ({refused}); outputs go to {shm} instead", flush=True)
    try:
        yield runs
    finally:
        runs.unlink()
        shutil.rmtree(shm, ignore_errors=True)


def harvest(
    csv: Path,
    out: Path | str,
    base_url: str,
    extra: Sequence[str],
    *,
    log: Path,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
) -> Timed:
    """Run a harvest; unless ``check`` is off, any exit but 0 (every pair ok) ends the bench.
    ``out`` is a fresh folder, or an ``s3://`` location (``env_extra``: its AWS variables)."""
    if isinstance(out, Path):
        fresh(out)
    env = {**os.environ, "HARVESTER_API_KEY": KEY, **(env_extra or {})}
    args = [*HARVESTER, "harvest", str(csv), "--out", str(out), "--base-url", base_url, "-q"]
    result = timed([*args, *extra], env=env, log=log)
    if check and result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"bench: the harvest failed (exit {result.returncode}):\n{tail}")
    return result


def curl_config(w: world.World, dest: Path, config: Path) -> Path:
    with open(w.urls) as urls, open(config, "w") as out:
        for line in urls:
            url = line.strip()
            path = url.split("/", 3)[3]
            out.write(f'url = "{url}"\noutput = "{dest / path}"\n')
    return config


def curl(config: Path, dest: Path, *, log: Path) -> Timed:
    fresh(dest)
    args = [
        "curl", "--parallel", "--parallel-max", "64", "--create-dirs", "--fail",
        "--silent", "--show-error", "--config", str(config),
    ]  # fmt: skip
    result = timed(args, log=log)
    if result.returncode != 0:
        raise SystemExit(
            f"bench: curl failed (exit {result.returncode}): {log.read_text()[-2000:]}"
        )
    return result


def plain(csv: Path, dest: Path, base_url: str, *, log: Path) -> Timed:
    fresh(dest)
    env = {**os.environ, "HARVESTER_API_KEY": KEY}
    result = timed([*PLAIN, str(csv), base_url, str(dest), "64"], env=env, log=log)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise SystemExit(f"bench: plain.py failed (exit {result.returncode}):\n{tail}")
    return result


def build_world(root: Path, n: int, image_bytes: int, *, formats: str = "png") -> world.World:
    meta = root / "world.json"
    port = nginx.free_port()
    if meta.exists():
        import json

        saved = json.loads(meta.read_text())["spec"]
        if nginx.port_is_free(saved["port"]):
            port = saved["port"]
    started = time.perf_counter()
    spec = world.WorldSpec(n=n, image_bytes=image_bytes, port=port, formats=formats)
    w = world.generate(root, spec)
    took = time.perf_counter() - started
    if took > 1:
        print(
            f"  world {root.name}: {n:,} requests, {w.images:,} images, "
            f"{w.image_bytes_total / 1e9:.2f} GB (built in {took:.0f} s)",
            flush=True,
        )
    return w


def subset_csv(w: world.World, n: int, path: Path) -> Path:
    with open(w.csv) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i > n:
                break
            dst.write(line)
    return path


def request_starts(access_log: Path) -> list[int]:
    """Start times (ms, server clock) of every result request in an nginx access log."""
    starts = []
    for line in access_log.read_text().splitlines():
        msec, request_time, _status, _bytes, uri = line.split(" ", 4)
        if "/requests/" in uri:
            starts.append(round(float(msec) * 1000) - round(float(request_time) * 1000))
    return sorted(starts)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


@dataclass(slots=True)
class Report:
    lines: list[str]
    failed: int = 0

    def check(self, ok: bool, text: str) -> None:
        self.failed += not ok
        self.lines.append(f"  [{mark(ok)}] {text}")


def judged(report: Report, ok: bool, text: str, *, n: int, target_n: int) -> None:
    """Check a target that holds for ``target_n`` requests; with another count, show it only
    (with fewer requests, start-up weighs more)."""
    if n == target_n:
        report.check(ok, f"{text} at {target_n:,}")
    else:
        report.lines.append(f"  [----] {text}: not checked at {n:,}, only {target_n:,}")


def rss_text(runs: Sequence[Timed]) -> str:
    top = statistics.median(t.top_rss_mb for t in runs)
    total = statistics.median(t.max_rss_mb for t in runs)
    return f"peak RSS {top:.0f} MB largest process, {total:.0f} MB summed"


def speed(args: argparse.Namespace, out: Path, report: Report) -> float:
    """Return the median peak RSS, summed over its processes, of the harvest with defaults."""
    print(
        f"speed: {args.n:,} requests, {args.runs} rounds of curl, plain.py, harvester "
        f"--workers 1, then harvester (defaults)",
        flush=True,
    )
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    curls: list[Timed] = []
    plains: list[Timed] = []
    ones: list[Timed] = []
    defaults: list[Timed] = []
    with nginx.serving(w.www, w.spec.port) as server:
        for i in range(args.runs):
            c, p, (one, d) = one_round(
                w,
                out,
                server.base_url,
                [[*args.harvest_args, "--workers", "1"], args.harvest_args],
            )
            curls.append(c)
            plains.append(p)
            ones.append(one)
            defaults.append(d)
            print(
                f"  round {i + 1}: curl {c.wall:6.2f} s  plain {p.wall:6.2f} s (cpu {p.cpu:5.1f})  "
                f"--workers 1 {one.wall:6.2f} s (cpu {one.cpu:5.1f}, {one.cpu / p.cpu:4.2f}x)  "
                f"defaults {d.wall:6.2f} s ({d.wall / p.wall:4.2f}x, cpu {d.cpu:5.1f})  "
                f"rss {one.top_rss_mb:4.0f}/{one.max_rss_mb:4.0f} and "
                f"{d.top_rss_mb:4.0f}/{d.max_rss_mb:4.0f} MB",
                flush=True,
            )
    per_k = 1000 / args.n
    cpu_ratio = statistics.median(h.cpu / p.cpu for h, p in zip(ones, plains, strict=True))
    wall_ratio = statistics.median(h.wall / p.wall for h, p in zip(defaults, plains, strict=True))
    curl_ratio = statistics.median(h.wall / c.wall for h, c in zip(defaults, curls, strict=True))
    mb = w.image_bytes_total / 1e6
    report.lines.append(
        f"speed: {args.n:,} requests, {w.images:,} images, {mb:,.0f} MB; medians of {args.runs} "
        "rounds"
    )
    report.lines.append(
        f"  curl                  wall {statistics.median(c.wall for c in curls):7.2f} s"
    )
    for name, runs in (
        ("plain.py", plains),
        ("harvester --workers 1", ones),
        ("harvester (defaults)", defaults),
    ):
        wall = statistics.median(t.wall for t in runs)
        cpu = statistics.median(t.cpu for t in runs)
        line = (
            f"  {name:<21} wall {wall:7.2f} s  CPU {cpu:7.1f} s "
            f"({cpu * per_k:.2f} CPU-s per 1,000 requests)"
        )
        report.lines.append(line if runs is plains else f"{line}  {rss_text(runs)}")
    report.lines.append(
        f"  harvester (defaults) / curl: wall {curl_ratio:.2f}x (shown, not checked)"
    )
    judged(
        report,
        cpu_ratio <= MAX_CPU_VS_PLAIN,
        f"CPU per result, harvester --workers 1 / plain.py {cpu_ratio:.2f}x "
        f"(target <= {MAX_CPU_VS_PLAIN}x)",
        n=args.n,
        target_n=TARGET_N,
    )
    judged(
        report,
        wall_ratio <= MAX_WALL_VS_PLAIN,
        f"wall, harvester (defaults) / plain.py {wall_ratio:.2f}x (target <= {MAX_WALL_VS_PLAIN}x)",
        n=args.n,
        target_n=TARGET_N,
    )
    top = max(statistics.median(t.top_rss_mb for t in runs) for runs in (ones, defaults))
    total = max(statistics.median(t.max_rss_mb for t in runs) for runs in (ones, defaults))
    judged(
        report,
        top <= MAX_RSS_MB and total <= MAX_RSS_SUM_MB,
        f"peak RSS of either harvest: largest process {top:.0f} MB, summed {total:.0f} MB "
        f"(target <= {MAX_RSS_MB:.0f} and {MAX_RSS_SUM_MB:.0f} MB)",
        n=args.n,
        target_n=TARGET_N,
    )
    return statistics.median(t.max_rss_mb for t in defaults)


def memory(args: argparse.Namespace, out: Path, report: Report, base_rss: float | None) -> None:
    n = args.n * 10
    print(f"memory: {n:,} requests with tiny images, one harvest", flush=True)
    w = build_world(out / f"world-{n}-tiny", n, 200)
    folder = clear_runs(out)
    with nginx.serving(w.www, w.spec.port) as server:
        h = harvest(
            w.csv,
            folder / "harvest",
            server.base_url,
            args.harvest_args,
            log=folder / "harvest.log",
        )
    print(
        f"  harvester {h.wall:.1f} s, cpu {h.cpu:.1f} s, rss {h.top_rss_mb:.0f} MB largest "
        f"process, {h.max_rss_mb:.0f} MB summed",
        flush=True,
    )
    report.lines.append(f"memory: {n:,} requests, {w.images:,} tiny images, harvester (defaults)")
    report.lines.append(
        f"  harvester {h.wall:.1f} s, CPU per 1,000 requests {h.cpu / n * 1000:.2f} s, "
        f"{rss_text([h])}"
    )
    if base_rss is None:
        report.lines.append("  (run the speed section to compare the peak RSS)")
        return
    growth = h.max_rss_mb / base_rss
    report.check(
        growth <= MAX_RSS_GROWTH,
        f"peak RSS summed {h.max_rss_mb:.0f} MB = {growth:.2f}x the {args.n:,}-request run's "
        f"(target <= {MAX_RSS_GROWTH}x)",
    )


def large(args: argparse.Namespace, out: Path, report: Report) -> None:
    """Real-sized images: the bytes, not the requests, decide. curl, plain.py and the harvester
    (defaults) in each round, each output deleted before the next contender starts."""
    n = args.large_n
    print(
        f"large: {n:,} requests with 1-4 images of ~{LARGE_IMAGE_BYTES / 1e6:g} MB, "
        f"{args.large_runs} rounds of curl, plain.py, then harvester (defaults)",
        flush=True,
    )
    w = build_world(out / f"world-{n}-large", n, LARGE_IMAGE_BYTES, formats=LARGE_FORMATS)
    mb = w.image_bytes_total / 1e6
    curls: list[Timed] = []
    plains: list[Timed] = []
    runs: list[Timed] = []
    with nginx.serving(w.www, w.spec.port) as server:
        for i in range(args.large_runs):
            c, p, (h,) = one_round(w, out, server.base_url, [args.harvest_args])
            curls.append(c)
            plains.append(p)
            runs.append(h)
            print(
                f"  round {i + 1}: curl {mb / c.wall:5.0f} MB/s  plain {mb / p.wall:5.0f} MB/s  "
                f"harvester {mb / h.wall:5.0f} MB/s ({p.wall / h.wall:4.2f}x plain)  "
                f"rss {h.top_rss_mb:4.0f}/{h.max_rss_mb:4.0f} MB",
                flush=True,
            )
    share = statistics.median(p.wall / h.wall for h, p in zip(runs, plains, strict=True))
    report.lines.append(
        f"large: {n:,} requests, {w.images:,} images of ~{LARGE_IMAGE_BYTES / 1e6:g} MB "
        f"({LARGE_FORMATS}), {mb:,.0f} MB; medians of {args.large_runs} rounds"
    )
    for name, timed_runs in (
        ("curl", curls),
        ("plain.py", plains),
        ("harvester (defaults)", runs),
    ):
        wall = statistics.median(t.wall for t in timed_runs)
        cpu = statistics.median(t.cpu for t in timed_runs)
        report.lines.append(
            f"  {name:<21} wall {wall:7.2f} s  {mb / wall:6.0f} MB/s  CPU {cpu:6.1f} s"
            + (f"  {rss_text(timed_runs)}" if timed_runs is runs else "")
        )
    judged(
        report,
        share >= MIN_LARGE_MBPS_VS_PLAIN,
        f"MB/s, harvester (defaults) / plain.py {share:.2f}x "
        f"(target >= {MIN_LARGE_MBPS_VS_PLAIN}x)",
        n=n,
        target_n=LARGE_TARGET_N,
    )


def s3(args: argparse.Namespace, out: Path, report: Report) -> None:
    """The speed world harvested into a folder, then into Ceph's S3 gateway on 127.0.0.1
    (tests/s3gateway.py starts it), one run each: wall and CPU side by side."""
    from tests import s3gateway

    print(f"s3: {args.n:,} requests into a folder, then into Ceph's S3 gateway", flush=True)
    if s3gateway.missing_binaries():
        raise SystemExit(f"bench: the s3 section needs {s3gateway.INSTALL_HINT}")
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    folder = clear_runs(out)
    device = max(1 << 30, 2 * w.image_bytes_total)
    with (
        nginx.serving(w.www, w.spec.port) as server,
        s3gateway.running_gateway(folder / "ceph", device_bytes=device) as gateway,
    ):
        gateway.create_bucket("bench")
        local = harvest(
            w.csv, folder / "harvest", server.base_url, args.harvest_args, log=folder / "local.log"
        )
        remote = harvest(
            w.csv,
            "s3://bench/night",
            server.base_url,
            args.harvest_args,
            log=folder / "s3.log",
            env_extra={**gateway.env(), "TMPDIR": str(folder)},
        )
    mb = w.image_bytes_total / 1e6
    report.lines.append(f"s3: {args.n:,} requests, {w.images:,} images, {mb:,.0f} MB; one run each")
    for name, t in (("folder", local), ("s3 (Ceph gateway)", remote)):
        report.lines.append(
            f"  {name:<18} wall {t.wall:7.2f} s  CPU {t.cpu:7.1f} s "
            f"({t.cpu / args.n * 1000:.2f} CPU-s per 1,000 requests)  "
            f"peak RSS {t.max_rss_mb:.0f} MB"
        )
    report.lines.append(f"  s3 / folder: wall {remote.wall / local.wall:.2f}x")


def slow(args: argparse.Namespace, out: Path, report: Report) -> None:
    ideal = SLOW_CONCURRENCY / SLOW_LATENCY
    n = int(ideal * args.slow_seconds)
    print(f"slow: {n:,} requests, every response delayed {SLOW_LATENCY * 1000:.0f} ms", flush=True)
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    csv = subset_csv(w, min(n, args.n), out / "slow.csv")
    access = out / "slow-access.log"
    access.unlink(missing_ok=True)
    extra = ["--concurrency", str(SLOW_CONCURRENCY), *args.slow_args]
    folder = clear_runs(out)
    with nginx.serving(w.www, w.spec.port, delay=SLOW_LATENCY, access_log=access) as server:
        h = harvest(csv, folder / "harvest", server.base_url, extra, log=folder / "harvest.log")
    starts = request_starts(access)
    rate = (len(starts) - 1) / max((starts[-1] - starts[0]) / 1000, 1e-9)
    share = rate / ideal
    print(f"  {len(starts):,} results in {h.wall:.1f} s: {rate:.0f} results/s", flush=True)
    report.lines.append(
        f"slow link: +{SLOW_LATENCY * 1000:.0f} ms per response, {len(starts):,} requests, "
        f"harvest {' '.join(extra)}"
    )
    report.check(
        share >= MIN_SLOW_SHARE,
        f"{rate:.0f} results/s = {share:.0%} of the ideal {ideal:.0f}/s "
        f"(target >= {MIN_SLOW_SHARE:.0%}; server clock, first to last result request)",
    )


def cluster(args: argparse.Namespace, out: Path, report: Report) -> None:
    """One Ray node, then two, each running one shard of the same concurrency, on the slow
    link: latency-bound work scales with the nodes, even on two cores."""
    ideal = CLUSTER_CONCURRENCY / SLOW_LATENCY  # one node's
    n = int(ideal * 2 * args.cluster_seconds)
    print(f"cluster: {n:,} requests on 1 then 2 Ray nodes, slow link", flush=True)
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    csv = subset_csv(w, min(n, args.n), out / "cluster.csv")
    rates: dict[int, float] = {}
    for nodes in (1, 2):
        access = out / f"cluster-{nodes}-access.log"
        access.unlink(missing_ok=True)
        folder = clear_runs(out)
        extra = [
            "--engine", "ray", "--workers", str(nodes), "--shared-fs", "--rps", "100000",
            "--concurrency", str(CLUSTER_CONCURRENCY * nodes),
        ]  # fmt: skip
        with (
            raynodes.ray_nodes(nodes) as address,
            nginx.serving(w.www, w.spec.port, delay=SLOW_LATENCY, access_log=access) as srv,
        ):
            h = harvest(
                csv,
                folder / "harvest",
                srv.base_url,
                [*extra, "--ray-address", address],
                log=folder / "harvest.log",
            )
        starts = request_starts(access)
        rates[nodes] = (len(starts) - 1) / max((starts[-1] - starts[0]) / 1000, 1e-9)
        print(f"  {nodes} node(s): {len(starts):,} results in {h.wall:.1f} s: "
              f"{rates[nodes]:.0f} results/s", flush=True)  # fmt: skip
    gain = rates[2] / rates[1]
    report.lines.append(
        f"cluster: +{SLOW_LATENCY * 1000:.0f} ms per response, {n:,} requests, one shard of "
        f"--concurrency {CLUSTER_CONCURRENCY} per Ray node"
    )
    report.check(
        gain >= MIN_CLUSTER_GAIN,
        f"2 nodes {rates[2]:.0f} results/s = {gain:.2f}x 1 node's {rates[1]:.0f}/s "
        f"(target >= {MIN_CLUSTER_GAIN}x; server clock)",
    )


def rps(args: argparse.Namespace, out: Path, report: Report) -> None:
    n = int(RPS * args.rps_seconds) + 1
    print(f"rps: {n:,} requests at --rps {RPS:.0f} (about {args.rps_seconds} s)", flush=True)
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    csv = subset_csv(w, min(n, args.n), out / "rps.csv")
    access = out / "rps-access.log"
    access.unlink(missing_ok=True)
    folder = clear_runs(out)
    with nginx.serving(w.www, w.spec.port, access_log=access) as server:
        harvest(
            csv,
            folder / "harvest",
            server.base_url,
            ["--rps", f"{RPS:g}"],
            log=folder / "harvest.log",
        )
    starts = request_starts(access)
    span = (starts[-1] - starts[0]) / 1000
    rate = (len(starts) - 1) / span
    worst = most_starts_in_window(starts, 1000)  # milliseconds
    print(
        f"  {len(starts):,} result requests over {span:.1f} s: {rate:.2f}/s, "
        f"at most {worst} in any 1 s window",
        flush=True,
    )
    report.lines.append(
        f"rate limit: --rps {RPS:g}, {len(starts):,} result requests over {span:.1f} s"
    )
    report.check(
        abs(rate - RPS) <= RPS * RPS_TOLERANCE,
        f"measured {rate:.2f}/s (target within {RPS_TOLERANCE:.0%} of {RPS:g})",
    )
    report.check(
        worst <= RPS, f"at most {worst} requests in any one-second window (target <= {RPS:g})"
    )


def rate_between(times: Sequence[float], start: float, end: float) -> float:
    """Events per second among ``times`` within ``[start, end)``."""
    return sum(1 for t in times if start <= t < end) / max(end - start, 1e-9)


def overload_csv(path: Path, prefix: str, n: int) -> Path:
    with open(path, "w") as fh:
        fh.write("model,request_id\n")
        fh.writelines(f"fal-ai/flux/dev,{prefix}-{i:06d}\n" for i in range(n))
    return path


def overload(args: argparse.Namespace, out: Path, report: Report) -> None:
    n = args.overload_n
    print(
        f"overload: {n:,} requests, {THROTTLE_SHARE:.0%} answer 429 {THROTTLE_TIMES} times, "
        f"{PENDING_SHARE:.0%} pending twice; --rps {RPS:g} --pending-wait {PENDING_WAIT}",
        flush=True,
    )
    config = SandboxConfig(
        key=KEY,
        image_bytes=5_000,
        throttle_share=THROTTLE_SHARE,
        throttle_times=THROTTLE_TIMES,
        faults=FaultRates(pending_then_done=PENDING_SHARE),
    )
    csv = overload_csv(out / "overload.csv", "night", n)
    folder = clear_runs(out)
    extra = ["--rps", f"{RPS:g}", "--pending-wait", str(PENDING_WAIT)]
    with running_sandbox(config) as sandbox:
        h = harvest(
            csv, folder / "throttled", sandbox.base_url, extra, log=folder / "h.log", check=False
        )
        arrived = sandbox.result_starts()
        served = sandbox.stats()
    # The rate while there was work for every slot: the first 90% of the result requests (the
    # rest are the last retries and re-polls, spaced by their own waits).
    bulk = arrived[: max(2, int(len(arrived) * 0.9))]
    rate = (len(bulk) - 1) / max(bulk[-1] - bulk[0], 1e-9)
    worst = most_starts_in_window(arrived)
    print(
        f"  {len(arrived):,} result requests in {h.wall:.1f} s, {served['rate_limited']:,} "
        f"answered 429; {rate:.1f}/s over the first 90%, exit {h.returncode}",
        flush=True,
    )
    report.lines.append(
        f"overload, steady 429s: {n:,} requests, {THROTTLE_SHARE:.0%} of ids 429 x"
        f"{THROTTLE_TIMES} (half Retry-After 1), {PENDING_SHARE:.0%} pending x2; harvest "
        f"{' '.join(extra)}; {len(arrived):,} result requests, {served['rate_limited']:,} 429s"
    )
    report.check(
        rate >= MIN_THROTTLED_SHARE_OF_RPS * RPS,
        f"{rate:.1f} result requests/s = {rate / RPS:.0%} of --rps {RPS:g} (target >= "
        f"{MIN_THROTTLED_SHARE_OF_RPS:.0%}; server clock, first 90% of requests)",
    )
    # Shown, not checked: the sandbox stamps arrivals from a Python event loop, whose stalls
    # bunch them up; the rps section checks the ceiling on nginx's clock.
    report.lines.append(f"  [info] at most {worst} in any one-second window of the sandbox's clock")
    report.check(
        h.returncode == 0,
        f"exit {h.returncode} (target 0: every pair ok, the "
        f"{served['pending_served'] // 2} pending twice included)",
    )

    x = MAX_RPS_X
    m = int(x * args.overload_seconds)
    print(f"overload: {m:,} requests at --rps {RPS:g}, the server accepts {x:g}/s", flush=True)
    csv = overload_csv(out / "overload-capped.csv", "capped", m)
    with running_sandbox(SandboxConfig(key=KEY, image_bytes=5_000, max_rps=x)) as sandbox:
        h = harvest(
            csv, folder / "capped", sandbox.base_url, ["--rps", f"{RPS:g}"], log=folder / "c.log"
        )
        arrived = sandbox.result_starts()
        accepted = sandbox.accepted_starts()
    start = accepted[0] + SETTLE_SECONDS
    end = accepted[int(len(accepted) * 0.9)]
    settled = rate_between(accepted, start, end)
    sent = rate_between(arrived, start, end)
    print(
        f"  {len(arrived):,} result requests in {h.wall:.1f} s; settled: {settled:.1f}/s "
        f"accepted, {sent:.1f}/s sent",
        flush=True,
    )
    report.lines.append(
        f"overload, capped: {m:,} requests, the server answers 429 above {x:g} accepted/s; "
        f"harvest --rps {RPS:g}; {len(arrived):,} result requests"
    )
    report.check(
        MIN_SETTLED_SHARE_OF_X * x <= settled <= x,
        f"settled at {settled:.1f} accepted/s = {settled / x:.2f}X (target "
        f"{MIN_SETTLED_SHARE_OF_X}X..X; server clock, from {SETTLE_SECONDS:g} s in to 90% of "
        f"the requests); {sent:.1f}/s sent = {sent / x:.2f}X",
    )


def serve(args: argparse.Namespace, out: Path, report: Report) -> None:
    n = args.serve_n
    print(
        f"serve: {n:,} deliveries of ~{SERVE_BODY_BYTES // 1000} KB from "
        f"{args.serve_concurrency} connections, inbox on the disk",
        flush=True,
    )
    w = build_world(out / f"world-{args.n}", args.n, 30_000)
    target = out / "serve-out"  # on the disk: fsync is what it costs there
    shutil.rmtree(target, ignore_errors=True)
    folder = clear_runs(out)
    try:
        with nginx.serving(w.www, w.spec.port) as server:
            r = deliveries.run(
                w,
                server.base_url,
                target,
                n=n,
                concurrency=args.serve_concurrency,
                body_bytes=SERVE_BODY_BYTES,
                extra=args.serve_args,
                log=folder / "serve.log",
                port=nginx.free_port(),
            )
    finally:
        shutil.rmtree(target, ignore_errors=True)
    sent = r.sent
    p50, p99 = sent.quantile(0.5), sent.quantile(0.99)
    start, tenth, middle, end = (r.rss.at(0), r.rss.at(n // 10), r.rss.at(n // 2), r.rss.at(n))
    print(
        f"  {sent.rate:.0f} deliveries/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"backlog {r.backlog:,} drained {r.drain:.1f} s later, "
        f"rss {start:.0f}/{tenth:.0f}/{middle:.0f}/{end:.0f} MB",
        flush=True,
    )
    tenths = " ".join(f"{r.rss.at(n * k // 10):.0f}" for k in range(11))
    print(f"  rss (MB) at each tenth of the deliveries: {tenths}", flush=True)
    report.lines.append(
        f"serve: {n:,} deliveries of ~{SERVE_BODY_BYTES // 1000} KB, {w.images / args.n:.2f} "
        f"images each, {args.serve_concurrency} connections, inbox on the disk; "
        f"serve {' '.join(args.serve_args) or 'defaults'}"
    )
    report.check(
        sent.rate >= MIN_SERVE_RATE,
        f"{sent.rate:.0f} deliveries/s acknowledged (target >= {MIN_SERVE_RATE:.0f}; "
        f"{sent.not_acknowledged:,} attempts answered otherwise, sent again)",
    )
    report.check(
        p99 < MAX_SERVE_P99,
        f"acknowledgement p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
        f"(target p99 < {MAX_SERVE_P99 * 1000:.0f} ms; the sender's clock)",
    )
    report.check(
        end <= MAX_RSS_GROWTH * tenth,
        f"RSS {start:.0f} MB at the start, {tenth:.0f} at 10%, {middle:.0f} at 50%, "
        f"{end:.0f} at the end (target end <= {MAX_RSS_GROWTH}x the 10% mark)",
    )
    report.check(
        r.rows_ok == n,
        f"backlog of {r.backlog:,} at the last acknowledgement drained {r.drain:.1f} s later: "
        f"{r.rows_ok:,} of "
        f"{n:,} deliveries are ok rows (target: all)",
    )
    report.check(
        r.returncode == 0 and r.stop <= SERVE_STOP_GRACE,
        f"SIGTERM: exit {r.returncode} after {r.stop:.1f} s (target 0 within "
        f"{SERVE_STOP_GRACE:g} s)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get
    parser.add_argument("--n", type=int, default=int(env("BENCH_N", "20000")))
    parser.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "5")))
    parser.add_argument("--out", type=Path, default=Path(env("BENCH_OUT", "bench-out")))
    parser.add_argument(
        "--only",
        default=env("BENCH_ONLY", "speed,memory,large,s3,slow,rps,overload,compact,cluster,serve"),
    )
    parser.add_argument("--serve-n", type=int, default=int(env("BENCH_SERVE_N", "100000")))
    parser.add_argument(
        "--serve-concurrency", type=int, default=int(env("BENCH_SERVE_CONCURRENCY", "32"))
    )
    parser.add_argument("--serve-args", default=env("BENCH_SERVE_ARGS", ""))
    parser.add_argument("--nights", type=int, default=int(env("BENCH_NIGHTS", "365")))
    parser.add_argument("--large-n", type=int, default=int(env("BENCH_LARGE_N", "1000")))
    parser.add_argument("--large-runs", type=int, default=int(env("BENCH_LARGE_RUNS", "3")))
    parser.add_argument(
        "--cluster-seconds", type=float, default=float(env("BENCH_CLUSTER_SECONDS", "15"))
    )
    parser.add_argument(
        "--slow-seconds", type=float, default=float(env("BENCH_SLOW_SECONDS", "20"))
    )
    parser.add_argument("--rps-seconds", type=float, default=float(env("BENCH_RPS_SECONDS", "60")))
    parser.add_argument("--overload-n", type=int, default=int(env("BENCH_OVERLOAD_N", "2000")))
    parser.add_argument(
        "--overload-seconds", type=float, default=float(env("BENCH_OVERLOAD_SECONDS", "30"))
    )
    parser.add_argument("--harvest-args", default="--rps 100000 --concurrency 64")
    parser.add_argument("--slow-args", default="--rps 100000")
    args = parser.parse_args()
    args.harvest_args = args.harvest_args.split()
    args.slow_args = args.slow_args.split()
    args.serve_args = args.serve_args.split()
    sections = set(args.only.split(","))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if sections - {"overload", "compact"}:
        nginx.require_nginx(echo=bool({"slow", "cluster"} & sections))

    report = Report(lines=[])
    with scratch(out):
        base_rss = speed(args, out, report) if "speed" in sections else None
        if "memory" in sections:
            memory(args, out, report, base_rss)
        if "large" in sections:
            large(args, out, report)
        if "s3" in sections:
            s3(args, out, report)
        if "slow" in sections:
            slow(args, out, report)
        if "rps" in sections:
            rps(args, out, report)
        if "overload" in sections:
            overload(args, out, report)
        if "compact" in sections:
            lines, met = compaction.run(
                clear_runs(out), n=args.n, nights=args.nights, runs=args.runs
            )
            report.lines.extend(lines[:1])
            report.check(met, "\n    ".join(lines[1:]) + f" (target <= {compaction.MAX_RATIO:g}x)")
        if "cluster" in sections:
            cluster(args, out, report)
        if "serve" in sections:
            serve(args, out, report)
    print(
        f"\n== bench: {os.cpu_count()} cores; {' '.join(sys.argv[1:]) or 'defaults'}; "
        f"harvester args {' '.join(args.harvest_args)} =="
    )
    print("\n".join(report.lines))
    print(
        f"== {'all targets met' if not report.failed else f'{report.failed} target(s) missed'} =="
    )
    sys.exit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
