"""The committed OpenAPI document of the HTTP gateway matches the code; every refusal code has
an HTTP status."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from contracts.commands import Submission
from contracts.errors import ErrorCode
from services.gateway.app import REF, REFUSAL_STATUS, render_openapi

OPENAPI = Path(__file__).resolve().parents[2] / "contracts" / "openapi.json"
REGENERATE = "regenerate with: duban gateway openapi --out contracts/openapi.json"


def test_committed_openapi_matches_the_code() -> None:
    assert OPENAPI.exists(), f"{OPENAPI} is missing; {REGENERATE}"
    assert OPENAPI.read_text("utf-8") == render_openapi(), (
        f"{OPENAPI} is out of date with services/gateway or the contracts; {REGENERATE}"
    )


def test_the_request_body_is_the_submission_schema() -> None:
    doc = json.loads(render_openapi())
    _, components = msgspec.json.schema_components([Submission], ref_template=REF)
    for name, schema in components.items():
        assert doc["components"]["schemas"][name] == json.loads(json.dumps(schema)), name
    for role, path in (
        ("county", "/v1/counties/{county_code}/submissions"),
        ("city", "/v1/city/counties/{county_code}/submissions"),
        ("province", "/v1/province/counties/{county_code}/submissions"),
    ):
        post = doc["paths"][path]["post"]
        assert post["operationId"] == f"submit_{role}"
        assert post["requestBody"]["content"]["application/json"]["schema"] == {"$ref": REF.format(name="Submission")}
        assert post["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": REF.format(name="Accepted")
        }
        assert post["security"] == [{"token": []}]
    assert "HTTPValidationError" not in json.dumps(doc)


def test_every_refusal_code_has_an_http_status() -> None:
    assert set(REFUSAL_STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in REFUSAL_STATUS.values())
