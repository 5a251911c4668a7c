"""A small async Kubernetes REST client on aiohttp, authenticated with kopf's ConnectionInfo.

kopf watches; this client creates and patches children, reads pods and writes status and the leader
Lease. It is deliberately tiny: JSON in, JSON out, ApiError on >= 400, one re-login on 401.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer: .status (int), .reason ('NotFound', 'AlreadyExists', ...), .message."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.status = status
        details = body if isinstance(body, dict) else {}
        self.reason = details.get("reason", "")
        self.message = details.get("message", body if isinstance(body, str) else "")
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    context = ssl.create_default_context()
    if info.ca_path:
        context.load_verify_locations(cafile=info.ca_path)
    elif info.ca_data:
        data = info.ca_data.decode() if isinstance(info.ca_data, bytes) else info.ca_data
        try:
            context.load_verify_locations(cadata=base64.b64decode(data).decode())
        except ValueError:
            context.load_verify_locations(cadata=data)
    if info.certificate_data and info.private_key_data:
        _load_client_pem(context, _pem(info.certificate_data), _pem(info.private_key_data))
    elif info.certificate_path and info.private_key_path:
        context.load_cert_chain(info.certificate_path, info.private_key_path)
    return context


def _pem(data: str | bytes) -> bytes:
    """PEM text from a kubeconfig's *-data field (base64 of the PEM, or the PEM itself)."""
    raw = data if isinstance(data, bytes) else data.encode()
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw


def _load_client_pem(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """Load a client certificate and key held in memory. ssl reads them only from files, so they exist
    just for load_cert_chain: readable by this user only (0600), in a private temporary directory (0700)
    that is removed right after, whether loading worked or not."""
    with tempfile.TemporaryDirectory(prefix="lora-operator-tls-") as folder:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(folder, name)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
                handle.write(data)
            paths.append(path)
        context.load_cert_chain(*paths)


# Seconds one request may take: the API server answers in milliseconds, so this only ends a hung connection.
REQUEST_TIMEOUT = 30.0
# Connections kept to the API server: room for the poller's concurrent refreshes (poller.py) plus the
# reconciles of kopf's handlers, without one connection per job.
MAX_CONNECTIONS = 50


class ApiClient:
    """`login()` returns a kopf.ConnectionInfo; it is called again once when the server answers 401."""

    def __init__(self, login: Callable[[], Any], timeout: float = REQUEST_TIMEOUT):
        self._login = login
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._info: Any = None

    async def _ensure(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._info = self._login()
            if self._info is None:
                raise RuntimeError("no Kubernetes credentials: no in-cluster service account and no KUBECONFIG")
            headers = {"Accept": "application/json", "User-Agent": "lora-operator"}
            if self._info.token:
                headers["Authorization"] = f"Bearer {self._info.token}"
            elif self._info.username and self._info.password:
                auth = base64.b64encode(f"{self._info.username}:{self._info.password}".encode()).decode()
                headers["Authorization"] = f"Basic {auth}"
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self._info), limit=MAX_CONNECTIONS)
            self._session = aiohttp.ClientSession(
                base_url=None, headers=headers, connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout)
            )
        return self._session

    @property
    def server(self) -> str:
        return self._info.server.rstrip("/") if self._info else ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        for attempt in (1, 2):
            session = await self._ensure()
            url = self.server + path + ("?" + urlencode(query) if query else "")
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if data is not None else {}
            async with session.request(method, url, data=data, headers=headers) as response:
                raw = await response.text()
                status = response.status
            if status == 401 and attempt == 1:
                await self.close()  # credentials expired (rotated token): log in again, once
                continue
            try:
                decoded = json.loads(raw) if raw else {}
            except ValueError:
                decoded = raw
            if status >= 400:
                raise ApiError(method, path, status, decoded)
            return decoded
        raise AssertionError("unreachable")

    async def get(self, path: str, **query: Any) -> Any:
        return await self.request("GET", path, query=query or None)

    async def create(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("POST", path, body)

    async def replace(self, path: str, body: dict[str, Any]) -> Any:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, patch: Any) -> Any:
        """A JSON merge patch (RFC 7386)."""
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str | None = "Background") -> Any:
        body = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if propagation:
            body["propagationPolicy"] = propagation
        return await self.request("DELETE", path, body)


def core_path(plural: str, namespace: str | None = None, name: str | None = None) -> str:
    path = "/api/v1" + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    return path + (f"/{name}" if name else "")


def group_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    path = f"/apis/{api_version}" + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    return path + (f"/{name}" if name else "")
