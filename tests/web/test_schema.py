"""The web API against its own /openapi.json, as a third-party client sees it (schemathesis).

Every operation is fuzzed in-process (no sockets) with schema-valid and schema-invalid requests,
a real token and a real job store; schemathesis's own checks judge each answer: status codes and
bodies as documented, valid data accepted, invalid data refused, auth enforced, no 500.
"""
from __future__ import annotations

import json
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ipc import VERSION
from ipc.tokens import mint_token
from tests.web.appkit import SECRET, make_env
from web import openapi

TOKEN = mint_token(SECRET, days=1)  # every app make_env builds trusts SECRET
MAX_EXAMPLES = 25

# The rules of a body that JSON Schema cannot state (web/openapi.py: patterns are what every
# accepted value has): a schema-valid body may still get a 422, but only for one of these reasons.
RULES_BEYOND_THE_SCHEMA = {
    "POST /api/jobs": (
        r"^'model_type' must be a folder under download_dir: ",  # Windows device names, invisible characters
        r"^'url' (must|is not)", r"^the URL's \w+ must be from 1 to", r"in the URL must be a number",
        r"^'file_id' needs 'version_id'", r"does not match the URL's",
    ),
    "POST /api/library/scan": (r"^'folder' must be a folder under download_dir: ",),
    "GET /api/library/preview": (r"^'path': ",),
    "POST /api/manifest": (
        r"field 'model_type': ", r"field 'filename': expected a plain file name",
        r"field '(file_type|format|fp)': expected a string",
    ),
}


class CurrentApp:
    """The WSGI app schemathesis calls: the one the running test built over its own folder."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


current = CurrentApp()
schema = schemathesis.openapi.from_dict(openapi.spec(VERSION), config=SchemathesisConfig.from_dict({
    "base-url": "http://localhost",
    "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
}))
schema.app = current
# gevent-websocket upgrades /ws in the server, before any route runs: in-process there is no
# server to do it. tests/integration/test_web_live.py drives the real handshake.
schema = schema.exclude(path="/ws")


@pytest.fixture
def api_env(tmp_path):
    e = make_env(tmp_path)
    current.app = e.app
    yield e
    current.app = None
    e.close()


def test_the_document_tested_is_the_one_the_app_serves(api_env):
    served = api_env.client.get("/openapi.json")
    assert served.status == 200
    assert json.loads(served.body) == schema.raw_schema


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case, api_env):
    rules = RULES_BEYOND_THE_SCHEMA.get(case.operation.label)
    if rules is None:
        case.call_and_validate()
        return
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    if case.meta is not None and case.meta.generation.mode.is_positive and response.status_code == 422:
        error = response.json()["error"]
        assert any(re.search(rule, error) for rule in rules), (
            f"a schema-valid body was refused for a reason the schema could state: {error}\n"
            f"{case.as_curl_command()}")
    elif case.meta is not None and case.meta.generation.mode.is_positive:
        assert response.status_code < 400 or response.status_code in (401, 403, 404, 409, 503), (
            response.status_code, response.text, case.as_curl_command())
