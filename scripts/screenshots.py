"""Screenshots of the dashboard for the README, taken from a live service with real jobs.

    .venv/bin/python scripts/screenshots.py [--data-dir DIR] [--iterations N] [--out DIR]

It starts `hmkd serve` over `--data-dir` (kept, so a second run reuses its finished jobs and
only re-shoots), makes SmallDigits there as the demo does (`--size` px images), and runs the
demo's configs (`configs/service/`) at that size: a ResNet-34 teacher, then an HMKD-distilled
ResNet-18 student and a plain ResNet-18 baseline (`method: none`) on the same data,
`--iterations` each. The queue is
shot while the student trains; the job page, the list and the comparison once all are done.
Chromium is Debian's (`/usr/bin/chromium`), driven by Playwright; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.sdk import Client  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TERMINAL = {"succeeded", "failed", "cancelled"}


@contextmanager
def serving(data_dir: Path, port: int) -> Iterator[str]:
    """`hmkd serve` over `data_dir` until the block ends; yields its URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HMKD_")}
    env |= {"HMKD_DATA_DIR": str(data_dir), "HMKD_PROGRESS_INTERVAL_SECONDS": "1"}
    log = open(data_dir / "serve.log", "ab")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen(
        [str(REPO / ".venv/bin/hmkd"), "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(url, "-") as api:
                    if api.ready()["ready"]:
                        break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"hmkd serve did not start; see {data_dir / 'serve.log'}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # serve stops its worker on the way out
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group it was started in
            proc.wait()
        log.close()


def demo_spec(
    name: str, config: str, data: Path, iterations: int, size: int, **changes: Any
) -> dict:
    """A demo config with its data paths pointed at `data`, its models at `size` px and a
    shorter schedule."""
    spec = yaml.safe_load((REPO / "configs/service" / config).read_text())
    spec["name"] = name
    for model in ("student", "teacher"):
        if model in spec:
            spec[model]["min_size"] = spec[model]["max_size"] = size
    for split in ("train", "val"):
        spec["data"][split] = {
            "images": str(data / split / "images"),
            "annotations": str(data / split / "annotations.json"),
        }
    spec["schedule"]["iterations"] = iterations
    spec["schedule"]["warmup_iters"] = min(spec["schedule"]["warmup_iters"], iterations // 6)
    spec["eval"]["every"] = max(1, iterations // 6)
    spec["checkpoint"]["every"] = max(1, iterations // 3)
    spec.update(changes)
    return spec


def job_named(api: Client, name: str) -> dict | None:
    """The newest job called `name` that did not fail, to reuse a previous run's work."""
    for job in api.jobs(name=name, limit=20)["items"]:
        if job["name"] == name and job["state"] not in ("failed", "cancelled"):
            return job
    return None


def ensure(api: Client, spec: dict) -> str:
    job = job_named(api, spec["name"])
    return job["id"] if job else api.submit(spec)["id"]


def wait(api: Client, job_id: str, states: set[str]) -> dict:
    while (job := api.job(job_id))["state"] not in states:
        print(f"  {job['name']}: {job['state']} {job['iteration']}/{job['total_iterations']}")
        time.sleep(10)
    return job


def shoot(page: Any, url: str, path: Path, ready: str, settle: float = 1.0) -> None:
    page.goto(url)
    page.wait_for_selector(ready, timeout=60_000)
    time.sleep(settle)  # charts resize and progress bars ease in
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "hmkd-screenshots"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--size", type=int, default=256, help="SmallDigits image size (px)")
    parser.add_argument("--port", type=int, default=8799)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the service on the way out
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    digits = data_dir / "datasets" / f"smalldigits-{args.size}"
    if not (digits / "val" / "annotations.json").is_file():
        from hmkd_core.data import make_small_digits

        make_small_digits(digits, train=400, val=100, size=args.size, seed=0)

    with serving(data_dir, args.port) as url, sync_playwright() as p:
        token = (data_dir / "token").read_text().strip()
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=1)
        shoot(page, f"{url}/", args.out / "signin.png", "#signin-form", settle=0.2)
        page.fill("#token", token)
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#signout", state="visible")

        with Client(url, token) as api:
            n, size = args.iterations, args.size
            teacher_spec = demo_spec("smalldigits-teacher", "teacher.yaml", digits, n, size)
            teacher = ensure(api, teacher_spec)
            wait(api, teacher, TERMINAL)
            teacher_ref = {"weights": f"job:{teacher}"}
            hmkd_spec = demo_spec("smalldigits-hmkd", "hmkd.yaml", digits, n, size)
            hmkd_spec["teacher"].update(teacher_ref)
            baseline_spec = demo_spec(
                "smalldigits-baseline", "hmkd.yaml", digits, n, size, kind="train"
            )
            baseline_spec.pop("teacher")
            baseline_spec["distill"] = {"method": "none"}
            hmkd = ensure(api, hmkd_spec)
            baseline = ensure(api, baseline_spec)
            if api.job(hmkd)["state"] != "succeeded":
                job = wait(api, hmkd, TERMINAL | {"running"})
                while job["state"] == "running" and job["iteration"] < n // 3:
                    time.sleep(5)
                    job = api.job(hmkd)
                shoot(page, f"{url}/#/queue", args.out / "queue.png", "#workers")
                running = args.out / "job-running.png"
                shoot(page, f"{url}/#/jobs/{hmkd}", running, "#loss-chart canvas")
            for job_id in (hmkd, baseline):
                wait(api, job_id, TERMINAL)

        shoot(page, f"{url}/#/jobs", args.out / "jobs.png", "table.jobs")
        shoot(page, f"{url}/#/jobs/{hmkd}", args.out / "job.png", "#final-metrics")
        compare = f"{url}/#/compare?ids={baseline},{hmkd}&metric=AP_S"
        shoot(page, compare, args.out / "compare.png", "#compare-table")
        browser.close()


if __name__ == "__main__":
    main()
