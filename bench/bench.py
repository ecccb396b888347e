#!/usr/bin/env python3
"""Cascade benchmarks: Cascade against hand-written asyncio floors and installed peers.

    python bench/bench.py [--quick] [--only W1,W3] [--reps N] [--no-rss] [--json out.json]

Every workload runs Cascade and its floor (and Dask, when installed) in this process,
alternating them within each repetition, each measurement on a fresh event loop, and
keeps the best repetition. Peak RSS comes from one fresh child process per
(workload, implementation). `--quick` uses tiny sizes and is what the test suite runs.
Only the standard library is needed; peers (`pip install -r bench/requirements.txt`)
are imported inside the functions that use them. Exit status 1 means a workload raised.
"""
import argparse, asyncio, datetime, gc, json, os, platform, re, resource
import subprocess, sys, tempfile, threading, time, traceback
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # find cascade.py in the repo root from any cwd
perf = time.perf_counter
FULL = dict(n=10_000, chain=2_000, io_n=500, io_sleep=0.010, io_limit=50, reps=5,
            scale=(1_000, 10_000, 100_000), samples=200, ttl_samples=60, ttl=0.02, timeout=180)
QUICK = dict(n=200, chain=100, io_n=100, io_sleep=0.001, io_limit=10, reps=1,
             scale=(50, 100, 200), samples=10, ttl_samples=5, ttl=0.02, timeout=30)
SKIP_DASK = "skipped: pip install -r bench/requirements.txt"

# ---------------------------------------------------------------- task bodies
async def a_noop(i): return i
def s_noop(i): return i
async def a_add1(x): return x + 1
async def a_total(xs): return sum(xs)
def s_total(xs): return sum(xs)
async def a_io(i, d):
    await asyncio.sleep(d)
    return i
STAMPS = []  # perf_counter() at the start of each W6 probe body
async def a_probe(i): STAMPS.append(perf())

try:
    import cascade as cs
    noop, noop_sync = cs.task(name="noop")(a_noop), cs.task(name="noop_sync")(s_noop)
    add1, total, total_sync = cs.task(name="add1")(a_add1), cs.task(name="total")(a_total), cs.task(name="total_sync")(s_total)
    io, probe = cs.task(name="io")(a_io), cs.task(name="probe")(a_probe)
    CASCADE_ERROR = None
except Exception as exc:  # missing or broken: the floors and peers still run
    cs, CASCADE_ERROR = None, f"{type(exc).__name__}: {exc}"

def _need_cascade():
    if cs is not None:
        return
    if os.path.exists(os.path.join(ROOT, "cascade.py")):  # present but broken: a failure
        raise RuntimeError(f"cascade.py does not import or lacks the API: {CASCADE_ERROR}")
    raise ModuleNotFoundError("no cascade.py")  # not written yet: a note, not a failure

# ---------------------------------------------------------------- runners
# A runner takes (n, cfg), does one measurement on a fresh loop and returns seconds.
# Timed: building the work (graph / coroutines / dict) + running it to the result;
# engines, pools and loops are created outside the timed region.
def _loop_run(coro, cfg):
    return asyncio.run(asyncio.wait_for(coro, cfg["timeout"]))

async def _c_run(make_target, expect, engine=None, limit=None):
    _need_cascade()
    engine = engine or cs.Engine()
    if limit:
        engine.limit(*limit)
    try:
        t0 = perf()
        value = await engine.run(make_target())
        dt = perf() - t0
    finally:
        getattr(engine, "close", lambda: None)()  # its worker threads, untimed
    assert value == expect, f"cascade returned {value!r:.80}, expected {expect!r:.80}"
    return dt

