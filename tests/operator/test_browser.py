"""The admin in a real browser: headless Chromium logs in, filters, and releases a record.

Debian's chromium and chromium-driver are used by path (make test installs them);
nothing is downloaded. Screenshots go to artifacts/browser/ (git-ignored).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest
from django.contrib.auth.models import User

from dedup_celery import get_backend
from dedup_celery.models import DedupRecord
from tests.helpers import claim_for
from tests.services import REPO

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "artifacts" / "browser"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), (
            f"{path} is missing: install Debian's chromium and chromium-driver"
        )
    profile = tempfile.mkdtemp(prefix="dedup-celery-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def shot(driver, name):
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_an_operator_filters_and_releases_an_expired_processing_record(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    User.objects.create_superuser("operator", "op@example.com", "correct horse")
    backend = get_backend()
    expired = claim_for("shop.place", "stuck-order", lease=0.2)
    live = claim_for("shop.place", "running-order", lease=600)
    done = claim_for("shop.place", "done-order")
    for claim in (expired, live, done):
        backend.claim(claim)
    backend.complete(done, None)
    time.sleep(0.4)

    browser.get(f"{live_server.url}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("correct horse")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # Wait for the login's redirect to land, or it can overtake the next page load.
    WebDriverWait(browser, 10).until(
        lambda driver: (
            "/admin/login/" not in driver.current_url and driver.find_elements(By.ID, "user-tools")
        ),
        "the login did not complete",
    )
    browser.get(f"{live_server.url}/admin/dedup_celery/deduprecord/")
    WebDriverWait(browser, 10).until(
        lambda driver: (
            "/admin/dedup_celery/deduprecord/" in driver.current_url
            and driver.find_elements(By.ID, "changelist")
        ),
        "the message table's change list did not open",
    )
    shot(browser, "1-changelist")
    assert "done-order" in browser.page_source

    browser.find_element(By.LINK_TEXT, "processing").click()  # the status filter
    WebDriverWait(browser, 10).until(
        lambda driver: "status__exact=processing" in driver.current_url,
        "the status filter did not apply",
    )
    assert "done-order" not in browser.page_source
    assert "stuck-order" in browser.page_source
    shot(browser, "2-filtered")

    # Select both the stuck record and the live one: the release must refuse the live one.
    for key in ("stuck-order", "running-order"):
        pk = DedupRecord.objects.get(key=key).pk
        checkbox = browser.find_element(
            By.CSS_SELECTOR, f"input[name=_selected_action][value='{pk}']"
        )
        checkbox.click()
        assert checkbox.is_selected()
    Select(browser.find_element(By.NAME, "action")).select_by_value("release_records")
    browser.find_element(By.CSS_SELECTOR, "div.actions [type=submit]").click()  # "Go" / "Run"
    WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.ID, "release-records"),
        "the release confirmation page did not open",
    )
    assert expired.owner in browser.page_source  # the owner the release compares against
    assert live.owner in browser.page_source
    shot(browser, "3-confirm")
    browser.find_element(By.CSS_SELECTOR, "form input[type=submit][value=Release]").click()
    WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "ul.messagelist"),
        "the changelist with the release messages did not come back",
    )
    shot(browser, "4-released")
    assert "1 record(s) released" in browser.page_source
    assert "1 record(s) not released" in browser.page_source  # the live lease, refused
    assert not DedupRecord.objects.filter(key="stuck-order").exists()
    assert DedupRecord.objects.get(key="running-order").owner.hex == live.owner
