"""The Demo UI in a real headless Chromium (Debian's `chromium` package driven by Playwright),
against the gateway and every business service on real Redis and PostgreSQL: connect with a key,
watch a KPI card update live, create a KPI through the form (server validation errors shown next
to the fields first), see it appear; screenshots go to `test-artifacts/`.

Playwright never downloads a browser here: it launches /usr/bin/chromium. Its sync API refuses
to run inside an asyncio loop, so the services run on a loop in a background thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from gateway_stack import ADMIN_KEY, ThreadedStack, kpi_definition, repo_root

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = repo_root() / "test-artifacts"
NO_VALUE = "\u2013"  # what a card shows before its first value

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"
)


@pytest.fixture
def browser_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    monkeypatch.setenv("PLAYWRIGHT_BROWSERS_PATH", str(tmp_path / "no-browsers"))
    ARTIFACTS.mkdir(exist_ok=True)
    yield


def api(base: str, method: str, path: str, body: Any = None) -> requests.Response:
    return requests.request(
        method,
        f"{base}{path}",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )


def test_dashboard_updates_live_and_creates_a_kpi(
    redis_url: str, database_url: str, browser_env: None
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with ThreadedStack(
        redis_url=redis_url,
        database_url=database_url,
        service_overrides={
            "simulator": {"rate": 150.0, "heartbeat_interval_s": 1.0},
            **{
                name: {"heartbeat_interval_s": 1.0}
                for name in ("database", "metadata", "calculation", "observability")
            },
        },
        gateway={"heartbeat_interval_s": 1.0},
    ) as threaded:
        base = threaded.base
        seeded = kpi_definition(
            "orders_by_region",
            display_name="Orders by region",
            group_by=["region"],
            window={"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            thresholds={"warning": 20, "critical": 10, "direction": "below"},
        )
        defs = "/api/v1/kpi-definitions"
        assert api(base, "PUT", f"{defs}/orders_by_region", seeded).status_code == 201
        revenue = kpi_definition(
            "orders_revenue",
            display_name="Revenue",
            aggregation="sum",
            field="amount",
            filter="status != 'cancelled'",
            unit="EUR",
            window={"type": "tumbling", "size": "2s", "allowed_lateness": "0s"},
            thresholds={"warning": 500, "critical": 200, "direction": "below"},
        )
        assert api(base, "PUT", f"{defs}/orders_revenue", revenue).status_code == 201
        assert api(base, "POST", "/api/v1/simulator/start").status_code == 200

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(base + "/")
                dialog = page.locator("#key-dialog")
                expect(dialog).to_be_visible()
                page.fill("#key-input", "wrong-key-0123456789")
                page.click("#key-form button[type=submit]")
                expect(page.locator("#key-error")).to_contain_text("not valid")
                page.fill("#key-input", ADMIN_KEY)
                page.click("#key-form button[type=submit]")
                expect(dialog).to_be_hidden()

                # a card updates live over SSE
                card = page.locator('[data-kpi="orders_by_region"]')
                expect(card).to_be_visible()
                expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
                expect(card.locator("[data-role=value]")).not_to_have_text(NO_VALUE, timeout=15_000)
                first_window = card.locator("[data-role=window]").inner_text()
                expect(card.locator("[data-role=window]")).not_to_have_text(
                    first_window, timeout=15_000
                )
                expect(card.locator(".breakdown li").first).to_be_visible()
                assert card.locator("svg.chart path.line").count() == 1
                page.wait_for_timeout(4000)  # a few more windows for the trend lines
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

                # create a KPI through the form: first invalid, then fixed
                page.click('button[data-view="definitions"]')
                page.click("#new-kpi")
                form = page.locator("#kpi-form")
                expect(form).to_be_visible()
                form.locator("[name=code]").fill("sensor_max_temp")
                form.locator("[name=display_name]").fill("Hottest sensor")
                form.locator("[name=entity_type]").select_option("sensor")
                form.locator("[name=aggregation]").select_option("max")
                form.locator('[name="window.size"]').fill("2s")
                form.locator('[name="window.allowed_lateness"]').fill("0s")
                form.locator('[name="thresholds.warning"]').fill("60")
                form.locator('[name="thresholds.critical"]').fill("50")  # wrong for "above"
                form.locator("[name=unit]").fill("°C")
                form.locator("#form-save").click()
                critical_error = form.locator('small[data-error-for="thresholds.critical"]')
                expect(critical_error).to_contain_text("warning")
                expect(form.locator('[name="thresholds.critical"]')).to_have_class("invalid")

                form.locator('[name="thresholds.critical"]').fill("80")
                form.locator("#form-save").click()
                field_error = form.locator('small[data-error-for="field"]')
                expect(field_error).to_contain_text("required")
                expect(critical_error).to_have_text("")
                expect(form.locator("[name=field]")).to_have_class("invalid")
                page.screenshot(path=str(ARTIFACTS / "kpi-form-errors.png"), full_page=True)

                form.locator("[name=field]").fill("temperature")
                form.locator("#form-save").click()
                expect(form).to_be_hidden()
                row = page.locator('#definitions-table tr[data-code="sensor_max_temp"]')
                expect(row).to_contain_text("Hottest sensor")
                expect(row).to_contain_text("max(temperature)")

                page.click('button[data-view="dashboard"]')
                new_card = page.locator('[data-kpi="sensor_max_temp"]')
                expect(new_card).to_be_visible()
                expect(new_card.locator("[data-role=value]")).not_to_have_text(
                    NO_VALUE, timeout=20_000
                )

                # platform view: simulator state and services
                page.click('button[data-view="platform"]')
                expect(page.locator("#sim-state")).to_have_text("running")
                expect(page.locator("#services-table tbody tr").first).to_be_visible()
                expect(page.locator("#dead-letters-table tbody")).to_contain_text("No dead letters")
                page.screenshot(path=str(ARTIFACTS / "platform.png"), full_page=True)

                # Redis unreachable: the status the observability service then gives (its
                # Redis-read parts left out) shows as unknown dead letters, not as none
                degraded = api(base, "GET", "/api/v1/status").json()
                for part in ("dead_letters", "full_streams", "simulation"):
                    degraded.pop(part, None)
                degraded["status"] = "degraded"
                degraded["redis"] = {"reachable": False, "error": "Redis is unreachable: refused"}
                page.route("**/api/v1/status", lambda route: route.fulfill(json=degraded))
                page.click('button[data-view="dashboard"]')
                page.click('button[data-view="platform"]')
                expect(page.locator("#health-summary")).to_have_text("Redis unreachable")
                expect(page.locator("#dead-letters-table tbody")).to_contain_text(
                    "Unknown: Redis is unreachable: refused"
                )
                page.unroute("**/api/v1/status")

                page.emulate_media(color_scheme="dark")
                page.click('button[data-view="dashboard"]')
                page.wait_for_timeout(500)
                page.screenshot(path=str(ARTIFACTS / "dashboard-dark.png"), full_page=True)

                # the API docs page renders the OpenAPI document (no CDN, our own renderer)
                page.goto(base + "/api/v1/docs#putKpiDefinition")
                operations = page.locator("details.op")
                expect(operations.first).to_be_visible()
                assert operations.count() >= 20
                expect(page.locator("#putKpiDefinition")).to_have_attribute("open", "")
                page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
                assert not errors, errors
            finally:
                browser.close()
        stored = api(base, "GET", "/api/v1/kpi-definitions/sensor_max_temp").json()
        assert stored["field"] == "temperature"
        assert stored["thresholds"]["critical"] == 80
    assert os.path.getsize(ARTIFACTS / "dashboard.png") > 10_000
