"""The README's table of limits and failures is true: every row is provoked here (in process) and
answers with the status and `error.code` the row names; a row without a way to provoke it fails."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from litserve.utils import WorkerSetupStatus

from tests.helpers import ROOT, data_url, nv_ingest_body, png_bytes
from tests.service.inprocess import InProcessService

KEY = "readme-key"
IMAGE = data_url(png_bytes(64, 48))
WIDE = data_url(png_bytes(640, 480))  # 13 tiles: 3,330 prompt tokens


def readme_rows() -> dict[str, tuple[int | None, str]]:
    """Situation -> (status, code) from the README's table of limits and failures."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| Situation | Status |"):].split("\n\n", 1)[0].splitlines()[2:]
    rows = {}
    for line in table:
        situation, status, code = (cell.strip() for cell in line.strip("|").split("|")[:3])
        number = re.match(r"\d{3}", status)
        rows[situation] = (int(number.group()) if number else None, code.strip("`"))
    return rows


def body(**overrides) -> dict:
    return nv_ingest_body(IMAGE, **overrides)


def with_images(*urls: str) -> dict:
    content = [{"type": "text", "text": "Caption these:"}] + [{"type": "image_url", "image_url": {"url": u}}
                                                              for u in urls]
    return body(messages=[{"role": "user", "content": content}])


def failing_prefill(error: Exception) -> Callable:
    def prepare(service: InProcessService) -> None:
        runner = service.api.engine.runner

        def prefill(chunks):
            runner.prefill = original  # fails once
            raise error

        original = runner.prefill
        runner.prefill = prefill
    return prepare


# How each row is provoked: settings, steps before and while requests run, and the request.
CASES: dict[str, dict] = {
    "Body over the size limit": dict(settings={"max_request_bytes": 4096}, body=body(stop=["x" * 5000])),
    "Body is not JSON": dict(raw=b"{not json"),
    "Body does not fit the schema": dict(body=body(max_tokens=0)),
    "No user message, image outside a user message": dict(
        body=body(messages=[{"role": "system", "content": "/no_think"}])),
    "Text longer than the limit": dict(settings={"max_prompt_chars": 10}, body=body()),
    "More images than the limit": dict(body=with_images(*[IMAGE] * 5)),
    "More than 1,024 messages": dict(body=body(messages=[{"role": "user", "content": "hi"}] * 1025)),
    "Bad data URL, bad base64": dict(body=with_images("data:image/png;base64,@@@")),
    "Image larger than the pixel limit": dict(settings={"max_image_pixels": 1000}, body=body()),
    "Images of one request larger together": dict(settings={"max_request_pixels": 4000},
                                                  body=with_images(IMAGE, IMAGE)),
    "`http(s)://` image while remote images are off": dict(body=with_images("https://example.com/cat.png")),
    "`max_tokens` over the ceiling": dict(body=body(max_tokens=5000)),
    "Prompt plus `max_tokens` over what one sequence may hold": dict(settings={"max_model_len": 4096},
                                                                     body=with_images(WIDE) | {"max_tokens": 1000}),
    "`min_tokens` over `max_tokens`": dict(body=body(max_tokens=5, min_tokens=6)),
    "`mm_processor_kwargs.max_num_tiles` over the server's tile budget": dict(
        body=body(mm_processor_kwargs={"max_num_tiles": 13})),
    "Text that spells one of the model's special tokens": dict(real_model=True, body=body(
        messages=[{"role": "user", "content": [{"type": "text", "text": "look: <image>"},
                                               {"type": "image_url", "image_url": {"url": IMAGE}}]}])),
    "Missing or wrong key": dict(headers={"Authorization": "Bearer wrong"}, body=body()),
    "`model` names another model": dict(body=body(model="gpt-4o")),
    "More requests in flight": dict(settings={"max_queued_requests": 2, "mock_token_delay": 0.01},
                                    hold=2, body=body()),
    "More open connections than the limit": dict(elsewhere="tests/service/test_connections.py"),
    "A request not received whole in time": dict(elsewhere="tests/service/test_connections.py"),
    "Model still loading, or the service is draining": dict(
        before=lambda s: s.server.workers_setup_status.update(inference_0=WorkerSetupStatus.STARTING), body=body()),
    "The inference worker died": dict(settings={"mock_token_delay": 0.01}, hold=1,
                                      during=lambda s: s.shared.mark_worker_dead()),
    "Out of GPU memory while the request's prompt was being read": dict(
        before=failing_prefill(torch.OutOfMemoryError("CUDA out of memory")), body=body()),
    "Waited and ran longer than the timeout": dict(settings={"request_timeout": 0.3, "mock_token_delay": 0.01},
                                                   body=body(max_tokens=1000, min_tokens=1000, ignore_eos=True)),
    "Unexpected inference failure, isolated to one request": dict(before=failing_prefill(RuntimeError("bug")),
                                                                  body=body()),
}


def case_for(situation: str) -> dict:
    matches = [case for start, case in CASES.items() if situation.startswith(start)]
    assert len(matches) == 1, f"README row {situation!r} has no way to provoke it in {__file__}"
    return matches[0]


def test_every_case_is_a_row_of_the_table():
    rows = readme_rows()
    for start in CASES:
        assert any(situation.startswith(start) for situation in rows), f"no README row starts with {start!r}"


@pytest.mark.parametrize("situation", list(readme_rows()))
def test_the_row_is_true(situation, tiny_path):
    status, code = readme_rows()[situation]
    case = case_for(situation)
    if "elsewhere" in case:
        assert (ROOT / case["elsewhere"]).is_file()  # a server-level limit, proven over real sockets there
        return
    settings = {"NGC_API_KEY": KEY, **case.get("settings", {})}
    if case.get("real_model"):
        settings.update(enable_mock_inference=False, model_id=str(tiny_path), device="cpu", max_batch_size=2)
    service = InProcessService(**settings)

    async def scenario(client):
        if "before" in case:
            case["before"](service)
        long = body(max_tokens=1000, min_tokens=1000, ignore_eos=True)
        holding = await service.started(client, long, case["hold"]) if "hold" in case else []
        headers = case.get("headers", {})
        if "during" in case:
            case["during"](service)
            response = await holding.pop()
        elif "raw" in case:
            response = await client.post("/v1/chat/completions", content=case["raw"],
                                         headers={"Content-Type": "application/json", **headers})
        else:
            response = await client.post("/v1/chat/completions", json=case["body"], headers=headers)
        for future in holding:
            future.cancel()
        return response

    response = service.run(scenario, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code, response.text
