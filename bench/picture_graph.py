"""Draws docs/graph.svg (and, with Chromium, docs/graph.png): a run caught mid-way.

    PYTHONPATH=. python bench/picture_graph.py && chromium --headless --screenshot=docs/graph.png \
        --window-size=W,H file://$PWD/docs/graph.svg
"""
import sys
import time

import cascade as cs


@cs.task(tags=["io"])
def fetch(i):
    time.sleep(0.02 * (i % 5))
    return bytes(100 + i)


@cs.task
def parse(page):
    return len(page)


@cs.task(name="api_call", tags=["io"])
def api_call(size):
    return size // 10


@cs.task
def notify(k):
    time.sleep(0.05)
    return k


@cs.task
def audit(sizes):
    return sum(sizes)


@cs.task
def flaky():
    raise ConnectionError("upstream hiccup")


@cs.task
def report(sizes, scores, notes, status, checked):
    return {"bytes": sum(sizes), "score": sum(scores)}


sizes = [parse(fetch(i)) for i in range(40)]
flow = report(sizes, [api_call(s) for s in sizes], notify.map(range(1000)),
              flaky().with_retry(5, delay=5), audit(sizes).run_if(cs.Param("audit", False)))

if __name__ == "__main__":
    engine = cs.Engine()
    engine.pause("task:api_call")          # the api calls wait, the rest goes on
    engine.limit("task:notify", 3)
    handle = engine.start(flow)
    time.sleep(0.6)
    cs.visualize(handle, sys.argv[1] if len(sys.argv) > 1 else "docs/graph.svg")
    handle.cancel()
    engine.close()
