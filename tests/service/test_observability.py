"""Request ids, access metrics by route, and the log formats (service/observability.py), in process."""

from __future__ import annotations

import json
import logging

from service.observability import JsonFormatter, TextFormatter, _route_label
from tests.helpers import data_url, nv_ingest_body, png_bytes
from tests.service.inprocess import InProcessService


def test_a_413_before_routing_is_labelled_with_its_route():
    """The body limit answers before routing: the metrics label comes from the path, when a route has it."""
    service = InProcessService(max_request_bytes=2048)

    async def scenario(client):
        big = nv_ingest_body(data_url(png_bytes()), messages=[{"role": "user", "content": "x" * 4096}])
        assert (await client.post("/v1/chat/completions", json=big)).status_code == 413
        assert (await client.post("/no/such/route", content=b"x" * 4096)).status_code == 413

    service.run(scenario)
    app = service.server.app
    assert _route_label({"path": "/v1/chat/completions", "app": app}) == "/v1/chat/completions"
    assert _route_label({"path": "/no/such/route", "app": app}) == "unmatched"


def test_a_good_request_id_is_echoed_and_a_bad_one_replaced():
    service = InProcessService()

    async def scenario(client):
        kept = await client.get("/v1/health/live", headers={"X-Request-ID": "abc-123"})
        replaced = await client.get("/v1/health/live", headers={"X-Request-ID": "bad id\twith spaces"})
        assert kept.headers["x-request-id"] == "abc-123"
        assert len(replaced.headers["x-request-id"]) == 32

    service.run(scenario)


def test_extra_fields_appear_in_both_formats():
    record = logging.LogRecord("caption.access", logging.INFO, __file__, 1, "POST %s", ("/v1/x",), None)
    record.status, record.request_id = 200, "r1"
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["message"], entry["status"], entry["request_id"], entry["level"]) == ("POST /v1/x", 200, "r1", "INFO")
    assert TextFormatter().format(record).endswith("INFO caption.access: POST /v1/x status=200 request_id=r1")


def test_uvicorn_colours_stay_out_of_the_log():
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (7,), None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "\x1b" not in line and "color_message" not in line
