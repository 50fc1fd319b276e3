"""Who may use the HTTP server: the API key on every endpoint but /health, and /update_weights
loading only under the weights root, without telling what any directory holds."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server import MODEL, expected, make_server, tokenizer  # noqa: F401 - tokenizer is a fixture

from miles_fsdp.engine.sequence import Request, SamplingParams
from miles_fsdp.engine.remote import RemoteEngine, RemoteEngineError

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def keyed(tokenizer):  # noqa: F811
    _, _, thread = make_server(tokenizer, api_key=KEY)
    with thread as url:
        yield url


@pytest.mark.parametrize("method,path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/generate"), ("POST", "/update_weights"), ("GET", "/v1/models"),
                                         ("GET", "/metrics"), ("GET", "/nope")])
def test_api_key_is_required_everywhere_but_health(keyed, method, path):
    for headers, why in (({}, "no API key given"), ({"Authorization": "Bearer wrong"}, "the API key is wrong"),
                         ({"Authorization": KEY}, "the API key is wrong")):  # the scheme is part of it
        r = httpx.request(method, f"{keyed}{path}", json={}, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert err["message"].startswith(why) and "Authorization: Bearer" in err["message"]
    assert httpx.get(f"{keyed}/health", timeout=10).json()["status"] == "ok"  # open to load balancers


def test_api_key_with_the_openai_client_and_metrics(keyed):
    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, timeout=20, max_retries=0)
    out = good.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert out.choices[0].text == expected(list(b"hi"), 3)
    with pytest.raises(openai.AuthenticationError, match="wrong"):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="nope", max_retries=0).completions.create(
            model=MODEL, prompt="hi", max_tokens=3)
    text = httpx.get(f"{keyed}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    assert 'miles_http_requests_total{endpoint="/v1/completions",status="401"}' in text  # refusals are counted


def test_remote_engine_sends_miles_api_key(keyed, monkeypatch):
    req = Request([100], SamplingParams(max_new_tokens=2, seed=0))
    monkeypatch.delenv("MILES_API_KEY", raising=False)
    with RemoteEngine([keyed], timeout_s=20, wait_s=0) as client, \
            pytest.raises(RemoteEngineError, match=r"HTTP 401: no API key given"):  # /health needs no key
        client.generate([req])
    monkeypatch.setenv("MILES_API_KEY", KEY)
    with RemoteEngine([keyed], timeout_s=20, wait_s=0) as client:
        assert bytes(client.generate([req])[0][0].token_ids).decode() == expected([100], 2)


def test_update_weights_loads_only_under_the_weights_root(tokenizer, tmp_path):  # noqa: F811
    root, outside = tmp_path / "root", tmp_path / "outside"
    for d in (root / "v1", outside):
        d.mkdir(parents=True)
        (d / "w.json").write_text(json.dumps({"shift": 3}))
    (outside / "secret_name.txt").write_text("x")
    (root / "link").symlink_to(outside)
    engine, _, thread = make_server(tokenizer, weights_root=root)
    with thread as url:
        def post(path: str) -> httpx.Response:
            return httpx.post(f"{url}/update_weights", json={"path": str(path), "version": 1}, timeout=10)

        for path in (outside, root / "link", f"{root}/../outside", "/root", "/"):
            r = post(path)
            err = r.json()["error"]
            assert r.status_code == 403 and err["param"] == "path", r.text
            assert "outside this server's weights root" in err["message"] and "--weights-root" in err["message"]
            assert "secret_name" not in err["message"]
        assert engine.shift == 0  # nothing was loaded
        r = post(root / "missing")
        assert r.status_code == 400 and "is not a directory" in r.json()["error"]["message"]
        (root / "loop").symlink_to(root / "loop")
        r = post(root / "loop")
        assert r.status_code == 400 and "cannot resolve" in r.json()["error"]["message"]
        r = post(root / "v1")
        assert r.status_code == 200 and engine.shift == 3
    _, _, thread = make_server(tokenizer)  # no root: no path at all
    with thread as url:
        r = httpx.post(f"{url}/update_weights", json={"path": str(root / "v1"), "version": 1}, timeout=10)
        assert r.status_code == 403 and "started without --weights-root" in r.json()["error"]["message"]