def c_fanout(n, cfg):
    return _loop_run(_c_run(lambda: total([noop(i) for i in range(n)]), n * (n - 1) // 2), cfg)
def c_fanout_sync(n, cfg):
    return _loop_run(_c_run(lambda: total_sync([noop_sync(i) for i in range(n)]), n * (n - 1) // 2), cfg)
def c_map(n, cfg):
    return _loop_run(_c_run(lambda: noop.map(range(n)), list(range(n))), cfg)

def c_chain(n, cfg):
    def build():
        x = 0
        for _ in range(n):
            x = add1(x)
        return x
    return _loop_run(_c_run(build, n), cfg)

def c_io(n, cfg):
    d = cfg["io_sleep"]
    return _loop_run(_c_run(lambda: total([io(i, d) for i in range(n)]), n * (n - 1) // 2,
                            limit=("task:io", cfg["io_limit"])), cfg)

def c_telemetry(n, cfg):
    async def main():
        _need_cascade()
        broker, seen = cs.LocalBroker(), []
        engine = cs.Engine(connector=broker)
        await broker.subscribe("cascade/telemetry/#", lambda topic, payload: seen.append(topic))
        dt = await _c_run(lambda: total([noop(i) for i in range(n)]), n * (n - 1) // 2, engine)
        TELEMETRY_SEEN.append(len(seen))
        return dt
    return _loop_run(main(), cfg)
TELEMETRY_SEEN = []

async def _gather(n, reduce=True):
    t0 = perf()
    xs = await asyncio.gather(*[a_noop(i) for i in range(n)])
    if reduce:
        sum(xs)
    return perf() - t0

def f_gather(n, cfg): return _loop_run(_gather(n), cfg)
def f_gather_list(n, cfg): return _loop_run(_gather(n, reduce=False), cfg)

def f_chain(n, cfg):
    async def main():
        t0, x = perf(), 0
        for _ in range(n):
            x = await asyncio.create_task(a_add1(x))
        return perf() - t0
    return _loop_run(main(), cfg)

def f_executor(n, cfg):
    async def main():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(64) as pool:
            t0 = perf()
            xs = await asyncio.gather(*[loop.run_in_executor(pool, s_noop, i) for i in range(n)])
            await loop.run_in_executor(pool, s_total, xs)
            return perf() - t0
    return _loop_run(main(), cfg)

def f_semaphore(n, cfg):
    async def main():
        sem, d = asyncio.Semaphore(cfg["io_limit"]), cfg["io_sleep"]
        async def one(i):
            async with sem:
                return await a_io(i, d)
        t0 = perf()
        sum(await asyncio.gather(*[one(i) for i in range(n)]))
        return perf() - t0
    return _loop_run(main(), cfg)

def p_dask(n, cfg):
    import dask.threaded
    t0 = perf()
    dsk = {("noop", i): (s_noop, i) for i in range(n)}
    dsk["total"] = (s_total, [("noop", i) for i in range(n)])
    value = dask.threaded.get(dsk, "total", num_workers=64)
    dt = perf() - t0
    assert value == n * (n - 1) // 2
    return dt

RUNNERS = {f.__name__: f for f in (c_fanout, c_fanout_sync, c_map, c_chain, c_io, c_telemetry,
                                   f_gather, f_gather_list, f_chain, f_executor, f_semaphore, p_dask)}

def have_dask():
    try:
        import dask.threaded  # noqa: F401
        return True
    except ImportError:
        return False

# ---------------------------------------------------------------- measuring
def best_of(reps, impls, n, cfg, errors, gc_off=False):
    """Alternate the runners (reversing the order every other rep); best seconds each."""
    best = {name: None for name in impls}
    for rep in range(reps):
        for name in (impls if rep % 2 == 0 else impls[::-1]):
            if isinstance(best[name], str):
                continue  # already failed
            gc.collect()
            if gc_off:
                gc.disable()
            try:
                dt = RUNNERS[name](n, cfg)
                best[name] = dt if best[name] is None else min(best[name], dt)
            except Exception as exc:
                best[name] = _fail(name, exc, errors)
            finally:
                gc.enable()
    return best

def _fail(what, exc, errors):
    if isinstance(exc, ModuleNotFoundError):  # a missing cascade.py is a note, not a failure
        return "n/a (no cascade.py)"
    errors.append(what)
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {exc}"[:160]

def child_rss(name, n, args):
    """Peak RSS (MB) of a fresh process that imports this file and runs `name` once."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, str(n)] + (["--quick"] if args.quick else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        return None

def run_child(name, n, cfg):
    base = _maxrss_mb()
    seconds = RUNNERS[name](n, cfg)
    print(json.dumps({"runner": name, "n": n, "seconds": seconds, "baseline_mb": base, "peak_mb": _maxrss_mb()}))

def _maxrss_mb():
    # Linux: VmHWM, the high-water mark of this process image. ru_maxrss is not usable
    # here: across fork+exec it carries over the parent's peak (a big benchmark parent).
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # macOS reports bytes

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

# ---------------------------------------------------------------- W6: control latency
async def _until(flag, cfg):
    await asyncio.wait_for(flag.wait(), cfg["timeout"])
    await asyncio.sleep(0.001)  # let the loop go idle before the control call

async def c_latency(kind, samples, cfg):
    """Run one blocked probe per sample, release it, and time release -> body start."""
    _need_cascade()
    engine, blocked, lat = cs.Engine(), asyncio.Event(), []
    engine.subscribe(cs.TaskBlocked, lambda event: blocked.set())
    for i in range(samples):
        blocked.clear()
        if kind == "ttl":
            t0 = perf() + cfg["ttl"]
            engine.pause("task:probe", ttl=cfg["ttl"])
            await engine.run(probe(i))
        else:
            engine.limit("task:probe", 0) if kind == "limit" else engine.pause("task:probe")
            run = asyncio.ensure_future(engine.run(probe(i)))
            await _until(blocked, cfg)
            t0 = perf()
            engine.limit("task:probe", 1) if kind == "limit" else engine.resume("task:probe")
            await asyncio.wait_for(run, cfg["timeout"])
        lat.append(STAMPS[-1] - t0)
    return lat

def c_latency_thread(samples, cfg):
    """The run lives on engine.start()'s loop; this (main) thread resumes it."""
    _need_cascade()
    engine, blocked, lat = cs.Engine(), threading.Event(), []
    engine.subscribe(cs.TaskBlocked, lambda event: blocked.set())
    for i in range(samples):
        blocked.clear()
        engine.pause("task:probe")
        handle = engine.start(probe(i))
        if not blocked.wait(cfg["timeout"]):
            raise TimeoutError("no TaskBlocked event for a paused probe")
        time.sleep(0.001)
        t0 = perf()
        engine.resume("task:probe")
        handle.result(cfg["timeout"])
        lat.append(STAMPS[-1] - t0)
    return lat

async def f_latency(kind, samples, cfg):
    """Floor: asyncio.Event.set / Semaphore.release / call_later -> waiter start."""
    loop, lat = asyncio.get_running_loop(), []
    for _ in range(samples):
        gate = asyncio.Semaphore(0) if kind == "limit" else asyncio.Event()
        stamp = []
        async def waiter():
            await (gate.acquire() if kind == "limit" else gate.wait())
            stamp.append(perf())
        if kind == "ttl":
            t0 = perf() + cfg["ttl"]
            loop.call_later(cfg["ttl"], gate.set)
            await waiter()
        else:
            task = asyncio.ensure_future(waiter())
            await asyncio.sleep(0.001)
            t0 = perf()
            gate.release() if kind == "limit" else gate.set()
            await task
        lat.append(stamp[0] - t0)
    return lat

def f_latency_thread(samples, cfg):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    lat = []
    try:
        for _ in range(samples):
            gate, stamp = asyncio.Event(), []
            async def waiter():
                await gate.wait()
                stamp.append(perf())
            fut = asyncio.run_coroutine_threadsafe(waiter(), loop)
            time.sleep(0.001)
            t0 = perf()
            loop.call_soon_threadsafe(gate.set)
            fut.result(cfg["timeout"])
            lat.append(stamp[0] - t0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return lat

# ---------------------------------------------------------------- import time
def import_ms(reps):
    """Best-of-reps cumulative import time (ms) of asyncio alone, and of the `cascade`
    line when asyncio is already imported (= what `import cascade` adds on top).
    Bytecode is cached in a temp dir first (as after pip install), whatever
    PYTHONDONTWRITEBYTECODE says, so compiling cascade.py is not counted."""
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        def once(mod, code):
            code = f"import sys; sys.path.insert(0, {ROOT!r}); {code}"
            proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                                  capture_output=True, text=True, cwd=ROOT, env=env)
            hit = re.search(rf"^import time:\s+\d+ \|\s+(\d+) \| {mod}$", proc.stderr, re.M)
            if proc.returncode or not hit:
                raise RuntimeError(f"`import {mod}` failed: {proc.stderr.strip().splitlines()[-1:]}")
            return int(hit.group(1)) / 1000
        once("cascade", "import asyncio; import cascade")  # warm the bytecode cache
        return (min(once("cascade", "import asyncio; import cascade") for _ in range(reps)),
                min(once("asyncio", "import asyncio") for _ in range(reps)))

# ---------------------------------------------------------------- workloads -> table rows
def fmt_us(v, n):
    return v if isinstance(v, str) else "—" if v is None else f"{v / n * 1e6:.1f}"

def fmt_mb(rss, names):
    return " / ".join("—" if rss.get(k) is None else f"{rss[k]:.0f}" for k in names)

def verdict(value, limit, at_most=True):
    if not isinstance(value, float):
        return "—"
    return "yes" if (value <= limit if at_most else value >= limit) else "**no**"

def measure(n, names, cfg, args, errors, reps=None):
    best = best_of(reps or cfg["reps"], names, n, cfg, errors)
    rss = {k: child_rss(k, n, args) for k in names if args.rss and isinstance(best[k], float)}
    return best, rss

def ratio_row(label, n, best, rss, c, f, limit, floor_name):
    cv, fv = best[c], best[f]
    ratio = cv / fv if isinstance(cv, float) and isinstance(fv, float) else None
    return dict(workload=label, cascade=fmt_us(cv, n), floor=fmt_us(fv, n),
                ratio="—" if ratio is None else f"{ratio:.2f}×",
                target=f"≤ {limit}× {floor_name}" if limit else f"({floor_name})",
                met=verdict(ratio, limit) if limit else "—", rss=fmt_mb(rss, (c, f)),
                raw=dict(n=n, best=best, rss=rss))

def w1(cfg, args, errors):
    n = cfg["n"]
    best, rss = measure(n, ["c_fanout", "f_gather"], cfg, args, errors)
    rows = [ratio_row(f"W1 fan-out, async bodies (n={n:,})", n, best, rss, "c_fanout", "f_gather", 2.5, "gather")]
    peers = ["p_dask"] if have_dask() else []
    best, rss = measure(n, ["c_fanout_sync", "f_executor"] + peers, cfg, args, errors)
    rows.append(ratio_row(f"W1 fan-out, sync bodies (n={n:,})", n, best, rss,
                          "c_fanout_sync", "f_executor", 1.2, "run_in_executor"))
    if peers:
        rows.append(ratio_row(f"W1 fan-out, sync bodies vs Dask (n={n:,})", n, best, rss,
                              "c_fanout_sync", "p_dask", 0.7, "Dask threaded"))
    else:
        rows.append(dict(workload="W1 fan-out, sync bodies vs Dask", cascade="", floor=SKIP_DASK,
                         ratio="—", target="≤ 0.7× Dask threaded", met="—", rss=""))
    return rows

def w2(cfg, args, errors):
    n = cfg["chain"]
    best, rss = measure(n, ["c_chain", "f_chain"], cfg, args, errors)
    return [ratio_row(f"W2 chain (n={n:,})", n, best, rss, "c_chain", "f_chain", 3, "create_task loop")]

def w3(cfg, args, errors):
    n, ideal = cfg["io_n"], cfg["io_n"] * cfg["io_sleep"] / cfg["io_limit"]
    best, rss = measure(n, ["c_io", "f_semaphore"], cfg, args, errors)
    eff = {k: ideal / v if isinstance(v, float) else v for k, v in best.items()}
    cell = lambda k: eff[k] if isinstance(eff[k], str) else f"eff {eff[k]:.3f} ({best[k] * 1e3:.0f} ms)"
    ratio = eff["c_io"] / eff["f_semaphore"] if all(isinstance(v, float) for v in eff.values()) else None
    return [dict(workload=f"W3 limited I/O ({n} × {cfg['io_sleep'] * 1e3:g} ms, limit {cfg['io_limit']}, "
                          f"ideal {ideal * 1e3:.0f} ms)", cascade=cell("c_io"), floor=cell("f_semaphore"),
                 ratio="—" if ratio is None else f"{ratio:.3f}×", target="efficiency ≥ 0.97× Semaphore's",
                 met=verdict(ratio, 0.97, at_most=False), rss=fmt_mb(rss, ("c_io", "f_semaphore")),
                 raw=dict(n=n, best=best, efficiency=eff, rss=rss))]

def w4(cfg, args, errors):
    n = cfg["n"]
    best, rss = measure(n, ["c_map", "f_gather_list"], cfg, args, errors)
    return [ratio_row(f"W4 map (n={n:,})", n, best, rss, "c_map", "f_gather_list", 2.5, "gather")]

def w5(cfg, args, errors):
    rows, per, peak = [], {}, {}
    lo, hi = cfg["scale"][0], cfg["scale"][-1]
    for n in cfg["scale"]:
        reps = min(cfg["reps"], 3) if n >= 100_000 else cfg["reps"]
        best, rss = measure(n, ["c_fanout", "f_gather"], cfg, args, errors, reps)
        rows.append(ratio_row(f"W5 scale, async fan-out (n={n:,})", n, best, rss, "c_fanout", "f_gather", None, "gather"))
        per[n], peak = {k: v / n if isinstance(v, float) else None for k, v in best.items()}, rss
    # Diagnostic: the same two sizes with the cyclic GC off, to separate the engine's own
    # per-task cost from CPython's full collections, which grow with the live-object count.
    for n in (lo, hi):
        best = best_of(min(cfg["reps"], 3), ["c_fanout", "f_gather"], n, cfg, errors, gc_off=True)
        per[n, "nogc"] = {k: v / n if isinstance(v, float) else None for k, v in best.items()}
    def growth(k, gc_key=None):
        a, b = per[(lo, gc_key) if gc_key else lo][k], per[(hi, gc_key) if gc_key else hi][k]
        return (b / a, f"{b / a:.2f}× ({a * 1e6:.1f} → {b * 1e6:.1f} µs)") if a and b else (None, "—")
    for label, gk in (("", None), (", gc disabled (diagnostic)", "nogc")):
        c, f = growth("c_fanout", gk), growth("f_gather", gk)
        rows.append(dict(workload=f"W5 per-task growth, n={hi:,} vs {lo:,}{label}", cascade=c[1], floor=f[1],
                         ratio="—", target="cascade ≤ 1.5×" if not gk else "(info)",
                         met=verdict(c[0], 1.5) if not gk else "—", rss=""))
    c, f = peak.get("c_fanout"), peak.get("f_gather")
    mem = c / f if c and f else None
    rows.append(dict(workload=f"W5 peak RSS at n={hi:,}", cascade=f"{c:.0f} MB" if mem else "—",
                     floor=f"{f:.0f} MB" if mem else "—", ratio="—" if mem is None else f"{mem:.2f}×",
                     target="≤ 1.5× gather", met=verdict(mem, 1.5), rss="" if args.rss else "(no RSS run)"))
    return rows

def w6(cfg, args, errors):
    rows, s = [], cfg["samples"]
    cases = [("resume → start, same loop", lambda: asyncio.run(c_latency("pause", s, cfg)),
              lambda: asyncio.run(f_latency("pause", s, cfg)), "Event.set", 50, 0.5, "p50 < 0.5 ms"),
             ("resume → start, other thread", lambda: c_latency_thread(s, cfg),
              lambda: f_latency_thread(s, cfg), "call_soon_threadsafe", 50, 1.0, "p50 < 1 ms"),
             ("limit 0 → 1 → waiter start", lambda: asyncio.run(c_latency("limit", s, cfg)),
              lambda: asyncio.run(f_latency("limit", s, cfg)), "Semaphore.release", 50, 1.0, "p50 < 1 ms (spec §4.6)"),
             (f"TTL expiry error (ttl {cfg['ttl'] * 1e3:g} ms, n={cfg['ttl_samples']})",
              lambda: asyncio.run(c_latency("ttl", cfg["ttl_samples"], cfg)),
              lambda: asyncio.run(f_latency("ttl", cfg["ttl_samples"], cfg)), "call_later", 99, 20.0, "p99 ≤ 20 ms")]
    for label, cascade_fn, floor_fn, floor_name, q, limit_ms, target in cases:
        res = {}
        for name, fn in (("cascade", cascade_fn), ("floor", floor_fn)):
            try:
                lat = fn()
                res[name] = (pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, min(lat) * 1e3)
            except Exception as exc:
                res[name] = _fail(f"W6 {label} {name}", exc, errors)
        cell = lambda r: r if isinstance(r, str) else f"{r[0] * 1e3:.0f} / {r[1] * 1e3:.0f} µs"
        c, f = res["cascade"], res["floor"]
        ok = verdict(c[0 if q == 50 else 1], limit_ms) if isinstance(c, tuple) else "—"
        if isinstance(c, tuple) and c[2] < -1:  # a body that began before its control was lifted
            ok = f"**no** (started {-c[2]:.1f} ms early)"
        rows.append(dict(workload=f"W6 {label} (p50 / p99)", cascade=cell(c), floor=f"{cell(f)} ({floor_name})",
                         ratio=f"{c[0] / f[0]:.1f}× at p50" if isinstance(c, tuple) and isinstance(f, tuple) and f[0] > 0 else "—",
                         target=target, met=ok, rss="", raw=res))
    return rows

def w7(cfg, args, errors):
    n = cfg["n"]
    TELEMETRY_SEEN.clear()
    best, rss = measure(n, ["c_telemetry", "c_fanout"], cfg, args, errors)
    row = ratio_row(f"W7 W1 async + LocalBroker telemetry (n={n:,})", n, best, rss,
                    "c_telemetry", "c_fanout", 1.5, "W1 without telemetry")
    row["workload"] += f", {max(TELEMETRY_SEEN, default=0):,} messages"
    return [row]

def w8(cfg, args, errors):
    _need_cascade()
    extra, base = import_ms(1 if args.quick else 5)
    return [dict(workload="`import cascade` on top of `import asyncio` (-X importtime)", cascade=f"{extra:.1f} ms",
                 floor=f"{base:.1f} ms (asyncio itself)", ratio="—", target="≤ 15 ms", met=verdict(extra, 15.0), rss="")]

WORKLOADS = [("W1", w1), ("W2", w2), ("W3", w3), ("W4", w4), ("W5", w5), ("W6", w6), ("W7", w7), ("IMPORT", w8)]

def print_table(rows, args, cfg, seconds):
    version = getattr(cs, "__version__", "?") if cs else f"not importable ({CASCADE_ERROR})"
    print(f"Cascade {version} — {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, best of {cfg['reps']}"
          f"{', --quick (sizes too small for the targets)' if args.quick else ''}, {seconds:.0f} s\n")
    cols = ["workload", "cascade µs/task", "floor / peer µs/task", "ratio", "target", "met?", "peak RSS MB cascade / floor"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in ("workload", "cascade", "floor", "ratio", "target", "met", "rss")) + " |")
    print("\nTimed: building the work plus running it to its value — Cascade: graph build + `await engine.run()`; "
          "floors: creating the coroutines / futures + `asyncio.gather` (chain: the `create_task` loop); Dask: dict "
          "build + `dask.threaded.get(num_workers=64)` (its pool is cached between calls). Engines, thread pools and "
          "event loops are created untimed; each measurement gets a fresh loop; best of the repetitions, "
          "implementations alternated. W6 times control call → probe body start (perf_counter). Peak RSS: ru_maxrss "
          "of a fresh child process that runs the workload once (baseline includes the interpreter and imports).")
    if not have_dask():
        print(f"\nNote: Dask not installed — {SKIP_DASK}")
    if cs is None:
        print(f"\nNote: cascade.py is not importable from {ROOT} ({CASCADE_ERROR}); only floors and peers ran.")

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 rep, no RSS (the test suite's smoke run)")
    ap.add_argument("--only", help="comma-separated workloads: W1..W7, IMPORT")
    ap.add_argument("--reps", type=int, help="repetitions (best is kept)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--child", nargs=2, metavar=("RUNNER", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.child:
        return run_child(args.child[0], int(args.child[1]), cfg)
    cfg["reps"] = args.reps or cfg["reps"]
    args.rss = not (args.no_rss or args.quick)
    only = {w.strip().upper() for w in args.only.split(",")} if args.only else None
    rows, errors, t0 = [], [], perf()
    for key, fn in WORKLOADS:
        if only is None or key in only:
            try:
                rows += fn(cfg, args, errors)
            except Exception as exc:
                rows.append(dict(workload=key, cascade=_fail(key, exc, errors)))
    print_table(rows, args, cfg, perf() - t0)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(config=cfg, rows=rows, errors=errors), fh, indent=1, default=str)
    if errors:
        print(f"\nFAILED: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
