#!/usr/bin/env python3
"""Make docs/top.png: `cascade top` in tmux while a demo workflow runs on an engine of
this process, captured with its escapes (capture-pane -e), turned into HTML and shot
with headless Chromium. Needs Mosquitto on 127.0.0.1:1883, paho-mqtt, tmux, chromium.

    python bench/picture_top.py [docs/top.png]
"""
import asyncio, html, os, re, shlex, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cascade as cs  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

PALETTE = ["#1e1e1e", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd",
           "#e5e5e5"]
FG, BG = "#d4d4d4", "#1e1e1e"


def ansi_to_html(text):
    """The SGR escapes tmux's capture-pane -e writes (bold, reverse, 8 colours and the
    default ones) as styled spans; everything else as text."""
    out, bold, rev, fg, bg = [], False, False, None, None
    for part in re.split(r"(\x1b\[[0-9;]*m)", text):
        m = re.fullmatch(r"\x1b\[([0-9;]*)m", part)
        if m:
            codes = [int(c) for c in m.group(1).split(";") if c] or [0]
            for c in codes:
                if c == 0:
                    bold, rev, fg, bg = False, False, None, None
                elif c == 1:
                    bold = True
                elif c == 22:
                    bold = False
                elif c == 7:
                    rev = True
                elif c == 27:
                    rev = False
                elif 30 <= c <= 37:
                    fg = PALETTE[c - 30]
                elif c == 39:
                    fg = None
                elif 40 <= c <= 47:
                    bg = PALETTE[c - 40]
                elif c == 49:
                    bg = None
            continue
        if not part:
            continue
        f, b = fg or FG, bg or BG
        if rev:
            f, b = b, f
        style = f"color:{f};background:{b}" + (";font-weight:bold" if bold else "")
        out.append(f'<span style="{style}">{html.escape(part)}</span>')
    return ("<!doctype html><meta charset=utf-8><body style=\"margin:0;background:" + BG
            + "\"><pre style=\"margin:0;padding:12px;font:13px/1.25 'DejaVu Sans Mono',"
            "monospace;color:" + FG + "\">" + "".join(out) + "</pre>")


def main(out=os.path.join(ROOT, "docs", "top.png")):
    prefix = f"docs-top-{os.getpid()}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", 1883)
    engine = cs.Engine(connector=cs.MqttConnector(client, prefix=prefix), presence=0.2,
                       org="acme", project="etl")

    @cs.task(name="fetch", tags=["io"])
    async def fetch(i):
        await asyncio.sleep(0.2)
        return i

    @cs.task(name="parse")
    async def parse(x):
        await asyncio.sleep(0.02)
        return x

    @cs.task(name="api_call", keys={"customer": lambda x: ["acme", "globex", "initech"][x % 3]})
    async def api_call(x):
        await asyncio.sleep(0.3)
        return x

    engine.limit("task:fetch", 8)
    engine.limit("task:api_call", 2, per="customer")
    engine.start(cs.task(name="warmup")(lambda: 1)(), run_id="etl-hourly-0900").result()
    handle = engine.start([api_call(parse(fetch(i))) for i in range(400)],
                          run_id="etl-hourly-1000")
    sock = f"docs-top-{os.getpid()}"
    env = f"PYTHONPATH={shlex.quote(ROOT)}"
    cmd = f"cd {shlex.quote(ROOT)} && env -u LINES -u COLUMNS {env} {shlex.quote(sys.executable)} cascade.py top --prefix {prefix}"
    tmux = ["tmux", "-L", sock]
    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "118", "-y", "24", cmd],
                   check=True)
    try:
        ctl = cs.Controller(cs.MqttConnector(client, prefix=prefix))
        asyncio.run(ctl.rate_limit("task:parse", "25/s", ttl=600))  # one with time left
        time.sleep(4)
        subprocess.run([*tmux, "send-keys", "-t", "top", "j"], check=True)
        time.sleep(1.5)
        shot = subprocess.run([*tmux, "capture-pane", "-e", "-p", "-t", "top"], check=True,
                              capture_output=True, text=True).stdout
        with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as fh:
            fh.write(ansi_to_html(shot))
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--hide-scrollbars",
                        f"--screenshot={out}", "--window-size=1000,420",
                        f"file://{fh.name}"], check=True, capture_output=True, timeout=60)
        os.unlink(fh.name)
        asyncio.run(ctl.clear("task:parse"))
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        handle.cancel()
        engine.close()
        client.disconnect()
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
