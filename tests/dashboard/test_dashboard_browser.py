"""The dashboard in a real headless Chromium against a live `hmkd serve` with real jobs:
sign-in, the job list, a job page's curves and metrics, a signed download, compare, cancel,
and the error states. Nothing is stubbed but, in one test, the network itself (to show the
banner)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from tests.dashboard.conftest import CHROMIUM, LiveService, sign_in

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    ),
]

# Pixels of a series' colour on a chart canvas: the first two palette entries of charts.js.
COUNT_COLOUR = """([selector, rgb]) => {
  const canvas = document.querySelector(selector + " canvas");
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (Math.abs(data[i] - rgb[0]) < 40 && Math.abs(data[i + 1] - rgb[1]) < 40
        && Math.abs(data[i + 2] - rgb[2]) < 40 && data[i + 3] > 128) n++;
  }
  return n;
}"""
BLUE, RED = (31, 119, 180), (214, 39, 40)  # colour(0), colour(1)


def no_csp_or_script_errors(page: Any) -> None:
    bad = [e for e in page.errors if "Content Security Policy" in e or "Uncaught" in e]
    assert not bad, bad


def test_sign_in_refuses_a_bad_token_then_signs_in_and_out(
    page: Any, live_service: LiveService
) -> None:
    page.goto(f"{live_service.url}/")
    page.wait_for_selector("#signin-form")
    assert not page.is_visible("#nav") and not page.is_visible("#signout")
    page.fill("#token", "hmkd_not-a-real-token")
    page.click("#signin-form button[type=submit]")
    error = page.wait_for_selector("#signin-status .error")
    assert "unknown or revoked" in error.inner_text()
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0

    page.fill("#token", live_service.token)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#workers")  # the queue view, with the embedded worker
    assert "admin" in page.inner_text("#who") and "team local" in page.inner_text("#who")
    assert page.locator("#workers tbody tr").count() == 1
    assert page.evaluate("sessionStorage.getItem('hmkd.token')") == live_service.token
    assert page.is_visible("#nav")
    page.click("#signout")
    page.wait_for_selector("#signin-form")
    assert not page.is_visible("#nav")
    assert page.evaluate("sessionStorage.length + localStorage.length") == 0
    assert not any(live_service.token in url for url in page.urls)  # never in a URL
    no_csp_or_script_errors(page)


def test_job_list_shows_the_jobs_and_filters_them(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/jobs")
    row = page.wait_for_selector(f"tr[data-job-id='{finished_jobs['teacher']}']")
    assert "tiny-baseline" in row.inner_text() and "succeeded" in row.inner_text()
    assert page.locator(f"tr[data-job-id='{finished_jobs['hmkd']}']").count() == 1

    page.select_option("#job-filters select[name=method]", "hmkd")
    page.wait_for_function(
        "() => document.querySelectorAll('table.jobs tbody tr').length === 1", timeout=10_000
    )
    assert page.locator(f"tr[data-job-id='{finished_jobs['hmkd']}']").count() == 1
    assert "method=hmkd" in page.url  # filters live in the URL
    page.select_option("#job-filters select[name=method]", "")
    page.fill("#job-filters input[name=name]", "no-such-job")
    page.wait_for_selector("text=No jobs match these filters")
    no_csp_or_script_errors(page)


def test_job_page_draws_curves_and_the_database_metrics(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["hmkd"]
    with live_service.client() as c:
        metrics = c.get(f"/v1/jobs/{job_id}/metrics").json()
        job = c.get(f"/v1/jobs/{job_id}").json()
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/jobs/{job_id}")
    page.wait_for_selector("#final-metrics")
    page.wait_for_selector("#loss-chart canvas")
    # summed per module: total, detection, hm, sdm; every term behind a checkbox
    assert page.get_attribute("#loss-chart", "data-series") == "4"
    legend = page.locator("#loss-chart .u-legend .u-series").all_inner_texts()
    assert [t.split()[0].rstrip("-") for t in legend[1:]] == ["total", "detection", "hm", "sdm"]
    page.check("#loss-detail")
    page.wait_for_function(
        f"() => document.querySelector('#loss-chart').dataset.series === '{len(metrics['losses'])}'"
    )
    assert len(metrics["losses"]) > 3  # detection and HM/SDM components
    assert page.get_attribute("#loss-chart", "data-points") == str(len(metrics["iteration"]))
    assert page.evaluate(COUNT_COLOUR, ["#loss-chart", BLUE]) > 50  # a drawn line, not a grid
    assert page.evaluate(COUNT_COLOUR, ["#lr-chart", BLUE]) > 50
    assert page.get_attribute("#eval-chart", "data-points") == str(len(metrics["evaluations"]))

    rows = page.locator("#eval-table tbody tr")
    assert rows.count() == len(metrics["evaluations"]) >= 2
    last = metrics["evaluations"][-1]
    cells = rows.nth(rows.count() - 1).locator("td")
    assert cells.nth(0).inner_text() == str(last["iteration"])
    final_ap = page.inner_text("#final-metrics tr[data-metric='AP'] td.final")
    assert final_ap == f"{100 * job['latest_eval']['AP']:.2f}"
    assert page.inner_text("#final-metrics tr[data-metric='AP_S'] td.final") == (
        f"{100 * job['latest_eval']['AP_S']:.2f}"
    )
    assert "succeeded" in page.inner_text(".job-header")
    assert "100.0%" in page.inner_text("#job-progress")
    assert "training succeeded" in page.inner_text("#log")
    assert page.locator("#retry-job").count() == 0 and page.locator("#cancel-job").count() == 0
    # the student's detections over the first validation images, their true boxes in green
    page.wait_for_selector("#predictions figure img")
    assert page.locator("#predictions .sample-box.truth").count() >= 1
    loaded = "i => i.complete && i.naturalWidth > 0"
    assert page.evaluate(
        f"() => [...document.querySelectorAll('#predictions img')].every({loaded})"
    )
    no_csp_or_script_errors(page)


def test_download_button_saves_the_artifact(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["teacher"]
    with live_service.client() as c:
        listed = {a["name"]: a for a in c.get(f"/v1/jobs/{job_id}/artifacts").json()}
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/jobs/{job_id}")
    button = page.wait_for_selector("tr[data-artifact='run/student.pt'] button.download")
    with page.expect_download() as info:
        button.click()
    download = info.value
    assert download.suggested_filename == "student.pt"
    assert re.search(r"/v1/downloads/[\w-]+\.[\w-]+$", download.url)
    data = Path(download.path()).read_bytes()
    on_disk = live_service.data_dir / "artifacts" / job_id / "run" / "student.pt"
    assert hashlib.sha256(data).hexdigest() == listed["run/student.pt"]["sha256"]
    assert data == on_disk.read_bytes()
    assert not any(live_service.token in url for url in page.urls)
    no_csp_or_script_errors(page)


def test_compare_overlays_two_jobs(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/jobs")
    for role in ("teacher", "hmkd"):
        page.check(f"tr[data-job-id='{finished_jobs[role]}'] input.pick")
    page.click("#compare-selected")
    page.wait_for_selector("#compare-table")
    assert page.get_attribute("#compare-chart", "data-series") == "2"
    assert page.locator("#compare-table tbody tr").count() == 2
    legend = page.locator("#compare-chart .u-legend .u-series").all_inner_texts()
    assert len(legend) == 3  # the x axis and one entry per job
    assert "tiny-baseline (none)" in legend[1] + legend[2]
    assert "tiny-hmkd (hmkd)" in legend[1] + legend[2]
    # Tiny jobs score the same AP_S, so the second (red) line lies over the first.
    assert page.evaluate(COUNT_COLOUR, ["#compare-chart", RED]) > 20
    assert "metric=AP_S" in page.url and finished_jobs["hmkd"] in page.url
    final = page.locator("#compare-final tbody tr")
    assert final.count() == 2 and "(" in final.nth(1).inner_text()  # differences from the first
    assert "AP_TINY" in page.inner_text("#compare-final thead").upper()
    page.select_option("#compare-metric", "AP")
    page.wait_for_function("() => document.querySelector('#compare-table th:nth-child(6)')"
                           ".textContent === 'final AP (%)'")  # fmt: skip
    no_csp_or_script_errors(page)


def test_running_job_follows_live_then_cancels(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["long"]
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/jobs/{job_id}")
    page.wait_for_selector(".job-header [data-state='running']", timeout=60_000)
    iteration = re.compile(r"iteration (\d+) / 5000")

    def shown() -> int:
        match = iteration.search(page.inner_text("#job-progress"))
        return int(match.group(1)) if match else -1

    first = shown()
    page.wait_for_function(  # the SSE stream moves the page without a reload
        f"() => /iteration (\\d+)/.exec(document.querySelector('#job-progress').innerText)[1]"
        f" > {first + 2}"
    )
    assert int(page.get_attribute("#loss-chart", "data-points")) >= 2
    assert "ETA" in page.inner_text("#job-eta")

    page.click("#cancel-job")
    page.wait_for_selector("dialog#confirm[open]")
    assert "Cancel tiny-long?" in page.inner_text("#confirm-title")
    page.click("#confirm-yes")
    page.wait_for_selector(".job-header [data-state='cancelled']", timeout=30_000)
    page.wait_for_selector("#retry-job")
    assert live_service.job(job_id)["state"] == "cancelled"
    no_csp_or_script_errors(page)


def test_unknown_and_foreign_jobs_are_not_found_and_network_errors_show(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    bob = live_service.user_token("bob", "beta")
    sign_in(page, live_service, bob)
    page.goto(f"{live_service.url}/#/jobs/{finished_jobs['teacher']}")
    page.wait_for_selector("text=Job not found")
    assert "tiny-baseline" not in page.inner_text("main")
    page.goto(f"{live_service.url}/#/jobs")
    page.wait_for_selector("text=No jobs yet")

    page.route("**/v1/**", lambda route: route.abort())
    page.goto(f"{live_service.url}/#/queue")
    page.wait_for_selector("#banner", state="visible")
    assert "Cannot reach" in page.inner_text("#banner")
    page.unroute("**/v1/**")
    page.wait_for_selector("#banner", state="hidden")  # the next refresh heals it


def test_a_dataset_page_shows_its_sizes_and_samples_with_boxes(
    page: Any, live_service: LiveService, finished_jobs: dict[str, str]
) -> None:
    splits = {
        "train": {
            "images": str(live_service.digits["train_images"]),
            "annotations": str(live_service.digits["train_annotations"]),
        }
    }
    with live_service.client() as c:
        made = c.post("/v1/datasets", json={"name": "digits", **splits})
        assert made.status_code == 201, made.text
    sign_in(page, live_service)
    page.goto(f"{live_service.url}/#/datasets")
    page.click("text=digits@1")
    page.wait_for_selector("#split-train .histogram")
    assert "AT THE MODEL'S INPUT" in page.inner_text("#split-train .histogram").upper()
    page.wait_for_selector("#samples figure img")
    assert page.locator("#samples .sample-box").count() >= 1
    page.fill("#input-size input[name=min_size]", "64")
    page.click("#input-size button")
    page.wait_for_function("() => location.hash.includes('min_size=64')")
    no_csp_or_script_errors(page)
