"""Makes docs/serve.png: the web view (engine.serve) of a workflow while it runs.
Needs playwright (pip install playwright) and Chromium (/usr/bin/chromium).
Run from the repository: python bench/picture_serve.py"""
import asyncio
import concurrent.futures
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cascade as cs  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

rnd = random.Random(3)


@cs.task(name="fetch", tags=["io"])
async def fetch(i):
    await asyncio.sleep(0.2 + rnd.random() * 0.2)
    return i


@cs.task(name="parse", tags=["cpu"])
def parse(page):
    time.sleep(0.02)
    return page


@cs.task(name="api_call", tags=["io"])
async def api_call(x):
    await asyncio.sleep(0.1)
    return x


@cs.task(name="report")
def report(*xs):
    return len(xs)


@cs.task(name="notify")
async def notify(x):
    raise ConnectionError("smtp.example.org: connection refused")


engine = cs.Engine()
engine.limit("task:fetch", 8)
engine.rate_limit("task:parse", "20/s", burst=4)
try:
    engine.start(notify(1), run_id="nightly-notify").result()
except ConnectionError:
    pass
engine.start(report(*[api_call(i) for i in range(6)]), run_id="warmup").result()
with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a run on a loop thread of its own
    h = pool.submit(engine.start, report(*[api_call(parse(fetch(i))) for i in range(400)]),
                    run_id="etl-2026-12-07").result()
engine.pause("task:api_call", ttl=300)
web = engine.serve()
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium")
    page = browser.new_page(viewport={"width": 1200, "height": 820}, device_scale_factor=1)
    page.goto(web.url)
    page.wait_for_selector("tr[data-task=fetch]")
    time.sleep(4)
    page.click('tr[data-task=api_call] button[data-verb="limit"]')
    page.fill("#n", "4")
    page.click("#yes")
    page.wait_for_function("() => document.querySelector('#result').textContent")
    page.click('tr[data-task=api_call] button[data-verb="resume"]')
    time.sleep(1.5)
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                       "serve.png")
    page.screenshot(path=out, full_page=True)
    browser.close()
print("wrote", out)
engine.clear("task:api_call")
h.result()
engine.close()
