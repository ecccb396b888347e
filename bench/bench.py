#!/usr/bin/env python3
"""Cascade benchmarks: Cascade against hand-written asyncio floors and installed peers.

    python bench/bench.py [--quick] [--only W1,W3] [--reps N] [--no-rss] [--json out.json]

Each workload runs Cascade (through `cs.run_async`, as users call it), its floor and its
peers (a minimal graphlib+asyncio DAG runner written here, `run_graph`; Dask, when
installed) in this process, alternating them within each repetition, every measurement
on a fresh event loop, and keeps the best repetition. Peak RSS comes from one fresh child
process per (workload, implementation). W9 times `engine.status()` during a
1,000,000-item map running on `engine.start()`'s helper thread, and measures that map's
peak RSS. W11 runs a CPU-bound map on a 2-process pool and on a Dask LocalCluster (needs
dask[distributed]) against `pool.map` and `client.map`. `--quick` uses tiny sizes: it is
the test suite's smoke run. Standard library only; peers (`pip install -r
bench/requirements.txt`) are imported inside the functions that use them. Exit status 1
means a workload raised; a missed target is not an error (read the table).
"""
import argparse, asyncio, datetime, gc, graphlib, importlib.util, json, os, platform, re, resource
import subprocess, sys, tempfile, threading, time, traceback
from concurrent.futures import CancelledError, ProcessPoolExecutor, ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # cascade.py lives in the repo root; works from any cwd
perf = time.perf_counter
FULL = dict(n=10_000, chain=2_000, io_n=500, io_sleep=0.010, io_limit=50, reps=5,
            pipe_n=1_000, pipe_sleep=0.005, pipe_limit=50,
            scale=(1_000, 10_000, 100_000), samples=200, ttl_samples=60, ttl=0.02, timeout=180,
            big=1_000_000, big_limit=1_000, hold=0.1, status_samples=20, status_gap=0.1,
            names=2_000, storm_s=2.0, storm_topics=10, storm_rate=50_000, big_map=100_000, hogs=16, hog_samples=60, hog_ttl=0.05,
            burst=50_000,
            pool_n=200, pool_work=200_000, dask_n=40, dask_work=1_000_000, keys=10_000,
            shared_n=20_000, fleet=(20, 5, 8.0), cap_procs=4)
QUICK = dict(n=200, chain=100, io_n=100, io_sleep=0.001, io_limit=10, reps=1,
             pipe_n=100, pipe_sleep=0.001, pipe_limit=10,
             scale=(50, 100, 200), samples=10, ttl_samples=5, ttl=0.02, timeout=30,
             big=2_000, big_limit=1_000, hold=0.02, status_samples=5, status_gap=0.005,
             names=100, storm_s=0.2, storm_topics=3, storm_rate=25_000, big_map=2_000, hogs=4, hog_samples=5, hog_ttl=0.02,
             burst=2_000,
             pool_n=8, pool_work=1_000, dask_n=4, dask_work=1_000, keys=500, shared_n=200,
             fleet=(4, 2, 2.0), cap_procs=2)
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
def s_cpu(n):  # W11: CPU-bound work for a process pool or a Dask worker
    s = 0
    for i in range(n):
        s += i * i
    return s

try:  # the same plain functions, as Cascade tasks
    import cascade as cs
    noop, noop_sync, add1 = cs.task(name="noop")(a_noop), cs.task(name="noop_sync")(s_noop), cs.task(a_add1)
    total, total_sync = cs.task(name="total")(a_total), cs.task(name="total_sync")(s_total)
    io, probe = cs.task(name="io")(a_io), cs.task(name="probe")(a_probe)
    hold = cs.task(name="hold")(a_io)
    stage1, stage2 = cs.task(name="stage1")(a_io), cs.task(name="stage2")(a_io)
    cpu = cs.task(name="cpu")(s_cpu)  # (sent as s_cpu, which the workers find by name)
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
# A runner takes (n, cfg), does one measurement and returns seconds. Timed: building the
# work (graph / coroutines / dict) and running it to its value. Engines, pools and event
# loops are made outside the timed region; every runner gets a fresh loop (asyncio.run).
def _loop_run(coro, cfg):
    return asyncio.run(asyncio.wait_for(coro, cfg["timeout"]))

async def _c_run(make_target, expect, engine=None, limit=None):
    _need_cascade()
    engine = engine or cs.Engine()
    if limit:
        engine.limit(*limit)
    try:
        t0 = perf()  # cs.run_async, as users call it (its log subscriber included)
        value = await cs.run_async(make_target(), engine=engine, log_level="WARNING")
        dt = perf() - t0
    finally:
        getattr(engine, "close", lambda: None)()  # stop its worker threads, untimed
    assert value == expect, f"cascade returned {value!r:.80}, expected {expect!r:.80}"
    return dt

