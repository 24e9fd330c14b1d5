"""service/errors.py: validation errors name the field at fault, without pydantic's union labels."""

from __future__ import annotations


import pytest

from tests.service.inprocess import InProcessService

USER = {"role": "user", "content": "Caption this."}


@pytest.mark.parametrize("overrides, param", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]},
     "messages.0.content.0.image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"messages": [USER], "stop": 5}, "stop"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
])
def test_a_schema_error_names_the_field(overrides, param):
    service = InProcessService()

    async def scenario(client):
        return await client.post("/v1/chat/completions", json=overrides)

    response = service.run(scenario)
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"], error["type"]) == (
        422, param, "invalid_request", "invalid_request_error")
    assert error["message"].startswith(f"Invalid request: '{param}': ")
