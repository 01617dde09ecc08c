"""A minimal Kubernetes API client for KPIDefinitions: list, delete, remove our finalizer; and
the login both it and the operator use.

Only `python -m analytics_engine_operator.release` uses the client; the operator itself talks
to the API through kopf. Why a client of our own: kopf has no public API client
(`kopf._cogs.clients` is private and changes between releases), and the `kubernetes` package (a
large generated client plus its dependencies) would enter the image for three kinds of request.
kopf's login functions and `kopf.ConnectionInfo` are public, though, so `login` (the operator's
login handler) and `connection_info` find the credentials the same way (the in-cluster service
account first, then KUBECONFIG or ~/.kube/config), and `ConnectionInfo` supplies the TLS
context and Authorization header.

Errors: `NoCredentials` (neither a service account nor a readable kubeconfig: nothing can log
in), `KubeApiUnavailable` (connection failure, timeout, 429, 5xx: worth retrying) and
`KubeApiError` for every other unexpected answer (401, 403, 422, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import kopf
import yaml

from analytics_engine_operator.kpidefinition import GROUP, PLURAL, VERSION

_BODY_SNIPPET = 300
_JSON_PATCH = "application/json-patch+json"
_FINALIZER_ATTEMPTS = 5

KubeObject = dict[str, Any]


class KubeApiError(Exception):
    """The API server answered something unexpected (or could not be used at all)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeApiUnavailable(KubeApiError):
    """The API server could not be reached, timed out, throttled us or failed (5xx)."""


class NoCredentials(KubeApiError):
    """Neither an in-cluster service account nor a readable kubeconfig: nothing can log in, and
    no retry helps until the environment changes."""


def login(**kwargs: Any) -> kopf.ConnectionInfo:
    """The operator's login (its kopf login handler; `kwargs` as kopf passes them, `settings`
    at least): the in-cluster service account, then the kubeconfig. Raises `NoCredentials`."""
    in_cluster: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return in_cluster if in_cluster is not None else _login_with_kubeconfig(**kwargs)


def connection_info() -> kopf.ConnectionInfo:
    """Credentials by the operator's login order: service account, then kubeconfig.

    In a pod the server is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, as with
    the official clients (kubelet always sets both; kopf's default `kubernetes.default.svc`
    would need the cluster DNS for nothing).
    """
    kopf_settings = kopf.OperatorSettings()
    in_cluster: kopf.ConnectionInfo | None = kopf.login_with_service_account(settings=kopf_settings)
    if in_cluster is not None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if host:
            host = f"[{host}]" if ":" in host else host
            return dataclasses.replace(in_cluster, server=f"https://{host}:{port}")
        return in_cluster
    return _login_with_kubeconfig(settings=kopf_settings)


def _login_with_kubeconfig(**kwargs: Any) -> kopf.ConnectionInfo:
    """kopf's kubeconfig login, with its failures (no kubeconfig, a missing or malformed file)
    as one-line `NoCredentials`."""
    try:
        info: kopf.ConnectionInfo | None = kopf.login_with_kubeconfig(**kwargs)
    except (OSError, LookupError, TypeError, ValueError, yaml.YAMLError, kopf.LoginError) as exc:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NoCredentials(
            f"no Kubernetes credentials: cannot read the kubeconfig ({where}): {reason}"
        ) from exc
    if info is None:
        raise NoCredentials(
            "no Kubernetes credentials: set KUBECONFIG (or write ~/.kube/config), or run in a "
            "cluster (the in-cluster service account)"
        )
    return info


def kpis_path(namespace: str, name: str | None = None) -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{path}/{name}" if name else path


class KubeApi:
    """Async client; use as `async with KubeApi(connection_info(), timeout_s) as api:`."""

    def __init__(self, info: kopf.ConnectionInfo, timeout_s: float) -> None:
        self._info = info
        self._server = info.server.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._info.as_ssl_context()),
            headers={
                **self._info.as_http_headers(),
                "Accept": "application/json",
                "User-Agent": "analytics-engine-kpi-release",
            },
            proxy=self._info.proxy_url,
            trust_env=self._info.trust_env,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_kpis(self, namespace: str, label_selector: str) -> list[KubeObject] | None:
        """The KPIDefinitions matching the selector; None when the CRD is not installed."""
        status, body = await self._request(
            "GET", kpis_path(namespace), params={"labelSelector": label_selector}
        )
        if status == 404:
            return None
        self._expect(status, body, "list KPIDefinitions", 200)
        items = body.get("items") if isinstance(body, Mapping) else None
        return [item for item in items or () if isinstance(item, dict)]

    async def delete_kpi(self, namespace: str, name: str) -> bool:
        """Ask for the deletion (finalizers then hold it); False if it was already gone."""
        status, body = await self._request("DELETE", kpis_path(namespace, name))
        if status == 404:
            return False
        self._expect(status, body, f"delete KPIDefinition {namespace}/{name}", 200, 202)
        return True

    async def remove_finalizer(self, namespace: str, name: str, finalizer: str) -> bool:
        """Remove `finalizer`, and only it; False if the object or the finalizer is gone.

        A JSON patch that `test`s the entry it removes: a concurrent change of the list (the
        operator releasing it at the same moment) fails the patch with 422, and it is retried
        on a fresh copy rather than removing someone else's finalizer.
        """
        for _ in range(_FINALIZER_ATTEMPTS):
            status, body = await self._request("GET", kpis_path(namespace, name))
            if status == 404:
                return False
            self._expect(status, body, f"get KPIDefinition {namespace}/{name}", 200)
            meta = body.get("metadata") if isinstance(body, Mapping) else None
            finalizers = (meta or {}).get("finalizers") or []
            if finalizer not in finalizers:
                return False
            index = finalizers.index(finalizer)
            patch = [
                {"op": "test", "path": f"/metadata/finalizers/{index}", "value": finalizer},
                {"op": "remove", "path": f"/metadata/finalizers/{index}"},
            ]
            status, body = await self._request(
                "PATCH", kpis_path(namespace, name), json_body=patch, content_type=_JSON_PATCH
            )
            if status == 404:
                return False
            if status not in (409, 422):
                self._expect(status, body, f"patch KPIDefinition {namespace}/{name}", 200)
                return True
        raise KubeApiError(
            f"the finalizers of KPIDefinition {namespace}/{name} kept changing; gave up after "
            f"{_FINALIZER_ATTEMPTS} attempts"
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content_type: str | None = None,
    ) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("KubeApi is used outside `async with`")
        headers = {"Content-Type": content_type} if content_type else {}
        data = json.dumps(json_body) if json_body is not None else None
        try:
            async with self._session.request(
                method,
                f"{self._server}{path}",
                params=params,
                data=data,
                headers=headers,
                timeout=self._timeout,
            ) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeApiUnavailable(f"{method} {self._server}{path}: {exc!r}") from exc
        if status == 429 or status >= 500:
            raise KubeApiUnavailable(
                f"{method} {path}: HTTP {status}: {text[:_BODY_SNIPPET]}", status
            )
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = text
        return status, body

    @staticmethod
    def _expect(status: int, body: Any, what: str, *expected: int) -> None:
        if status in expected:
            return
        message = body.get("message") if isinstance(body, Mapping) else body
        raise KubeApiError(f"cannot {what}: HTTP {status}: {str(message)[:_BODY_SNIPPET]}", status)
