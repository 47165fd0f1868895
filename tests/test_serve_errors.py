"""How failures on the way to the router reach the client: OpenAI error bodies with the status a
client can act on (retry after a while, fix the request, wait for readiness)."""
from __future__ import annotations

import pickle

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.ingress import as_api_error
from deployments.router import RouterBusyError


def test_statuses_and_bodies():
    busy = as_api_error(pickle.loads(pickle.dumps(RouterBusyError("full", 3))))
    assert (busy.status, busy.headers, busy.body()["error"]["code"]) == (429, {"Retry-After": "3"}, "queue_full")
    assert as_api_error(BackPressureError(num_queued_requests=5, max_queued_requests=5)).status == 429
    assert as_api_error(DeploymentUnavailableError("Router")).status == 503
    bad = as_api_error(ValueError("the prompt is empty"))
    assert bad.status == 400 and bad.body() == {"error": {"message": "the prompt is empty",
                                                          "type": "invalid_request_error", "param": None,
                                                          "code": None}}
    assert as_api_error(RuntimeError("boom")).status == 500
