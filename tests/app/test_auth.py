"""Optional API keys (app/auth.py): probes stay open, everything else needs a valid bearer key."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from app.client import WildPDiffClient, WildPDiffError
from app.settings import Settings
from tests.app.conftest import image_bytes, serve

KEYS = ("key-one-3f9a", "key-two-77c1")


@pytest.fixture(scope="module")
def keyed(make_app):
    with TestClient(make_app(api_keys=f"{KEYS[0]}, {KEYS[1]}")) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_probes_are_open_and_everything_else_needs_a_key(keyed):
    assert keyed.get("/healthz").status_code == 200 and keyed.get("/readyz").status_code == 200
    image = [("images", ("x.png", image_bytes()))]
    for response in (
        keyed.get("/info"),
        keyed.get("/metrics"),
        keyed.get("/openapi.json"),
        keyed.get("/no/such/path"),
        keyed.post("/classify", files=image),
    ):
        assert response.status_code == 401, response.text
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in response.json()["error"]


@pytest.mark.parametrize("header", ["Bearer wrong", f"Basic {KEYS[0]}", f"Bearer {KEYS[0]}x", "Bearer", KEYS[0]])
def test_a_wrong_key_is_refused(keyed, header):
    response = keyed.get("/info", headers={"Authorization": header})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert KEYS[0] not in response.text


def test_every_configured_key_works(keyed):
    for key in KEYS:
        assert keyed.get("/info", headers=bearer(key)).status_code == 200
    response = keyed.post("/classify", files=[("images", ("x.png", image_bytes()))], headers=bearer(KEYS[1]))
    assert response.status_code == 200


def test_openapi_names_the_bearer_scheme(keyed):
    schema = keyed.get("/openapi.json", headers=bearer(KEYS[0])).json()
    scheme = schema["components"]["securitySchemes"]["apiKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"
    assert schema["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_keys_are_never_shown(smoke_store, caplog, keyed):
    settings = Settings(store=smoke_store, api_keys=",".join(KEYS), _env_file=None)
    with caplog.at_level(logging.DEBUG):
        keyed.get("/info", headers=bearer("nope"))
        keyed.get("/info", headers=bearer(KEYS[0]))
    for text in (repr(settings), str(settings.model_dump()), settings.model_dump_json(), caplog.text):
        assert not any(key in text for key in KEYS)


def test_keys_from_a_file(make_app, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# service keys, one per line\n{KEYS[0]}\n\n  {KEYS[1]}  \n")
    with TestClient(make_app(api_keys_file=keys)) as client:
        assert client.get("/info").status_code == 401
        assert all(client.get("/info", headers=bearer(key)).status_code == 200 for key in KEYS)
        assert client.get("/info", headers=bearer("# service keys, one per line")).status_code == 401


def test_an_unusable_keys_file_stops_the_server(make_app, tmp_path):
    with pytest.raises(ValueError, match="api_keys_file: cannot read"):
        make_app(api_keys_file=tmp_path / "missing")
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no keys"):
        make_app(api_keys_file=tmp_path / "empty")


def test_the_client_sends_its_key(make_app, backgrounds):
    with serve(make_app(api_keys=KEYS[0])) as url:
        with WildPDiffClient(url, api_key=KEYS[0]) as client:
            assert client.info()["classes"]
            assert client.generate_adapter(backgrounds[0], steps=2).id
        with WildPDiffClient(url) as client, pytest.raises(WildPDiffError) as refused:
            client.info()
        assert refused.value.status_code == 401
