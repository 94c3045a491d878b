"""Test helper: open an HTML file in headless Chromium over the DevTools protocol (a pipe, no extra packages) and report
what a person would see go wrong: console errors, uncaught exceptions, images that did not load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    def __init__(self, browser: str, profile: str):
        r_in, w_in = os.pipe()  # we write -> chromium reads fd 3
        r_out, w_out = os.pipe()  # chromium writes fd 4 -> we read
        args = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", "about:blank"]

        # chromium reads commands from fd 3 and writes replies to fd 4: start it through a shell that moves the
        # pipe ends there (a preexec dup2 could clobber subprocess's own error pipe)
        cmd = f"exec 3<&{r_in} 4>&{w_out}; exec " + " ".join(f"'{a}'" for a in args)
        self.log = tempfile.TemporaryFile()
        # its own process group, so that close() can stop its helper processes too
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(r_in, w_out), stdout=self.log,
                                     stderr=self.log, start_new_session=True)
        os.close(r_in)
        os.close(w_out)
        self.w, self.r = w_in, r_out
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from the browser")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                self.log.seek(0)
                raise RuntimeError("the browser closed the pipe: " + self.log.read().decode(errors="replace")[-1500:])
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)

    def close(self) -> None:
        """Shut Chromium down and make sure none of its processes still writes to the profile directory (the
        caller deletes it next: a helper process writing into it made that fail with "Directory not empty")."""
        try:
            self.send("Browser.close")  # a clean exit: Chromium flushes the profile, then quits
        except Exception:  # noqa: BLE001 - it may close the pipe before it answers
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # any helper process left in its group
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.w)
        os.close(self.r)


def check_page(path: Path, browser: str | None = None) -> dict:
    """Load `path`; returns {"title", "text_len", "images": [{"src_prefix", "complete", "width"}], "errors": [...]}."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found")
    with tempfile.TemporaryDirectory() as profile:
        pipe = _Pipe(browser, profile)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
                pipe.send(domain, session=session)
            pipe.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
            deadline = time.monotonic() + 30
            state = ""
            while state != "complete" and time.monotonic() < deadline:
                state = pipe.send("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True},
                                  session=session)["result"].get("value", "")
                time.sleep(0.1)
            expr = ("JSON.stringify({title: document.title, text_len: document.body.innerText.length, "
                    "images: Array.from(document.images).map(i => ({src_prefix: i.src.slice(0, 22), "
                    "complete: i.complete, width: i.naturalWidth}))})")
            page = json.loads(pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                                        session=session)["result"]["value"])
            errors = []
            for ev in pipe.events:
                method, params = ev.get("method"), ev.get("params", {})
                if method == "Runtime.exceptionThrown":
                    errors.append(params["exceptionDetails"].get("text", "exception"))
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", "")) for a in params.get("args", [])))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    errors.append(params["entry"].get("text", ""))
            page["errors"] = errors
            return page
        finally:
            pipe.close()
