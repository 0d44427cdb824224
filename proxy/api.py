"""`ANY /proxy/{group}/{path}`: the django-ninja async operation that serves the proxy.

The proxy's ASGI handler (`proxy.handler`) splits `{group}` and `{path}` off the URL
itself and hands them over on the request: declared as ninja path parameters, they went
through a pydantic model on every call, a tenth of the event loop's time under load.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from ninja import NinjaAPI

from proxy.pipeline import proxy


class ProxyAPI(NinjaAPI):
    def create_temporal_response(self, request: HttpRequest) -> HttpResponse:
        # Ninja makes one per call for operations that take a `response` argument; the
        # proxy's does not, and always answers with its own response object.
        return UNUSED_RESPONSE


UNUSED_RESPONSE = HttpResponse()
api = ProxyAPI(urls_namespace="proxy", docs_url=None, openapi_url=None, title="gptload proxy")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


@api.api_operation(METHODS, "/", include_in_schema=False)
async def proxy_call(request: HttpRequest) -> HttpResponseBase:
    group, path = request.proxy_route  # type: ignore[attr-defined]
    return await proxy(request, group, path)
