"""Following a real run (tiny model) as its users do, at the same time: `tunedrop drop FILE --wait` prints
progress through validation, training (steps, loss, time left) and deployment, then how to ask the model;
the status page, in a real headless Chromium, shows the run advance to deployed without a reload, its loss
plot, and answers a question streamed from the model."""

from __future__ import annotations

import re
import threading
import time

import pytest
from click.testing import CliRunner

from shared import runs
from tests.surfaces.conftest import conversations
from tests.waiting import wait_for
from tunedrop.cli import cli

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    """Debian's Chromium, headless, through Selenium and Debian's chromedriver (`make setup` installs both)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_run_followed_by_drop_wait_and_on_the_status_page_in_a_real_browser(served, browser, tmp_path, monkeypatch,
                                                                               request):
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("TUNEDROP_API_URL", served.base_url)
    dataset = tmp_path / "followed.jsonl"
    dataset.write_bytes(conversations(24))
    waited = {}

    def drop_and_wait():  # 300 steps (about 4 s of tiny-random), so that the once-a-second progress sees some
        waited["result"] = CliRunner().invoke(cli, ["drop", str(dataset), "--set", "max_steps=300", "--set",
                                                    "num_train_epochs=300", "--wait", "--timeout", "240"])
    follower = threading.Thread(target=drop_and_wait)
    follower.start()
    store = runs.RunStore.from_settings(served.settings)
    run = wait_for(lambda: next((r for r in store.list() if r.dataset_blob == "followed.jsonl"), None), 60, "the run")

    opened = time.monotonic()
    browser.get(f"{served.base_url}/api/status#key={served.key}&run={run.run_id}")
    wait_for(lambda: browser.find_element(By.ID, "d-id").text == run.run_id, 20, "the run shown")
    loaded_s = time.monotonic() - opened
    assert served.key not in browser.current_url  # the key leaves the address bar at once
    browser.execute_script("window.notReloaded = true")
    seen = []

    def state_shown():
        state = browser.find_element(By.ID, "d-state").text
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "deployed"
    wait_for(state_shown, 240, "deployed on the page")
    assert browser.execute_script("return window.notReloaded") is True  # it moved by itself, without a reload
    assert len(seen) >= 2 and seen[0] != "deployed", seen  # the page saw it before it was deployed

    points = browser.find_element(By.ID, "train-loss").get_attribute("points").split()
    assert len(points) >= 10 and len(browser.find_elements(By.CSS_SELECTOR, "circle.eval-loss")) == 2
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys("What is 3 plus 3?")
    browser.find_element(By.ID, "ask").click()
    wait_for(lambda: browser.find_element(By.ID, "answer").get_attribute("data-done") == "true", 60, "an answer")
    assert browser.find_element(By.ID, "answer").text.strip()
    assert "first token" in browser.find_element(By.ID, "asktime").text
    browser.save_screenshot(str(tmp_path / "status-page.png"))
    request.node.user_properties.append(("page_load_s", round(loaded_s, 2)))

    follower.join(240)
    result = waited["result"]
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert f"Run id: {run.run_id}" in lines
    steps = [line for line in lines if line.startswith("training (training): step")]
    assert steps and all(re.fullmatch(r"training \(training\): step \d+/300(, loss [\d.]+, ~(\d+ min )?\d+ s left)?", line)
                         for line in steps), lines
    deploying = next(i for i, line in enumerate(lines) if line.startswith("deploying"))
    assert lines.index(steps[0]) < deploying
    assert f"Ask it:   tunedrop score {run.run_id}" in result.output and "/api/v1" in result.output
    run = store.find(run.run_id)
    assert run.state == runs.DEPLOYED and f"{run.model_name}:{run.model_version}" in result.output