def c_fanout(n, cfg):
    return _loop_run(_c_run(lambda: total([noop(i) for i in range(n)]), n * (n - 1) // 2), cfg)

def c_fanout_sync(n, cfg):
    build = lambda: total_sync([noop_sync(i) for i in range(n)])
    return _loop_run(_c_run(build, n * (n - 1) // 2), cfg)

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
    build = lambda: total([io(i, cfg["io_sleep"]) for i in range(n)])
    return _loop_run(_c_run(build, n * (n - 1) // 2, limit=("task:io", cfg["io_limit"])), cfg)

def c_pipeline(n, cfg):  # W8: a map over a map, a limit per stage
    _need_cascade()
    d, engine = cfg["pipe_sleep"], cs.Engine()
    engine.limit("task:stage1", cfg["pipe_limit"])
    engine.limit("task:stage2", cfg["pipe_limit"])
    build = lambda: stage2.map(stage1.map(range(n), cs.unmapped(d)), cs.unmapped(d))
    return _loop_run(_c_run(build, list(range(n)), engine=engine), cfg)

TELEMETRY_SEEN = []  # messages the W7 subscriber received, per run

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

MQTT_PREFIX = f"bench-{os.getpid()}/cascade"  # the MQTT rows' own topics on a shared broker

def _c_map_mqtt(n, cfg, telemetry):
    """W4's map on an engine whose telemetry goes to Mosquitto (127.0.0.1:1883) through
    paho; the client, its connection and the engine's control subscription (a first,
    trivial run) are made outside the timed region, the flush of the telemetry is in it."""
    make = _mqtt_client_maker()
    if isinstance(make, str):
        raise ModuleNotFoundError(make)  # no broker or paho: the row says why
    client = make()

    async def main():
        engine = cs.Engine(connector=cs.MqttConnector(client, prefix=MQTT_PREFIX),
                           project="bench", telemetry=telemetry)
        await engine.run(noop(0))
        return await _c_run(lambda: noop.map(range(n)), list(range(n)), engine)
    try:
        return _loop_run(main(), cfg)
    finally:
        client.loop_stop()
        client.disconnect()

def c_map_mqtt(n, cfg): return _c_map_mqtt(n, cfg, "all")
def c_map_mqtt_counts(n, cfg): return _c_map_mqtt(n, cfg, "counts")

async def _gather(n, reduce=True):
    t0 = perf()
    xs = await asyncio.gather(*[a_noop(i) for i in range(n)])
    if reduce:
        sum(xs)
    return perf() - t0

def f_gather(n, cfg): return _loop_run(_gather(n), cfg)
def f_gather_list(n, cfg): return _loop_run(_gather(n, reduce=False), cfg)

async def _pipeline(n, d, limit):
    first, second = asyncio.Semaphore(limit), asyncio.Semaphore(limit)
    async def one(i):
        async with first:
            await a_io(i, d)
        async with second:
            return await a_io(i, d)
    return await asyncio.gather(*[one(i) for i in range(n)])

def f_pipeline(n, cfg):  # W8's floor: one coroutine per item through two semaphores
    t0 = perf()
    value = _loop_run(_pipeline(n, cfg["pipe_sleep"], cfg["pipe_limit"]), cfg)
    dt = perf() - t0
    assert value == list(range(n))
    return dt

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

# The peer to beat: a minimal DAG runner with no control plane, on graphlib + asyncio.
# graph = {key: (fn, args)}; an arg may be Ref(key), also inside lists and tuples. Each
# node starts as soon as its inputs are done: async bodies as tasks on the loop, sync
# bodies in `pool`. run_graph returns `target` (a Ref, or a structure of them) resolved.
class Ref:
    __slots__ = ("key",)
    def __init__(self, key): self.key = key

def _refs(v, out):
    if type(v) is Ref: out.append(v.key)
    elif type(v) in (list, tuple):
        for x in v: _refs(x, out)
    return out

def _val(v, results):
    if type(v) is Ref: return results[v.key]
    if type(v) in (list, tuple): return type(v)([_val(x, results) for x in v])
    return v

async def run_graph(graph, target, pool):
    loop, results, is_async = asyncio.get_running_loop(), {}, {}
    ts = graphlib.TopologicalSorter()
    for key, (fn, args) in graph.items():
        ts.add(key, *_refs(args, []))
    ts.prepare()
    finished = loop.create_future()

    def launch(keys):
        for key in keys:
            fn, args = graph[key]
            args = _val(args, results)
            if fn not in is_async:
                is_async[fn] = asyncio.iscoroutinefunction(fn)
            fut = loop.create_task(fn(*args)) if is_async[fn] else loop.run_in_executor(pool, fn, *args)
            fut.add_done_callback(lambda fut, key=key: settle(key, fut))

    def settle(key, fut):
        if finished.done():
            return
        error = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if error is not None:  # fail fast
            return finished.set_exception(error)
        results[key] = fut.result()
        ts.done(key)
        launch(ts.get_ready())
        if not ts.is_active():
            finished.set_result(_val(target, results))
    launch(ts.get_ready())
    if not ts.is_active():  # an empty graph
        finished.set_result(_val(target, results))
    return await finished

def _p_graphlib(build, expect, cfg):
    async def main():
        with ThreadPoolExecutor(64) as pool:  # made outside the timed region
            t0 = perf()
            value = await run_graph(*build(), pool)
            dt = perf() - t0
        assert value == expect, f"graphlib runner returned {value!r:.80}, expected {expect!r:.80}"
        return dt
    return _loop_run(main(), cfg)

def p_graphlib_fanout(n, cfg):
    def build():
        graph = {i: (a_noop, (i,)) for i in range(n)}
        graph["total"] = (a_total, ([Ref(i) for i in range(n)],))
        return graph, Ref("total")
    return _p_graphlib(build, n * (n - 1) // 2, cfg)

def p_graphlib_chain(n, cfg):
    build = lambda: ({k: (a_add1, (Ref(k - 1) if k else 0,)) for k in range(n)}, Ref(n - 1))
    return _p_graphlib(build, n, cfg)

def p_graphlib_map(n, cfg):
    build = lambda: ({i: (a_noop, (i,)) for i in range(n)}, [Ref(i) for i in range(n)])
    return _p_graphlib(build, list(range(n)), cfg)

def p_dask(n, cfg):
    import dask.threaded
    t0 = perf()
    dsk = {("noop", i): (s_noop, i) for i in range(n)}
    dsk["total"] = (s_total, [("noop", i) for i in range(n)])
    value = dask.threaded.get(dsk, "total", num_workers=64)  # 64 threads, like Engine's pool
    dt = perf() - t0
    assert value == n * (n - 1) // 2
    return dt

RUNNERS = {f.__name__: f for f in (c_fanout, c_fanout_sync, c_map, c_chain, c_io, c_telemetry,
                                   c_pipeline, f_pipeline,
                                   c_map_mqtt, c_map_mqtt_counts, f_gather,
                                   f_gather_list, f_chain, f_executor, f_semaphore, p_dask,
                                   p_graphlib_fanout, p_graphlib_chain, p_graphlib_map)}

def have_dask():
    return importlib.util.find_spec("dask") is not None

# ---------------------------------------------------------------- measuring
def best_of(reps, names, n, cfg, errors, gc_off=False):
    """Alternate the runners (order reversed every other rep); best seconds of each."""
    best = dict.fromkeys(names)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            if isinstance(best[name], str):
                continue  # it failed already
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
    if isinstance(exc, ModuleNotFoundError):  # no cascade.py yet (or no broker): a note
        return str(exc) if str(exc).startswith("skipped") else "n/a (no cascade.py)"
    errors.append(what)
    traceback.print_exc()
    return f"error: {type(exc).__name__}: {exc}"[:160]

BASELINE_MB = []  # RSS of the children before their workload (interpreter + imports)
CHILD = {}  # (runner, n) -> the child's report, or why it has none (a str)

def child_rss(name, n, args):
    """Peak RSS (MB) of a fresh process that imports this file and runs `name` once."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, str(n)]
    try:
        out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True,
                             text=True, timeout=300)
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        CHILD[name, n] = "timeout: no result after 300 s"
        return None
    except (IndexError, ValueError):
        CHILD[name, n] = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return None
    CHILD[name, n] = report
    BASELINE_MB.append(report["baseline_mb"])
    return report["peak_mb"]

def run_child(name, n, cfg):
    base = _peak_rss_mb()
    seconds = RUNNERS[name](n, cfg)
    print(json.dumps(dict(runner=name, n=n, seconds=seconds, baseline_mb=base, peak_mb=_peak_rss_mb())))

def _peak_rss_mb():
    # Linux: VmHWM, the high-water mark of this process image. Not ru_maxrss: across
    # fork + exec it keeps the parent's peak (here, a big benchmark process).
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # macOS: bytes

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

# ---------------------------------------------------------------- W6: control latency
async def c_latency(kind, samples, cfg):
    """One probe per sample, held by a pause / a limit of 0 / a pause with a ttl; times
    the control call (for ttl: the expiry) -> the probe's body starting."""
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
            await asyncio.wait_for(blocked.wait(), cfg["timeout"])
            await asyncio.sleep(0.001)  # let the loop go idle before the control call
            t0 = perf()
            engine.limit("task:probe", 1) if kind == "limit" else engine.resume("task:probe")
            await asyncio.wait_for(run, cfg["timeout"])
        lat.append(STAMPS[-1] - t0)
    return lat

def c_latency_thread(samples, cfg):
    """The run lives on engine.start()'s helper loop; this (main) thread resumes it."""
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
    """Floor: Event.set / Semaphore.release / call_later(ttl) -> the waiter running."""
    loop, lat = asyncio.get_running_loop(), []
    for _ in range(samples):
        gate, stamp = asyncio.Semaphore(0) if kind == "limit" else asyncio.Event(), []
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
    """Floor: call_soon_threadsafe(Event.set) from this thread into a loop thread."""
    loop, lat = asyncio.new_event_loop(), []
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for _ in range(samples):
            gate, stamp = [], []
            async def waiter():
                gate.append(asyncio.Event())  # made on its loop (Python 3.9 binds at creation)
                await gate[0].wait()
                stamp.append(perf())
            fut = asyncio.run_coroutine_threadsafe(waiter(), loop)
            while not gate:
                time.sleep(0.001)
            time.sleep(0.001)
            t0 = perf()
            loop.call_soon_threadsafe(gate[0].set)
            fut.result(cfg["timeout"])
            lat.append(stamp[0] - t0)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    return lat

# ---------------------------------------------------------------- W9: status() on a big map
def c_status(cfg):
    """engine.status() from this (main) thread while a map of cfg["big"] held bodies runs
    on engine.start()'s helper loop, under a limit (so most items wait). Sampled once the
    map has expanded; then the run is cancelled. Returns (seconds per call, seconds to
    expand, the last counts of the map, a note); bounded by cfg["timeout"] (+ the cancel)."""
    _need_cascade()
    n, engine, note = cfg["big"], cs.Engine(), ""
    engine.limit("task:hold", cfg["big_limit"])
    t0 = perf()
    deadline = t0 + cfg["timeout"]
    handle = engine.start(hold.map(range(n), cs.unmapped(cfg["hold"])))
    lat, counts = [], {}
    try:
        while not handle.done() and perf() < deadline:  # until the status shows the items
            counts = engine.status()["tasks"].get("hold", {})
            if sum(counts.values()) >= n:
                break
            time.sleep(0.05)
        expand = perf() - t0
        if not handle.done() and sum(counts.values()) < n:
            raise TimeoutError(f"timeout: status() showed {sum(counts.values()):,} of {n:,} "
                               f"items after {expand:.0f} s")
        for _ in range(cfg["status_samples"]):
            if perf() >= deadline:
                note = f", only {len(lat)} calls before the {cfg['timeout']} s timeout"
                break
            s0 = perf()
            st = engine.status()
            lat.append(perf() - s0)
            counts = st["tasks"].get("hold", counts)
            time.sleep(cfg["status_gap"])
    finally:
        handle.cancel()
        try:
            handle.result(min(60, cfg["timeout"]))  # quick: it may have finished: fine
        except CancelledError:
            pass
        except TimeoutError:
            note += f", the cancelled run had not settled after {min(60, cfg['timeout'])} s"
        engine.close()
    return lat, expand, counts, note

def w9(cfg, args, errors):
    rows, n = [], cfg["big"]
    # Peak RSS of the map run to its value (no limit, no-op bodies), the gather floor:
    # fresh child processes; in-process and timed only, without RSS (--quick, --no-rss).
    names, cells, mb = ("c_map", "f_gather_list"), {}, {}
    if args.rss:
        for k in names:
            mb[k] = child_rss(k, n, args)
            rep = CHILD.get((k, n))
            if isinstance(rep, dict):
                cells[k] = f"{mb[k]:.0f} MB ({rep['seconds'] / n * 1e6:.1f} µs/task)"
            else:
                cells[k] = f"failed: {rep}"[:160]
                if not str(rep).startswith("timeout") and "TimeoutError" not in str(rep):
                    errors.append(f"W9 peak RSS {k}")
    else:
        best = best_of(1, list(names), n, cfg, errors)
        cells = {k: f"{fmt_us(best[k], n)} µs/task" if isinstance(best[k], float) else best[k]
                 for k in names}
    c, f = mb.get("c_map"), mb.get("f_gather_list")
    # the status row, after the children: a run that did not settle must not slow them
    try:
        lat, expand, counts, note = c_status(cfg)
        p50, top = pct(lat, 50) * 1e3, max(lat) * 1e3
        state = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
        rows.append(dict(workload=f"W9 engine.status() from another thread, {n:,}-item async map "
                                  f"under limit {cfg['big_limit']:,} (p50 / max of {len(lat)} calls)",
                         cascade=f"{p50:.1f} / {top:.1f} ms",
                         floor=f"(map expanded in {expand:.1f} s; hold: {state}{note})",
                         target="max < 50 ms", met="yes" if top < 50 else "**no**",
                         raw=dict(n=n, ms=[x * 1e3 for x in lat], expand_s=expand, counts=counts)))
    except TimeoutError as exc:  # too slow is a miss, not an error
        rows.append(dict(workload=f"W9 engine.status() from another thread, {n:,}-item async map",
                         cascade=str(exc), target="max < 50 ms", met="**no**"))
    except Exception as exc:
        rows.append(dict(workload=f"W9 engine.status() from another thread, {n:,}-item async map",
                         cascade=_fail("W9 status", exc, errors), target="max < 50 ms", met="—"))
    rows.append(dict(workload=f"W9 peak RSS, {n:,}-item async map, no limit (floor: gather of "
                              f"{n:,} no-op coroutines)",
                     cascade=cells["c_map"], floor=cells["f_gather_list"],
                     ratio=f"{c / f:.2f}×" if c and f else "—", target="cascade ≤ 500 MB",
                     met=verdict(c, 500.0), rss=fmt_mb(mb, names) if args.rss else "(not run)",
                     raw=dict(n=n, rss=mb, children={k: CHILD.get((k, n)) for k in names})))
    return rows

# ---------------------------------------------------------------- W15: the live views
def c_views(cfg):
    """One refresh of the live views (`cascade top`, `cascade serve`), timed from this
    (main) thread every cfg["status_gap"] s while a map of cfg["big"] no-op bodies runs on
    engine.start()'s helper loop: the engine's record (_engine_record, its presence
    record), a _View taking it (feed) and drawing it (snapshot), and `cascade top`'s
    120x40 screen (_top_lines). Returns (seconds per refresh, seconds the run took, the
    last record's done/total, a note)."""
    _need_cascade()
    n, engine, note = cfg["big"], cs.Engine(), ""
    view, lat, last = cs._View(), [], (0, 0)
    topic = f"cascade/engines/default/default/{engine.id}"
    t0 = perf()
    handle = engine.start(noop.map(range(n)))
    try:
        while not handle.done() and perf() < t0 + cfg["timeout"]:
            s0 = perf()
            rec = cs._engine_record(engine, "bench", t0, 5.0, engine.constraints, 0)
            view.feed(topic, rec)
            lines = cs._top_lines(view.snapshot(), 120, 40, 0)
            lat.append(perf() - s0)
            runs = rec["runs"]
            last = (runs[0]["done"], runs[0]["total"]) if runs else last
            assert len(lines) == 40
            time.sleep(cfg["status_gap"])
        if not handle.done():
            note = f", the run had not ended after {cfg['timeout']} s"
            handle.cancel()
        try:
            handle.result(60)
        except CancelledError:
            pass
    finally:
        engine.close()
    return lat, perf() - t0, last, note

def w15(cfg, args, errors):
    n = cfg["big"]
    label = (f"W15 one refresh of the live views (record + view + `cascade top` screen) "
             f"during a {n:,}-item async map (p50 / max")
    try:
        lat, took, (done, total), note = c_views(cfg)
        p50, top = pct(lat, 50) * 1e3, max(lat) * 1e3
        return [dict(workload=f"{label} of {len(lat)} refreshes)",
                     cascade=f"{p50:.1f} / {top:.1f} ms",
                     floor=f"(the map ran {took:.1f} s; last refresh: {done:,} of {total:,} "
                           f"done{note})", target="max ≤ 100 ms",
                     met="yes" if top <= 100 else "**no**",
                     raw=dict(n=n, ms=[x * 1e3 for x in lat], seconds=took))]
    except Exception as exc:
        return [dict(workload=f"{label})", cascade=_fail("W15 views", exc, errors),
                     target="max ≤ 100 ms", met="—")]

# ---------------------------------------------------------------- W10: hardening
def c_names(n, cfg, limit=None):
    """cfg["names"] task names x 5 calls of an async no-op, one list; under a global limit
    of 4, every name waits in its own queue."""
    names = cfg["names"]
    tasks = [cs.task(name=f"n{k}")(a_noop) for k in range(names)]
    return _loop_run(_c_run(lambda: [t(i) for i in range(5) for t in tasks],
                            [i for i in range(5) for _ in tasks], limit=limit), cfg)

def c_names_limited(n, cfg):
    return c_names(n, cfg, ("global", 4))

RUNNERS.update(c_names=c_names, c_names_limited=c_names_limited)

# ---------------------------------------------------------------- W12: per-key limits
KEYED_LEFT = []  # per-key states an engine still holds after each W12 keyed run

def _c_keyed(n, cfg, keys, per, limit=2):
    """W4's async map, each item a customer of its own (n distinct key values): a task
    with keys (``keys``) or without, under limit(task, 2, per="customer") (``per``) or
    an ordinary limit(task, ``limit``)."""
    _need_cascade()
    t = cs.task(name="keyed", keys={"customer": "i"} if keys else None)(a_noop)
    engine = cs.Engine()
    engine.limit("task:keyed", 2 if per else limit, per="customer" if per else None)
    items = [f"c{i}" for i in range(n)]
    live = engine._cp._keyed  # (read after the run: _c_run closes the engine, untimed)
    dt = _loop_run(_c_run(lambda: t.map(items), items, engine=engine), cfg)
    if per:
        KEYED_LEFT.append(sum(len(st.live) for st in live))
    return dt

def c_keyed(n, cfg): return _c_keyed(n, cfg, True, True)
def c_keyed_room(n, cfg): return _c_keyed(n, cfg, True, False, limit=n)
def c_keyed_plain(n, cfg): return _c_keyed(n, cfg, True, False)
def c_unkeyed(n, cfg): return _c_keyed(n, cfg, False, False)

RUNNERS.update(c_keyed=c_keyed, c_keyed_room=c_keyed_room, c_keyed_plain=c_keyed_plain,
               c_unkeyed=c_unkeyed)

# ---------------------------------------------------------------- W14: stores
def _c_stored(n, cfg, run_id=None, cached=False, warm=False):
    """W4's async map on an engine with a fresh SqliteStore (in a temporary directory):
    checkpointed (``run_id``) or ``with_cache``; ``warm``: run it once untimed first, so
    the timed run takes every value from the store. The run's end waits for its writes."""
    _need_cascade()
    with tempfile.TemporaryDirectory() as d:
        engine = cs.Engine(store=cs.SqliteStore(os.path.join(d, "w14.db")))
        make = (lambda: noop.map(range(n)).with_cache()) if cached else (lambda: noop.map(range(n)))

        async def go():
            t0 = perf()
            value = await cs.run_async(make(), engine=engine, log_level="WARNING", run_id=run_id)
            dt = perf() - t0
            assert value == list(range(n))
            return dt
        try:
            if warm:
                _loop_run(go(), cfg)
            return _loop_run(go(), cfg)
        finally:
            engine.close()

def c_checkpointed(n, cfg): return _c_stored(n, cfg, run_id="w14")
def c_cache_miss(n, cfg): return _c_stored(n, cfg, cached=True)
def c_cache_hit(n, cfg): return _c_stored(n, cfg, cached=True, warm=True)
def c_checkpoint_rerun(n, cfg): return _c_stored(n, cfg, run_id="w14", warm=True)
RUNNERS.update(c_checkpointed=c_checkpointed, c_cache_miss=c_cache_miss,
               c_cache_hit=c_cache_hit, c_checkpoint_rerun=c_checkpoint_rerun)

# ------------------------------------------------------- W13: a shared rate (Redis)
SHARED_RATE, SHARED_BURST = "10000/s", 1_000

def _redis():
    """A client of the Redis on 127.0.0.1:6379, or ModuleNotFoundError (a note)."""
    try:
        import redis
    except ImportError:
        raise ModuleNotFoundError("skipped: pip install redis") from None
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception:
        raise ModuleNotFoundError("skipped: no Redis on 127.0.0.1:6379") from None
    return client

def _c_rate(n, cfg, shared):
    """W4's async map under rate_limit(task, 10000/s, burst 1000): one engine's start
    pace, shared (a bucket in Redis, through the engine's coordinator) or local."""
    _need_cascade()
    t = cs.task(name="rated")(a_noop)
    if shared:
        client, prefix = _redis(), f"cascade-bench:{os.getpid()}:{perf()}"
        engine = cs.Engine(coordinator=cs.RedisCoordinator(client, prefix=prefix))
    else:
        engine = cs.Engine()
    engine.rate_limit("task:rated", SHARED_RATE, burst=SHARED_BURST, shared=shared)
    items = list(range(n))
    try:
        return _loop_run(_c_run(lambda: t.map(items), items, engine=engine), cfg)
    finally:
        if shared:
            time.sleep(0.05)  # (its pump leaves the fleet, then its keys go)
            keys = list(client.scan_iter(f"{prefix}*"))
            if keys:
                client.delete(*keys)

def c_rate_shared(n, cfg): return _c_rate(n, cfg, True)
def c_rate_local(n, cfg): return _c_rate(n, cfg, False)

RUNNERS.update(c_rate_shared=c_rate_shared, c_rate_local=c_rate_local)

# A fleet of engine processes (W13): each builds its backlog (paused), waits for <prefix>:go,
# then resumes it; bodies
# log to Redis. mode "rate": a map under rate_limit(task:f, 100/s, shared) for `secs`,
# each start's time.time() pushed on <prefix>:starts; mode "idle": the same control, no
# work; mode "cap": a map of 0.2 s bodies under limit(task:f, 5, shared), each body's
# begin and end ("b|e <time> <pid>") pushed on <prefix>:log.
FLEET_CHILD = r"""
import asyncio, sys, time, redis
sys.path.insert(0, sys.argv[1])
import cascade as cs
prefix, mode, secs, lease = sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
FLEET_BURST = int(sys.argv[6])
r = redis.Redis(host="127.0.0.1", port=6379)
e = cs.Engine(coordinator=cs.RedisCoordinator(redis.Redis(host="127.0.0.1", port=6379,
                                                          socket_timeout=5),
                                              prefix=prefix, lease=lease))
if mode == "cap":
    e.limit("task:f", 5, shared=True)
else:
    e.rate_limit("task:f", "100/s", burst=FLEET_BURST, shared=True)

@cs.task(name="f")
def f(i):
    if mode == "cap":
        r.rpush(prefix + ":log", f"b {time.time()} {me}")
        time.sleep(0.2)
        r.rpush(prefix + ":log", f"e {time.time()} {me}")
    else:
        r.rpush(prefix + ":starts", time.time())

me = str(__import__("os").getpid())
if mode != "idle":
    # the backlog is built before the fleet starts, under a pause (building 100,000
    # units takes ~0.2 s of CPU: in 20 processes at once, 2 s of this 2-core host)
    e.pause("task:f")
    h = e.start(f.map(range(100_000)))
    while e.status()["tasks"].get("f", {}).get("blocked") != 100_000:
        time.sleep(0.02)
r.incr(prefix + ":ready")
while not r.get(prefix + ":go"):
    time.sleep(0.01)
if mode != "idle":
    e.resume("task:f")
print("running", flush=True)
time.sleep(secs)
"""

FLEET_BURSTS = (5, 1)  # the fleet rate's bursts measured (1: every start its own token)

def _fleet(n_busy, n_idle, mode, secs, lease=10.0, burst=1):
    """Start ``n_busy`` engine processes with work and ``n_idle`` without, on one fresh
    prefix; returns (client, prefix, procs, the go time). The caller stops them."""
    client = _redis()
    prefix = f"cascade-bench-fleet:{os.getpid()}:{perf()}"
    procs = [subprocess.Popen([sys.executable, "-c", FLEET_CHILD, ROOT, prefix,
                               mode if i < n_busy else "idle", str(secs), str(lease),
                               str(burst)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(n_busy + n_idle)]
    deadline = time.time() + 120
    while int(client.get(prefix + ":ready") or 0) < len(procs):
        if time.time() > deadline:
            raise TimeoutError("the fleet's engine processes did not start")
        time.sleep(0.05)
    go = time.time()
    client.set(prefix + ":go", 1)
    return client, prefix, procs, go

def _fleet_done(client, prefix, procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    keys = list(client.scan_iter(f"{prefix}*"))
    if keys:
        client.delete(*keys)

def fleet_rate(n_busy, n_idle, secs, burst):
    """Starts a second of the fleet in its steady part (after 1 s, until secs - 0.5), and
    the most by which any window's starts exceed burst + rate x its length."""
    client, prefix, procs, go = _fleet(n_busy, n_idle, "rate", secs, burst=burst)
    try:
        time.sleep(secs + 0.2)
        starts = sorted(float(x) for x in client.lrange(prefix + ":starts", 0, -1))
    finally:
        _fleet_done(client, prefix, procs)
    lo, hi = go + 1.0, go + secs - 0.5
    steady = [t for t in starts if lo <= t <= hi]
    over = max((j - i + 1 - (burst + 100 * (starts[j] - starts[i]))
                for i in range(len(starts)) for j in range(i, min(len(starts), i + 400))),
               default=0.0)
    return len(steady) / (hi - lo), over

def fleet_cap_kill(n, lease=2.0):
    """``n`` engine processes under a shared limit of 5, a backlog each; after 1.5 s one
    is SIGKILLed while its bodies hold permits. From the bodies' own log: the fleet's
    peak running count (the victim's bodies count until the kill), and the seconds from
    the kill until 5 ran again (its permits come back after the lease)."""
    client, prefix, procs, go = _fleet(n, 0, "cap", 30.0, lease=lease)
    try:
        time.sleep(1.5)
        victim = procs[0]
        victim.kill()
        killed = time.time()
        victim.wait()
        time.sleep(lease + 3.0)
        log = [line.split() for line in map(bytes.decode, client.lrange(prefix + ":log", 0, -1))]
    finally:
        _fleet_done(client, prefix, procs)
    dead = str(victim.pid)
    events = [(float(t), 1 if kind == "b" else -1, pid) for kind, t, pid in log]
    open_victim = sum(d for t, d, pid in events if pid == dead)
    events += [(killed, -1, dead)] * open_victim  # its bodies died with it
    running = peak = 0
    back = None
    for t, d, pid in sorted(events):
        running += d
        peak = max(peak, running)
        if back is None and t > killed and running >= 5:
            back = t - killed
    return peak, back

def c_storm(cfg):
    """Concurrency controls for cfg["storm_topics"] scopes from another thread
    through a LocalBroker, for cfg["storm_s"] s, while the engine's loop runs a task. Each
    message's limit is its number: ConstraintApplied says which one took effect and when.
    Returns (messages, seconds until the last of every topic was in force, apply
    latencies of the applied ones, applied count, the slowest engine.limit() call made on
    the loop meanwhile, whether the last message won everywhere)."""
    _need_cascade()
    broker = cs.LocalBroker()
    engine = cs.Engine(connector=broker)
    k, sent, lat, calls = cfg["storm_topics"], {}, [], []
    engine.subscribe(cs.ConstraintApplied, lambda ev: lat.append(
        perf() - sent[ev.constraint.params["limit"]])
        if ev.constraint.scope.startswith("task:storm") else None)
    stop, count = threading.Event(), [0]

    def storm():  # paced: cfg["storm_rate"] a second, in bursts of one millisecond's worth
        i, t0, rate = 0, perf(), cfg["storm_rate"]
        while not stop.is_set():
            due = int((perf() - t0) * rate)
            while i < due:
                i += 1
                sent[i] = perf()
                j = i % k
                broker.publish_nowait(f"cascade/constraints/task/storm{j}/concurrency",
                                      {"id": str(i), "scope": f"task:storm{j}",
                                       "type": "concurrency", "params": {"limit": i}})
            time.sleep(0.001)
        count[0] = i

    async def main():
        @cs.task(name="other")
        async def other():
            while not stop.is_set():  # the engine's loop has work meanwhile
                c0 = perf()
                engine.limit("task:mine", 3)
                calls.append(perf() - c0)
                await asyncio.sleep(0.001)
        run = asyncio.ensure_future(engine.run(other()))
        await asyncio.sleep(0.05)
        thread = threading.Thread(target=storm)
        t0 = perf()
        thread.start()
        await asyncio.sleep(cfg["storm_s"])
        stop.set()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        last = {f"task:storm{i % k}": i for i in range(max(1, count[0] - k + 1), count[0] + 1)}
        while perf() - t0 < cfg["timeout"]:
            now = {c.scope: c.params["limit"] for c in engine.constraints
                   if c.scope.startswith("task:storm")}
            if now == last:
                break
            await asyncio.sleep(0.001)
        done = perf() - t0
        await run
        return done, now == last
    try:
        done, won = asyncio.run(main())
    finally:
        engine.close()
    return count[0], done, lat, max(calls, default=0.0), won

def c_ttl_hogs(cfg):
    """TTL expiry lateness (the instant the control is removed, ConstraintRemoved, against
    its expires_at) while cfg["hogs"] CPU-bound sync bodies keep the GIL busy."""
    _need_cascade()
    engine, stop, late = cs.Engine(max_workers=cfg["hogs"] + 4), threading.Event(), []
    engine.subscribe(cs.ConstraintRemoved, lambda ev: late.append(
        time.time() - ev.constraint.expires_at))

    def burn(i):
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x += 1
        return i
    hogs = engine.start(cs.task(name="hog")(burn).map(range(cfg["hogs"])))
    try:
        time.sleep(0.2)
        for _ in range(cfg["hog_samples"]):
            seen = len(late)
            engine.pause("task:probe", ttl=cfg["hog_ttl"])
            end = perf() + cfg["timeout"]
            while len(late) == seen and perf() < end:
                time.sleep(0.005)
    finally:
        stop.set()
        hogs.result(cfg["timeout"])
        engine.close()
    return late

def _mqtt_client_maker():
    """A function making connected paho clients (network loop started) for Mosquitto on
    127.0.0.1:1883, or why the MQTT rows are skipped."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        return "skipped: pip install paho-mqtt"
    import socket as _socket, uuid as _uuid
    try:
        _socket.create_connection(("127.0.0.1", 1883), 1).close()
    except OSError:
        return "skipped: no MQTT broker on 127.0.0.1:1883"

    def client():
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"b-{_uuid.uuid4().hex[:8]}")
        c.connect("127.0.0.1", 1883)
        c.loop_start()
        return c
    return client

def c_control_under_telemetry(cfg):
    """Over a real Mosquitto (127.0.0.1:1883, paho): a cfg["big_map"]-item map under a
    limit makes a burst of BLOCKED telemetry on the engine's connection; a pause from
    another client 0.3 s into the run, then 4 more 50 ms apart. Returns the ms from each
    publish to its ConstraintApplied, or a reason string when no broker or paho."""
    client = _mqtt_client_maker()
    if isinstance(client, str):
        return client
    import json as _json, uuid as _uuid
    scope = f"task:bench{_uuid.uuid4().hex[:6]}"
    topic = f"{MQTT_PREFIX}/constraints/task/{scope[5:]}/pause"

    async def main():
        engine_client, pub = client(), client()
        engine = cs.Engine(connector=cs.MqttConnector(engine_client, prefix=MQTT_PREFIX))
        engine.limit("task:io", 10)
        applied, lat = [], []
        engine.subscribe(cs.ConstraintApplied, lambda ev: applied.append(perf())
                         if ev.constraint.scope == scope else None)
        run = asyncio.ensure_future(engine.run(
            cs.task(name="io")(a_io).map(range(cfg["big_map"]), cs.unmapped(0.01))))
        try:
            await asyncio.sleep(0.3)
            for k in range(5):
                seen, t0 = len(applied), perf()
                pub.publish(topic, _json.dumps({"id": f"p{k}", "scope": scope, "type": "pause",
                                                "params": {}}), qos=1)
                while len(applied) == seen and perf() - t0 < cfg["timeout"]:
                    await asyncio.sleep(0.0005)
                lat.append((applied[-1] - t0) * 1e3 if len(applied) > seen else float("inf"))
                await asyncio.sleep(0.05)
        finally:
            run.cancel()
            try:
                await run
            except BaseException:
                pass
            engine.close()
            for c in (engine_client, pub):
                c.loop_stop()
                c.disconnect()
        return lat
    return asyncio.run(main())

def c_mqtt_per_run(cfg):
    """ms per trivial run of an engine linked to a real Mosquitto through paho (its sync
    round trip and telemetry flush included), p50 of cfg["status_samples"] runs; or why
    it was skipped."""
    make = _mqtt_client_maker()
    if isinstance(make, str):
        return make
    client = make()

    async def main():
        engine = cs.Engine(connector=cs.MqttConnector(client, prefix=MQTT_PREFIX))
        task = cs.task(name="one")(a_noop)
        await engine.run(task(0))
        lat = []
        for i in range(cfg["status_samples"]):
            t0 = perf()
            await engine.run(task(i))
            lat.append((perf() - t0) * 1e3)
        engine.close()
        return lat
    try:
        return asyncio.run(main())
    finally:
        client.loop_stop()
        client.disconnect()

def c_telemetry_burst(cfg):
    """A cfg["burst"]-item map of trivial tasks on an engine linked to Mosquitto through
    paho, watched by a paho subscriber in this process and by `cascade watch --count`
    in another: (events sent, received by each, µs per task of the run); or why it was
    skipped."""
    make = _mqtt_client_maker()
    if isinstance(make, str):
        return make
    import json as _json
    n, project = cfg["burst"], f"burst{os.getpid()}"
    sent = 2 * n + 2  # ENGINE_STARTED, RUNNING and COMPLETED per item, ENGINE_STOPPED
    topic = f"{MQTT_PREFIX}/telemetry/default/{project}/+/events"
    got, stopped = [0], threading.Event()

    def on_message(client, userdata, m):
        events = _json.loads(m.payload).get("events", ())
        got[0] += len(events)
        if any(e.get("event") == "ENGINE_STOPPED" for e in events):
            stopped.set()
    sub, subscribed = make(), threading.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe(topic, 1)
    watch = subprocess.Popen([sys.executable, os.path.join(ROOT, "cascade.py"), "watch",
                              "--prefix", MQTT_PREFIX, "--project", project, "--count",
                              str(sent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    engine_client = make()
    try:
        assert subscribed.wait(10), "no SUBACK"
        assert "watching" in watch.stderr.readline(), "cascade watch did not start"

        async def main():
            engine = cs.Engine(connector=cs.MqttConnector(engine_client, prefix=MQTT_PREFIX),
                               project=project)
            t0 = perf()
            assert len(await engine.run(noop.map(range(n)))) == n
            dt = perf() - t0
            engine.close()
            return dt
        dt = asyncio.run(main())
        stopped.wait(cfg["timeout"])
        try:
            out, _ = watch.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # it did not get all: count what it printed
            watch.kill()
            out, _ = watch.communicate()
        return sent, got[0], len(out.splitlines()), dt / n * 1e6
    finally:
        watch.kill()
        for c in (sub, engine_client):
            c.loop_stop()
            c.disconnect()


# ---------------------------------------------------------------- W11: remote executors
# One 2-process pool (spawn) and one Dask LocalCluster (2 worker processes, 1 thread each),
# made once, outside the timed region, and shared by the repetitions.
REMOTE = {}

def remote_pool():
    if "pool" not in REMOTE:
        import multiprocessing
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(s_cpu, [1, 1]))  # its processes are up
        REMOTE["pool"] = pool
    return REMOTE["pool"]

def remote_dask():
    if "dask" not in REMOTE:
        import distributed
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=":0")
        client = distributed.Client(cluster)
        client.gather(client.map(s_cpu, [1, 1], pure=False))  # its workers are warm
        REMOTE["dask"] = (cluster, client)
    return REMOTE["dask"][1]

def close_remote():
    pool = REMOTE.pop("pool", None)
    if pool is not None:
        pool.shutdown()
    dask = REMOTE.pop("dask", None)
    if dask is not None:
        dask[1].close()
        dask[0].close()

def _c_remote(ex, n, work, cfg, window=None):
    expect = [s_cpu(work)] * n
    # window None: the executor's slots, the default (the pool's 2 workers + 1; Dask: 4)
    engine = cs.Engine(executor=ex, window=window) if cs is not None else None
    return _loop_run(_c_run(lambda: cpu.map([work] * n), expect, engine), cfg)

def c_pool_map(n, cfg):
    return _c_remote(remote_pool(), n, cfg["pool_work"], cfg)

def f_pool_map(n, cfg):
    pool, work = remote_pool(), cfg["pool_work"]
    t0 = perf()
    value = list(pool.map(s_cpu, [work] * n))
    dt = perf() - t0
    assert value == [s_cpu(work)] * n
    return dt

def c_dask_map(n, cfg):
    return _c_remote(remote_dask(), n, cfg["dask_work"], cfg)

def c_dask_map_w2(n, cfg):  # its threads alone: nothing queued at the workers
    return _c_remote(remote_dask(), n, cfg["dask_work"], cfg, window=2)

def f_dask_map(n, cfg):
    client, work = remote_dask(), cfg["dask_work"]
    t0 = perf()
    value = client.gather(client.map(s_cpu, [work] * n, pure=False))  # every call runs
    dt = perf() - t0
    assert value == [s_cpu(work)] * n
    return dt

RUNNERS.update(c_pool_map=c_pool_map, f_pool_map=f_pool_map, c_dask_map=c_dask_map,
               c_dask_map_w2=c_dask_map_w2, f_dask_map=f_dask_map)

def have_distributed():
    return have_distributed_on_this_python() and importlib.util.find_spec("distributed") is not None

def have_distributed_on_this_python():
    # distributed's scheduler and workers hook gc.callbacks at start, which PyPy has not
    return hasattr(gc, "callbacks")

# PyPy 7.3.11's ProcessPoolExecutor.submit() calls a method its process.py renamed: a pool
# of any start method but fork fails on its first submit (pypy/pypy#3873)
POOL_SUBMIT_BROKEN = not hasattr(ProcessPoolExecutor, "_adjust_process_count")

def w11(cfg, args, errors):
    rows = []
    try:
        n = cfg["pool_n"]
        if POOL_SUBMIT_BROKEN:
            rows.append(dict(workload=f"W11 CPU-bound map on a 2-process pool (n={n:,})",
                             cascade=f"n/a on {platform.python_implementation()} "
                             f"{platform.python_version()}: its ProcessPoolExecutor.submit() "
                             "fails with a spawn context (pypy/pypy#3873)"))
        else:
            best = best_of(cfg["reps"], ["c_pool_map", "f_pool_map"], n, cfg, errors)
            rows.append(ratio_row(
                f"W11 CPU-bound map on a 2-process pool (n={n:,}, {_each(best, 'f_pool_map', n)}), "
                "default window (3: workers + 1)", n, best, {}, "c_pool_map", "f_pool_map", 1.15,
                "ProcessPoolExecutor.map"))
        if have_distributed():
            n = cfg["dask_n"]
            best = best_of(cfg["reps"], ["c_dask_map", "c_dask_map_w2", "f_dask_map"], n, cfg, errors)
            label = (f"W11 CPU-bound map on a Dask LocalCluster, 2 workers × 1 thread (n={n:,}, "
                     f"{_each(best, 'f_dask_map', n)})")
            rows.append(ratio_row(f"{label}, default window (4: threads + 1 per worker)", n, best,
                                  {}, "c_dask_map", "f_dask_map", 1.15, "client.map"))
            rows.append(ratio_row(f"{label}, window=2 (its threads alone)", n, best, {},
                                  "c_dask_map_w2", "f_dask_map", None, "client.map"))
        elif have_distributed_on_this_python() is False:
            rows.append(dict(workload="W11 CPU-bound map on a Dask LocalCluster",
                             cascade=f"n/a on {platform.python_implementation()}: Dask's "
                             "scheduler needs gc.callbacks", target="≤ 1.15× client.map", met="—"))
        else:
            rows.append(dict(workload="W11 CPU-bound map on a Dask LocalCluster", floor=SKIP_DASK,
                             target="≤ 1.15× client.map", met="—"))
    finally:
        close_remote()
    for r in rows:
        r["rss"] = "(not run)" if "raw" in r else ""
    return rows

def _each(best, floor, n):
    # a body's time on one of the 2 workers, from the floor's run: it is what ran
    v = best.get(floor)
    return f"≈{2 * v / n * 1e3:.0f} ms each" if isinstance(v, float) else "CPU-bound bodies"

def w10(cfg, args, errors):
    rows, names = [], cfg["names"]
    best, rss = measure(names * 5, ["c_names_limited", "c_names"], cfg, args, errors)
    rows.append(ratio_row(f"W10 admission, {names:,} task names × 5 calls under one global "
                          f"limit of 4 (n={names * 5:,})", names * 5, best, rss,
                          "c_names_limited", "c_names", 3.0, "unlimited"))
    label = (f"W10 control storm: {cfg['storm_rate']:,} concurrency controls a second for "
             f"{cfg['storm_topics']} scopes through LocalBroker from a thread, "
             f"{cfg['storm_s']:g} s")
    try:
        n, done, lat, slowest, won = c_storm(cfg)
        rate, p99 = n / done, pct(lat, 99) * 1e3
        ok = rate >= 20_000 and p99 <= 10 and won
        rows.append(dict(workload=label, cascade=f"{rate:,.0f} msgs/s, apply p50 / p99 "
                                                 f"{pct(lat, 50) * 1e3:.2f} / {p99:.2f} ms",
                         floor=f"({n:,} sent, {len(lat):,} applied, last wins: "
                               f"{'yes' if won else 'NO'}; slowest engine.limit() on the "
                               f"loop meanwhile {slowest * 1e3:.1f} ms)",
                         target="≥ 20,000 msgs/s, p99 apply ≤ 10 ms, last wins",
                         met="yes" if ok else "**no**",
                         raw=dict(sent=n, seconds=done, applied=len(lat), won=won,
                                  slowest_call=slowest)))
    except Exception as exc:
        rows.append(dict(workload=label, cascade=_fail("W10 storm", exc, errors)))
    def over_mqtt(label, measure, what, make):
        """A row of a measurement over a real broker: ``make(result)`` gives its fields;
        a str result (why it was skipped) is shown as it is, an error as _fail's."""
        try:
            res = measure(cfg)
            rows.append(dict(workload=label, **({"cascade": res} if isinstance(res, str)
                                                 else make(res))))
        except Exception as exc:
            rows.append(dict(workload=label, cascade=_fail(what, exc, errors)))

    over_mqtt(f"W10 a pause over MQTT while a {cfg['big_map']:,}-item map under a limit sends "
              "its BLOCKED telemetry (publish → applied; first at 0.3 s, then 4 more)",
              c_control_under_telemetry, "W10 MQTT control", lambda lat: dict(
                  cascade=" / ".join(f"{x:.0f}" for x in lat) + " ms",
                  floor="(0.1: 5.2 s for the first; QoS 0 telemetry: 1 s)",
                  target="first ≤ 500 ms (the map is still expanding), then ≤ 50 ms",
                  met="yes" if lat[0] <= 500 and max(lat[1:]) <= 50 else "**no**",
                  raw=dict(ms=lat)))
    over_mqtt("W10 one trivial run of an engine linked to Mosquitto through paho (p50 / max)",
              c_mqtt_per_run, "W10 MQTT per run", lambda lat: dict(
                  cascade=f"{pct(lat, 50):.1f} / {max(lat):.1f} ms",
                  floor="(0.1: about 88 ms on a system where Nagle's algorithm bit)",
                  target="≤ 3 ms", met=verdict(pct(lat, 50), 3.0), raw=dict(ms=lat)))
    n = cfg["n"]
    best, rss = measure(n, ["c_map_mqtt", "c_map", "c_map_mqtt_counts"], cfg, args, errors)
    rows.append(ratio_row(f"W10 telemetry over Mosquitto (paho): W4's map (n={n:,}), "
                          "telemetry all / none", n, best, rss, "c_map_mqtt", "c_map", 2.0,
                          "W4 without telemetry"))
    rows.append(ratio_row(f"W10 telemetry over Mosquitto (paho): W4's map (n={n:,}), "
                          "telemetry=\"counts\" / none", n, best, rss, "c_map_mqtt_counts",
                          "c_map", None, "W4 without telemetry"))

    def burst(res):
        sent, paho, watched, us = res
        return dict(cascade=f"{paho / sent:.1%} / {watched / sent:.1%}",
                    floor=f"({sent:,} events sent; the run {us:.1f} µs/task; unbatched "
                          "(issue 10): 66% reached a watch)",
                    target="≥ 99% each", met=verdict(min(paho, watched) / sent, 0.99,
                                                      at_most=False),
                    raw=dict(sent=sent, paho=paho, watch=watched, us_per_task=us))
    over_mqtt(f"W10 telemetry burst over Mosquitto: a {cfg['burst']:,}-item map's events "
              "delivered (paho subscriber / `cascade watch --count`)", c_telemetry_burst,
              "W10 MQTT burst", burst)
    label = (f"W10 TTL expiry lateness with {cfg['hogs']} CPU-bound sync bodies (ttl "
             f"{cfg['hog_ttl'] * 1e3:g} ms, n={cfg['hog_samples']}, p50 / p99)")
    try:
        late = c_ttl_hogs(cfg)
        p50, p99 = pct(late, 50) * 1e3, pct(late, 99) * 1e3
        rows.append(dict(workload=label, cascade=f"{p50:.1f} / {p99:.1f} ms",
                         floor=f"(max {max(late) * 1e3:.1f} ms)", target="p99 ≤ 50 ms",
                         met=verdict(p99, 50.0), raw=dict(ms=[x * 1e3 for x in late])))
    except Exception as exc:
        rows.append(dict(workload=label, cascade=_fail("W10 TTL", exc, errors)))
    return rows

# ---------------------------------------------------------------- import time
def import_ms(reps):
    """Best-of-reps cumulative `-X importtime` of asyncio alone, and of the `cascade` line
    when asyncio is already imported (= what `import cascade` adds). Bytecode is cached
    in a temp dir first, as after pip install, even under PYTHONDONTWRITEBYTECODE."""
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
        once("cascade", "import asyncio; import cascade")  # fills the bytecode cache
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
    best, rss = measure(n, ["c_fanout", "f_gather", "p_graphlib_fanout"], cfg, args, errors)
    rows = [ratio_row(f"W1 fan-out, async bodies (n={n:,})", n, best, rss,
                      "c_fanout", "f_gather", 2.5, "gather"),
            ratio_row(f"W1 fan-out, async bodies vs graphlib+asyncio runner (n={n:,})", n, best,
                      rss, "c_fanout", "p_graphlib_fanout", 1.0, "graphlib runner")]
    peers = ["p_dask"] if have_dask() else []
    best, rss = measure(n, ["c_fanout_sync", "f_executor"] + peers, cfg, args, errors)
    rows.append(ratio_row(f"W1 fan-out, sync bodies (n={n:,})", n, best, rss,
                          "c_fanout_sync", "f_executor", 1.2, "run_in_executor"))
    if peers:
        rows.append(ratio_row(f"W1 fan-out, sync bodies vs Dask (n={n:,})", n, best, rss,
                              "c_fanout_sync", "p_dask", 0.7, "Dask threaded"))
    else:
        rows.append(dict(workload="W1 fan-out, sync bodies vs Dask", floor=SKIP_DASK,
                         target="≤ 0.7× Dask threaded", met="—"))
    return rows

def w2(cfg, args, errors):
    n = cfg["chain"]
    best, rss = measure(n, ["c_chain", "f_chain", "p_graphlib_chain"], cfg, args, errors)
    return [ratio_row(f"W2 chain (n={n:,})", n, best, rss, "c_chain", "f_chain", 3, "create_task loop"),
            ratio_row(f"W2 chain vs graphlib+asyncio runner (n={n:,})", n, best, rss,
                      "c_chain", "p_graphlib_chain", 1.0, "graphlib runner")]

def w3(cfg, args, errors):
    n, ideal = cfg["io_n"], cfg["io_n"] * cfg["io_sleep"] / cfg["io_limit"]
    best, rss = measure(n, ["c_io", "f_semaphore"], cfg, args, errors)
    eff = {k: ideal / v if isinstance(v, float) else v for k, v in best.items()}
    cell = lambda k: eff[k] if isinstance(eff[k], str) else f"eff {eff[k]:.3f} ({best[k] * 1e3:.0f} ms)"
    ratio = eff["c_io"] / eff["f_semaphore"] if all(isinstance(v, float) for v in eff.values()) else None
    label = (f"W3 limited I/O ({n} × {cfg['io_sleep'] * 1e3:g} ms, limit {cfg['io_limit']}, "
             f"ideal {ideal * 1e3:.0f} ms)")
    return [dict(workload=label, cascade=cell("c_io"), floor=cell("f_semaphore"),
                 ratio="—" if ratio is None else f"{ratio:.3f}×", target="efficiency ≥ 0.97× Semaphore's",
                 met=verdict(ratio, 0.97, at_most=False), rss=fmt_mb(rss, ("c_io", "f_semaphore")),
                 raw=dict(n=n, best=best, efficiency=eff, rss=rss))]

def w4(cfg, args, errors):
    n = cfg["n"]
    best, rss = measure(n, ["c_map", "f_gather_list", "p_graphlib_map"], cfg, args, errors)
    return [ratio_row(f"W4 map (n={n:,})", n, best, rss, "c_map", "f_gather_list", 2.5, "gather"),
            ratio_row(f"W4 map vs graphlib+asyncio runner (n={n:,})", n, best, rss,
                      "c_map", "p_graphlib_map", 1.0, "graphlib runner")]

def w5(cfg, args, errors):
    rows, per, peak = [], {}, {}
    lo, hi = cfg["scale"][0], cfg["scale"][-1]
    per_task = lambda best, n: {k: v / n if isinstance(v, float) else None for k, v in best.items()}
    for n in cfg["scale"]:
        reps = min(cfg["reps"], 3) if n >= 100_000 else cfg["reps"]
        best, peak = measure(n, ["c_fanout", "f_gather"], cfg, args, errors, reps)
        rows.append(ratio_row(f"W5 scale, async fan-out (n={n:,})", n, best, peak,
                              "c_fanout", "f_gather", None, "gather"))
        per[n] = per_task(best, n)
    # Diagnostic: both ends again with the cyclic GC off, to separate the engine's own
    # per-task cost from CPython's full collections, which grow with the live objects.
    for n in (lo, hi):
        per[n, "no gc"] = per_task(best_of(min(cfg["reps"], 3), ["c_fanout", "f_gather"],
                                           n, cfg, errors, gc_off=True), n)
    for suffix in ("", "no gc"):
        cells = {}
        for k in ("c_fanout", "f_gather"):
            a, b = per[(lo, suffix) if suffix else lo][k], per[(hi, suffix) if suffix else hi][k]
            cells[k] = (b / a, f"{b / a:.2f}× ({a * 1e6:.1f} → {b * 1e6:.1f} µs)") if a and b else (None, "—")
        rows.append(dict(workload=f"W5 per-task growth, n={hi:,} vs {lo:,}"
                                  + (", GC disabled (diagnostic)" if suffix else ""),
                         cascade=cells["c_fanout"][1], floor=cells["f_gather"][1],
                         target="(info)" if suffix else "cascade ≤ 1.5×",
                         met="—" if suffix else verdict(cells["c_fanout"][0], 1.5)))
    c, f = peak.get("c_fanout"), peak.get("f_gather")
    mem = c / f if c and f else None
    rows.append(dict(workload=f"W5 peak RSS at n={hi:,}", cascade=f"{c:.0f} MB" if mem else "—",
                     floor=f"{f:.0f} MB" if mem else "—", ratio="—" if mem is None else f"{mem:.2f}×",
                     target="≤ 1.5× gather", met=verdict(mem, 1.5), rss="" if args.rss else "(not run)"))
    return rows

def w6(cfg, args, errors):
    rows, s, ts = [], cfg["samples"], cfg["ttl_samples"]
    cases = [  # label, cascade, floor, floor name, percentile judged, limit (ms), target
        ("resume → start, same loop", lambda: asyncio.run(c_latency("pause", s, cfg)),
         lambda: asyncio.run(f_latency("pause", s, cfg)), "Event.set", 50, 0.5, "p50 < 0.5 ms"),
        ("resume → start, other thread", lambda: c_latency_thread(s, cfg),
         lambda: f_latency_thread(s, cfg), "call_soon_threadsafe", 50, 1.0, "p50 < 1 ms"),
        ("limit 0 → 1 → waiter start", lambda: asyncio.run(c_latency("limit", s, cfg)),
         lambda: asyncio.run(f_latency("limit", s, cfg)), "Semaphore.release", 50, 1.0,
         "p50 < 1 ms (spec §4.6)"),
        (f"TTL expiry → start, lateness (ttl {cfg['ttl'] * 1e3:g} ms, n={ts})",
         lambda: asyncio.run(c_latency("ttl", ts, cfg)),
         lambda: asyncio.run(f_latency("ttl", ts, cfg)), "call_later", 99, 20.0, "p99 ≤ 20 ms")]
    for label, cascade_fn, floor_fn, floor_name, q, limit_ms, target in cases:
        res = {}
        for name, fn in (("cascade", cascade_fn), ("floor", floor_fn)):
            try:
                lat = fn()
                res[name] = (pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, min(lat) * 1e3)  # ms
            except Exception as exc:
                res[name] = _fail(f"W6 {label} {name}", exc, errors)
        c, f = res["cascade"], res["floor"]
        cell = lambda r: r if isinstance(r, str) else f"{r[0] * 1e3:.0f} / {r[1] * 1e3:.0f} µs"
        met = verdict(c[0 if q == 50 else 1], limit_ms) if isinstance(c, tuple) else "—"
        if isinstance(c, tuple) and c[2] < -1:  # a body began before its control was lifted
            met = f"**no** (started {-c[2]:.1f} ms early)"
        both = isinstance(c, tuple) and isinstance(f, tuple) and f[0] > 0
        rows.append(dict(workload=f"W6 {label} (p50 / p99)", cascade=cell(c),
                         floor=f"{cell(f)} ({floor_name})", ratio=f"{c[0] / f[0]:.1f}× at p50" if both else "—",
                         target=target, met=met, raw=res))
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
    """A two-stage map over a map, each stage under its own limit: the ideal pipelined
    time is n * d / limit for the stages' common rate plus d for the last item's second
    stage (with a barrier between the stages it would be twice n * d / limit)."""
    n, d, lim = cfg["pipe_n"], cfg["pipe_sleep"], cfg["pipe_limit"]
    ideal = n * d / lim + d
    best, rss = measure(n, ["c_pipeline", "f_pipeline"], cfg, args, errors)
    cell = lambda k: best[k] if isinstance(best[k], str) else \
        f"{best[k] / ideal:.2f}× ideal ({best[k] * 1e3:.0f} ms)"
    ratio = best["c_pipeline"] / ideal if isinstance(best["c_pipeline"], float) else None
    return [dict(workload=f"W8 two-stage map over a map ({n:,} items × 2 stages × "
                          f"{d * 1e3:g} ms, limit {lim} per stage, ideal pipelined "
                          f"{ideal * 1e3:.0f} ms, with a barrier {2 * n * d / lim * 1e3:.0f} ms)",
                 cascade=cell("c_pipeline"), floor=cell("f_pipeline") + " (two semaphores)",
                 ratio="—" if ratio is None else f"{ratio:.2f}×", target="≤ 1.2× ideal",
                 met=verdict(ratio, 1.2), rss=fmt_mb(rss, ("c_pipeline", "f_pipeline")),
                 raw=dict(n=n, best=best, ideal=ideal, rss=rss))]

def w12(cfg, args, errors):
    n = cfg["keys"]
    KEYED_LEFT.clear()
    best = best_of(cfg["reps"], ["c_keyed", "c_keyed_room", "c_keyed_plain", "c_unkeyed"], n,
                   cfg, errors)
    label = f"{n:,} calls of a task with a key, each its own value (an async map)"
    rows = [ratio_row(f"W12 admission under a per-key limit against a plain one: {label}, "
                      f"limit 2 per customer / limit {n:,} (neither holds a call back)", n,
                      best, {}, "c_keyed", "c_keyed_room", 1.5, "plain limit"),
            ratio_row(f"W12 ... against a plain limit 2 (it holds {n - 2:,} calls back, each "
                      "its own queue)", n, best, {}, "c_keyed", "c_keyed_plain", None,
                      "plain limit 2"),
            ratio_row(f"W12 the price of keys: {label} under limit 2 per customer / the same "
                      "task without keys under limit 2", n, best, {}, "c_keyed", "c_unkeyed",
                      None, "no keys, plain limit 2")]
    left = max(KEYED_LEFT) if KEYED_LEFT else None
    rows.append(dict(workload=f"W12 per-key state left after that run ({n:,} values came "
                              "and went)",
                     cascade="—" if left is None else f"{left} values",
                     floor="", target="0 values", met="—" if left is None else
                     ("yes" if left == 0 else "**no**"), rss=""))
    return rows

def w13(cfg, args, errors):
    n = cfg["shared_n"]
    best = best_of(cfg["reps"], ["c_rate_shared", "c_rate_local"], n, cfg, errors)
    sv, lv = best["c_rate_shared"], best["c_rate_local"]
    over = (sv - lv) / n * 1e6 if isinstance(sv, float) and isinstance(lv, float) else None
    rows = [dict(workload=f"W13 starts under a shared rate limit ({SHARED_RATE} burst "
                          f"{SHARED_BURST}, one engine, Redis on 127.0.0.1:6379; n={n:,})",
                 cascade=fmt_us(sv, n), floor=f"{fmt_us(lv, n)} (the same rate, local)",
                 ratio="—" if over is None else f"{over:+.1f} µs/start",
                 target="≤ +20 µs/start", met=verdict(over, 20.0), rss="",
                 raw=dict(n=n, best=best))]
    procs, busy, secs = cfg["fleet"]
    for burst, label, b, idle in ((burst, label, b, idle) for burst in FLEET_BURSTS
                                  for label, b, idle in (
                                      (f"all {procs} busy", procs, 0),
                                      (f"{busy} of {procs} busy", busy, procs - busy))):
        workload = (f"W13 100/s (burst {burst}) shared by {procs} engine processes, {label} "
                    f"(starts a second in {secs - 1.5:g} s of steady state; most over burst + "
                    "rate × elapsed in any window)")
        try:
            per_s, worst = fleet_rate(b, idle, secs, burst)
            # (timed in the bodies, a little after each grant and on n clocks of one
            # host: one start of jitter is allowed over the bound the grants keep)
            ok = 95 <= per_s <= 100.5 and worst <= 1
            rows.append(dict(workload=workload, cascade=f"{per_s:.1f}/s, {worst:+.0f} starts",
                             floor="" if not idle else "(a static split of the budget: "
                                   f"{100 * b / procs:.0f}/s)", target="[95, 100]/s, ≤ +1",
                             met="yes" if ok else "**no**", rss=""))
        except Exception as exc:
            rows.append(dict(workload=workload, cascade=_fail("W13 fleet", exc, errors),
                             target="[95, 100]/s, ≤ +1", met="—"))
    n = cfg["cap_procs"]
    workload = (f"W13 a shared limit of 5 across {n} engine processes: peak running, and "
                "from a SIGKILL of one holding permits until 5 run again (lease 2 s)")
    try:
        peak, back = fleet_cap_kill(n)
        ok = peak <= 5 and back is not None and back <= 3.0
        rows.append(dict(workload=workload, cascade=f"peak {peak}, back in "
                         f"{'never' if back is None else f'{back:.2f} s'}", floor="",
                         target="peak ≤ 5, ≤ lease + 1 s", met="yes" if ok else "**no**",
                         rss=""))
    except Exception as exc:
        rows.append(dict(workload=workload, cascade=_fail("W13 cap", exc, errors),
                         target="peak ≤ 5, ≤ lease + 1 s", met="—"))
    return rows

def w14(cfg, args, errors):
    n = cfg["n"]
    names = ["c_map", "c_checkpointed", "c_cache_miss", "c_cache_hit", "c_checkpoint_rerun"]
    best = best_of(cfg["reps"], names, n, cfg, errors)
    plain = best["c_map"]

    def over(k):  # µs a task more than W4's plain map
        return (best[k] - plain) / n * 1e6 if isinstance(best[k], float) and \
            isinstance(plain, float) else None

    def per(k):
        return best[k] / n * 1e6 if isinstance(best[k], float) else None
    cell = lambda v, k: best[k] if v is None and isinstance(best[k], str) else \
        "—" if v is None else f"{v:.1f}"
    rows = []
    for k, label, v, limit in (
            ("c_checkpointed", "overhead a task of a checkpointed run (get-miss + put, "
             "batched commits) over the plain map", over("c_checkpointed"), 20.0),
            ("c_cache_miss", "overhead a task of with_cache, every call a miss (get + put)",
             over("c_cache_miss"), None),
            ("c_cache_hit", "a cache hit: a task of a run whose every value is in the store "
             "(whole run / n)", per("c_cache_hit"), 10.0),
            ("c_checkpoint_rerun", "a checkpointed re-run that finds everything done "
             "(whole run / n)", per("c_checkpoint_rerun"), None)):
        rows.append(dict(workload=f"W14 SqliteStore, async map (n={n:,}): {label}",
                         cascade=cell(v, k), floor=fmt_us(plain, n) + " (the plain map)",
                         target="—" if limit is None else f"≤ {limit:g} µs",
                         met="—" if limit is None else verdict(v, limit), rss="",
                         raw=dict(n=n, best=best)))
    return rows

def w_import(cfg, args, errors):
    _need_cascade()
    label = "`import cascade` on top of `import asyncio` (-X importtime)"
    if platform.python_implementation() == "PyPy":  # it has no -X importtime
        return [dict(workload=label, cascade="n/a on PyPy (no -X importtime)",
                     target="≤ 15 ms", met="—")]
    extra, base = import_ms(1 if args.quick else 5)
    return [dict(workload=label,
                 cascade=f"{extra:.1f} ms", floor=f"{base:.1f} ms (asyncio itself)",
                 target="≤ 15 ms", met=verdict(extra, 15.0))]

WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "W6": w6, "W7": w7, "W8": w8,
             "W9": w9, "W10": w10, "W11": w11, "W12": w12, "W13": w13, "W14": w14,
             "W15": w15, "IMPORT": w_import}

FOOTNOTE = """\
Timed: building the work and running it to its value. Cascade: graph build +
`await cs.run_async(target, engine=engine, log_level="WARNING")`;
floors: creating the coroutines / executor futures + `asyncio.gather` (W2: the `await create_task`
loop); Dask: dict-graph build + `dask.threaded.get(num_workers=64)` (its pool is cached between
calls). Engines, pools and event loops are made outside the timed region; each measurement gets a
fresh loop; implementations alternate within each repetition and the best repetition counts.
W3 efficiency = ideal / wall. W8: wall / ideal, where ideal = n × d / limit + d (both stages at
their limit's rate, the last item's second stage after it); its floor runs each item as one coroutine
through two asyncio.Semaphores. W6 times the control call (TTL: the expiry instant) to the probe
body's first line, both with perf_counter. Peak RSS: VmHWM of a fresh child process that runs the
workload once{baseline}.
The graphlib+asyncio runner (`run_graph` in bench.py: graphlib.TopologicalSorter + asyncio, no
control plane) starts each node as soon as its inputs are done, async bodies as tasks and sync ones
in a 64-thread pool, and is timed like Cascade: building its dict graph + running it to the value.
W9 times each `engine.status()` call from the main thread while a limited map runs on
`engine.start()`'s helper loop (sampled once status() shows every item; then the run is
cancelled), and takes the peak RSS of an unlimited map run to its value, in a child as above.
W15 times, every 0.1 s from the main thread while an unlimited 1,000,000-item map of no-op async
bodies runs on `engine.start()`'s helper loop, one refresh of the live views: the engine's
record (`_engine_record`, its presence record), a `_View` taking it and making its snapshot,
and `cascade top`'s 120x40 screen (`_top_lines`).
W10 (hardening): the 2,000-name admission case against the same work unlimited; a paced storm of
concurrency controls from a thread through LocalBroker (messages / s until the last of each topic
is in force; apply latency = publish → ConstraintApplied of the messages that were applied, the
superseded ones being coalesced away); a pause over a real Mosquitto while a 100,000-item map
under a limit sends its BLOCKED telemetry; TTL expiry lateness (ConstraintRemoved against the
control's expires_at) while CPU-bound sync bodies keep the GIL busy; W4's map on an engine
whose telemetry goes to Mosquitto (the run's flush included; paho client and the engine's
control subscription made outside the timed region) against W4 without telemetry; and the
events of a 50,000-item map that reach a paho subscriber and `cascade watch --count` (a
separate process). The MQTT rows use a topic prefix of their own on the shared broker.
W11 (remote executors): a map of CPU-bound sync bodies on a 2-process pool (spawn) and on a Dask
LocalCluster of 2 worker processes × 1 thread, each made once outside the timed region; Cascade with
its default window (the pool's 2 workers + 1; the cluster's 2 threads + 1 per worker) against
`list(pool.map(f, items))` and `client.gather(client.map(f, items, pure=False))`; Cascade's time
includes its per-run check that the task loads in a worker. The "window=2" Dask row is for
information: with nothing queued at the workers, each waits a scheduler round trip per task."""

def print_table(rows, args, cfg, seconds):
    version = getattr(cs, "__version__", "?") if cs else f"not importable ({CASCADE_ERROR})"
    print(f"Cascade {version} — {platform.platform()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"best of {cfg['reps']}{', --quick (sizes too small for the targets)' if args.quick else ''}, "
          f"{seconds:.0f} s\n")
    cols = ["workload", "cascade µs/task", "floor / peer µs/task", "ratio", "target", "met?",
            "peak RSS MB cascade / floor"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        cells = (r.get(k, "—" if k == "ratio" else "") for k in
                 ("workload", "cascade", "floor", "ratio", "target", "met", "rss"))
        print("| " + " | ".join(map(str, cells)) + " |")
    base = f" (of which ≈{min(BASELINE_MB):.0f} MB is the interpreter and imports)" if BASELINE_MB else ""
    print("\n" + FOOTNOTE.format(baseline=base))
    if not have_dask():
        print(f"\nNote: Dask is not installed, its rows are {SKIP_DASK}")
    if cs is None:
        print(f"\nNote: cascade.py is not importable from {ROOT} ({CASCADE_ERROR}); only floors and peers ran.")

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 rep, no RSS (the smoke run)")
    ap.add_argument("--only", help=f"comma-separated workloads out of {','.join(WORKLOADS)}")
    ap.add_argument("--reps", type=int, help="repetitions (the best one counts)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--child", nargs=2, metavar=("RUNNER", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.child:
        return run_child(args.child[0], int(args.child[1]), cfg)
    cfg["reps"] = args.reps or cfg["reps"]
    args.rss = not (args.no_rss or args.quick)
    only = [w.strip().upper() for w in args.only.split(",")] if args.only else list(WORKLOADS)
    if set(only) - set(WORKLOADS):
        ap.error(f"--only: unknown {sorted(set(only) - set(WORKLOADS))}; choose from {list(WORKLOADS)}")
    rows, errors, t0 = [], [], perf()
    for key in WORKLOADS:
        if key in only:
            try:
                rows += WORKLOADS[key](cfg, args, errors)
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
