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


def choose_action(browser, pks, action):
    """Tick the records *pks*, run *action* ("release" or "forget"): its confirmation opens."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    for pk in pks:
        checkbox = browser.find_element(
            By.CSS_SELECTOR, f"input[name=_selected_action][value='{pk}']"
        )
        checkbox.click()
        assert checkbox.is_selected()
    Select(browser.find_element(By.NAME, "action")).select_by_value(f"{action}_records")
    browser.find_element(By.CSS_SELECTOR, "div.actions [type=submit]").click()  # "Go" / "Run"
    WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.ID, f"{action}-records"),
        f"the {action} confirmation page did not open",
    )


def confirm_action(browser, label):
    """Press the confirmation's *label* button; the changelist comes back with messages."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.CSS_SELECTOR, f"form input[type=submit][value={label}]").click()
    WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.CSS_SELECTOR, "ul.messagelist"),
        f"the changelist did not come back after {label}",
    )


def log_in_and_open_the_changelist(browser, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    User.objects.create_superuser("operator", "op@example.com", "correct horse")
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


def test_an_operator_filters_and_releases_an_expired_processing_record(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    backend = get_backend()
    expired = claim_for("shop.place", "stuck-order", lease=0.2)
    live = claim_for("shop.place", "running-order", lease=600)
    done = claim_for("shop.place", "done-order")
    for claim in (expired, live, done):
        backend.claim(claim)
    backend.complete(done, None)
    time.sleep(0.4)

    log_in_and_open_the_changelist(browser, live_server)
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
    pks = [DedupRecord.objects.get(key=key).pk for key in ("stuck-order", "running-order")]
    choose_action(browser, pks, "release")
    assert expired.owner in browser.page_source  # the owner the release compares against
    assert live.owner in browser.page_source
    shot(browser, "3-confirm")
    confirm_action(browser, "Release")
    shot(browser, "4-released")
    assert "1 record(s) released" in browser.page_source
    assert "1 record(s) not released" in browser.page_source  # the live lease, refused
    assert not DedupRecord.objects.filter(key="stuck-order").exists()
    assert DedupRecord.objects.get(key="running-order").owner.hex == live.owner


BADGE_COLOURS = {
    "processing": "rgba(47, 111, 179, 1)",
    "consumed": "rgba(46, 125, 79, 1)",
    "failed": "rgba(178, 106, 0, 1)",
    "poisoned": "rgba(179, 38, 30, 1)",
}


def a_shop_of_records():
    """Records of every status, long task names and keys, duplicates and a poisoned one."""
    backend = get_backend()
    long_task = "shop.fulfilment.tasks.reserve_inventory_for_marketplace_order"
    for n in range(6):
        made = claim_for(long_task, f"marketplace-order-{n:04d}-" + "x" * 60, lease=600)
        backend.claim(made)
        if n % 2:
            backend.complete(made, {"reserved": n})
            backend.claim(claim_for(long_task, made.key, task_id=f"copy-{n}"))
    failing = claim_for("shop.mail.send_receipt", "receipt-17")
    backend.claim(failing)
    backend.fail(failing)
    stuck = claim_for("shop.pay.capture", "payment-9", lease=0.2, cap=0)
    backend.claim(stuck)
    time.sleep(0.4)
    backend.claim(claim_for("shop.pay.capture", "payment-9", cap=0))  # poisons it
    done = claim_for("shop.mail.send_receipt", "receipt-18")
    backend.claim(done)
    backend.complete(done, None)
    return done


def test_the_changelist_fits_the_overview_shows_and_a_record_is_forgotten(live_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    done = a_shop_of_records()
    log_in_and_open_the_changelist(browser, live_server)
    shot(browser, "5-badges")
    # 1400 px wide, and nothing scrolls sideways: long names and keys are cut, whole on hover.
    assert browser.execute_script("return window.innerWidth") == 1400
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    results = browser.find_element(By.CSS_SELECTOR, "#changelist .results")
    assert browser.execute_script(
        "return arguments[0].scrollWidth <= arguments[0].clientWidth", results
    )
    for status, colour in BADGE_COLOURS.items():
        badge = browser.find_element(By.CSS_SELECTOR, f".dedup-badge--{status}")
        assert badge.value_of_css_property("background-color") == colour
    leases = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "td.field-lease")]
    assert "9 minutes left" in leases  # the 600 s leases, in words
    assert "—" in leases  # finished records have no lease: the one placeholder

    browser.find_element(By.CSS_SELECTOR, "a.dedup-overview-link").click()
    WebDriverWait(browser, 10).until(
        lambda driver: driver.find_elements(By.ID, "dedup-overview"), "the overview did not open"
    )
    shot(browser, "6-overview")
    rows = browser.find_elements(By.CSS_SELECTOR, "#dedup-overview tbody tr")
    assert len(rows) == 3  # three task names
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.dedup-chart rect")) == 24 * 4
    tallest = [
        float(rect.get_attribute("height"))
        for rect in browser.find_elements(By.CSS_SELECTOR, "tfoot svg.dedup-chart rect")
    ]
    assert (tallest[-1], sum(tallest[:-1])) == (40, 0)  # every record was made this hour
    poisoned = browser.find_element(
        By.CSS_SELECTOR, "#dedup-overview tbody a .dedup-badge--poisoned"
    )
    assert poisoned.text == "1"
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )

    browser.get(f"{live_server.url}/admin/dedup_celery/deduprecord/?status__exact=consumed")
    choose_action(browser, [DedupRecord.objects.get(key=done.key).pk], "forget")
    assert done.owner in browser.page_source
    shot(browser, "7-forget-confirm")
    confirm_action(browser, "Forget")
    shot(browser, "8-forgotten")
    assert "1 record(s) forgotten" in browser.page_source
    assert not DedupRecord.objects.filter(key=done.key).exists()

    # The detail page: four groups, the status as its badge, the owner as 32 hex digits.
    duplicated = DedupRecord.objects.filter(skipped__gt=0).first()
    browser.get(f"{live_server.url}/admin/dedup_celery/deduprecord/{duplicated.pk}/change/")
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "fieldset h2")]
    assert headings == ["Message", "Ownership and lease", "Duplicates and takeovers", "Result"]
    assert browser.find_element(By.CSS_SELECTOR, ".field-status_badge .dedup-badge--consumed")
    assert duplicated.owner.hex in browser.page_source
    assert duplicated.last_duplicate_task_id in browser.page_source
    shot(browser, "9-detail")
