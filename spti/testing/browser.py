"""Headless Chromium for tests: load a page, evaluate JavaScript in it, take a screenshot.

Speaks the DevTools protocol over a websocket (aiohttp), so no browser driver is needed: only
Debian's ``chromium`` (or ``chromium-browser``, ``google-chrome``) on the PATH.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_LOADED = "document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageCheck:
    """What a test learns from one page load."""

    values: dict[str, Any]
    screenshot: bytes


async def _inspect(ws_url: str, url: str, expressions: dict[str, str], width: int, height: int) -> PageCheck:
    import aiohttp

    ids = itertools.count(1)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:

        async def call(method: str, params: dict[str, Any] | None = None, session_id: str | None = None) -> Any:
            msg_id = next(ids)
            message: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
            if session_id:
                message["sessionId"] = session_id
            await ws.send_str(json.dumps(message))
            while True:
                reply = json.loads((await ws.receive()).data)
                if reply.get("id") == msg_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})

        target = await call("Target.createTarget", {"url": "about:blank"})
        attached = await call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        sid = attached["sessionId"]
        await call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            sid,
        )
        await call("Page.enable", {}, sid)
        await call("Page.navigate", {"url": url}, sid)
        # wait until the document and every image have finished loading
        for _ in range(200):
            state = await call(
                "Runtime.evaluate",
                {
                    "expression": _LOADED,
                    "returnByValue": True,
                },
                sid,
            )
            if state["result"].get("value"):
                break
            await asyncio.sleep(0.05)
        values = {}
        for name, expression in expressions.items():
            result = await call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, sid)
            values[name] = result["result"].get("value")
        shot = await call("Page.captureScreenshot", {"format": "png"}, sid)
        return PageCheck(values=values, screenshot=base64.b64decode(shot["data"]))


def _stop_group(proc: subprocess.Popen[str]) -> None:
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def inspect_page(
    path: Path, expressions: dict[str, str], *, width: int = 1280, height: int = 900, timeout: float = 60
) -> PageCheck:
    """Load ``path`` in headless Chromium, evaluate each JavaScript expression, take a screenshot."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium on the PATH (Debian: apt-get install chromium)")
    # Chromium's helper processes may still write to the profile as it exits: clean up best-effort
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [
                browser,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: stopping it stops its helpers too
        )
        try:
            ws_url = None
            assert proc.stderr is not None
            for line in proc.stderr:
                match = re.search(r"DevTools listening on (ws://\S+)", line)
                if match:
                    ws_url = match.group(1)
                    break
            if ws_url is None:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            return asyncio.run(
                asyncio.wait_for(_inspect(ws_url, path.resolve().as_uri(), expressions, width, height), timeout)
            )
        finally:
            _stop_group(proc)
