#!/usr/bin/env python
"""Takes docs/tensorboard.png: TensorBoard showing the true and the reported curves on one card.

Trains the digits demo model with Keras' own ``TensorBoard`` callback and ``ReplayCheckpoint``,
replays it, exports the true curves into the same log folder, starts TensorBoard on a free
local port, loads its time-series page in headless Chromium and saves the screenshot.

Needs the dev and demo extras (TensorFlow for Keras' callback, scikit-learn for the data, the
tensorboard package) and Chromium (Debian: ``apt-get install chromium``). Not part of the tests.

    python scripts/tensorboard_screenshot.py [--out docs/tensorboard.png] [--epochs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]


def train_replay_export(folder: Path, epochs: int) -> Path:
    import keras

    from trueloss_replay import ReplayCheckpoint, export_tensorboard, replay
    from trueloss_replay.demo import build_demo_model, digits_data

    train, val = digits_data(0)
    keras.utils.set_random_seed(0)
    logdir, run_dir = folder / "logs" / "digits", folder / "run"
    build_demo_model().fit(
        *train,
        validation_data=val,
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[
            keras.callbacks.TensorBoard(logdir, write_graph=False),
            ReplayCheckpoint(run_dir, train_data=train, val_data=val),
        ],
    )
    replay(run_dir)
    done = export_tensorboard(run_dir, logdir)
    print("exported", *done.files, sep="\n  ")
    return logdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tensorboard exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"tensorboard did not answer {url} within {seconds:.0f} s")


def screenshot(url: str, out: Path, chromium: str, width: int = 1200, height: int = 680) -> None:
    """Loads ``url`` in headless Chromium, expands the first card, saves a PNG.

    Driven through the DevTools protocol (tornado's websocket client, installed with the dev
    extra's ipykernel): TensorBoard keeps its layout settings in localStorage, which only a
    script on its own page can set, and the full-width card is a button.
    """
    from tornado.websocket import websocket_connect

    async def drive(port: int) -> bytes:
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)
        ids = itertools.count(1)

        async def call(method: str, **params):
            number = next(ids)
            await ws.write_message(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                message = json.loads(await ws.read_message())
                if message.get("id") == number:
                    return message.get("result", {})

        async def evaluate(expression: str):
            found = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            return found.get("result", {}).get("value")

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                   deviceScaleFactor=1, mobile=False)  # fmt: skip
        origin = url.split("/?")[0]
        await call("Page.navigate", url=f"{origin}/data/environment")  # TensorBoard's origin
        await asyncio.sleep(1)
        settings = json.dumps({"timeSeriesSettingsPaneOpened": False})
        await evaluate(f"localStorage.setItem('_tb_global_settings', {json.dumps(settings)})")
        await call("Page.navigate", url=url)
        full_size = "button[aria-label='Toggle full size mode']"
        for _ in range(60):  # the card appears once the scalars are loaded
            await asyncio.sleep(0.5)
            if await evaluate(f'!!document.querySelector("{full_size}")'):
                break
        else:
            raise SystemExit(f"no chart card appeared on {url}")
        await evaluate(f'document.querySelector("{full_size}").click()')
        await asyncio.sleep(3)  # the chart redraws at full width
        shot = await call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])

    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
            + [f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or browser.poll() is not None:
                    raise SystemExit("Chromium did not open its DevTools port")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            out.write_bytes(asyncio.run(drive(port)))
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "tensorboard.png")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--tags", default="epoch_loss", help="TensorBoard's tag filter (regex)")
    parser.add_argument("--logdir", type=Path, help="an exported log folder to show instead")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")

    with tempfile.TemporaryDirectory() as folder:
        logdir = args.logdir or train_replay_export(Path(folder), args.epochs)
        port = free_port()
        tensorboard = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir.parent)]
            + ["--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_for(f"{base}/data/runs", tensorboard)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # forceSVG: TensorBoard's WebGL charts draw nothing in a GPU-less headless browser.
            query = f"forceSVG=true&smoothing=0&tagFilter={args.tags}"
            screenshot(f"{base}/?{query}#timeseries", args.out, chromium)
        finally:
            tensorboard.terminate()
            tensorboard.wait(timeout=30)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
