"""A small Kubernetes REST client (standard library only) for the node agent and the tests.

It speaks JSON over HTTPS with a client certificate; every call has a timeout. Watches are plain
generators that end when the server closes the stream; callers reconnect.
"""

import http.client
import json
import ssl
import urllib.parse

PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
}


class ApiError(Exception):
    """A non-2xx answer; .status (int), .reason ('NotFound', 'Conflict'...), .message, .body."""

    def __init__(self, method, path, status, body):
        self.status = status
        self.body = body
        details = body if isinstance(body, dict) else {}
        self.reason = details.get("reason", "")
        self.message = details.get("message", body if isinstance(body, str) else "")
        super().__init__(f"{method} {path}: {status} {self.reason}: {self.message}")


def resource_path(api_version, plural, namespace=None, name=None, subresource=None):
    """'/api/v1/namespaces/ns/pods/x/status' style paths for core and group APIs."""
    parts = ["api" if "/" not in api_version else "apis", api_version]
    if namespace:
        parts += ["namespaces", namespace]
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/" + "/".join(parts)


class KubeClient:
    def __init__(self, server, ca_file, cert_file, key_file, timeout=30):
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname, url.port or 443
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.context.load_cert_chain(str(cert_file), str(key_file))

    def _connection(self, timeout):
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def request(self, method, path, body=None, query=None, content_type="application/json", timeout=None):
        """Send one request; returns the decoded JSON body (or text), raises ApiError on >= 400."""
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        conn = self._connection(timeout or self.timeout)
        try:
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            decoded = json.loads(raw) if raw else {}
        except ValueError:
            decoded = raw
        if resp.status >= 400:
            raise ApiError(method, path, resp.status, decoded)
        return decoded

    def get_raw(self, path):
        return self.request("GET", path)

    def get(self, path, **query):
        return self.request("GET", path, query=query or None)

    def create(self, path, obj):
        return self.request("POST", path, obj)

    def replace(self, path, obj):
        return self.request("PUT", path, obj)

    def patch(self, path, patch, patch_type="merge"):
        return self.request("PATCH", path, patch, content_type=PATCH_TYPES[patch_type])

    def delete(self, path, grace_period_seconds=None, uid=None, propagation_policy=None):
        options = {"kind": "DeleteOptions", "apiVersion": "v1"}
        if grace_period_seconds is not None:
            options["gracePeriodSeconds"] = grace_period_seconds
        if uid:
            options["preconditions"] = {"uid": uid}
        if propagation_policy:
            options["propagationPolicy"] = propagation_policy
        return self.request("DELETE", path, options)

    def watch(self, path, resource_version, timeout_seconds=60, **query):
        """Yield (event_type, object) from a watch; returns when the server ends the stream.

        An ERROR event (e.g. 410 Gone: resourceVersion too old) is raised as ApiError.
        """
        query.update(
            watch="1", resourceVersion=resource_version, timeoutSeconds=timeout_seconds, allowWatchBookmarks="true"
        )
        url = path + "?" + urllib.parse.urlencode(query)
        conn = self._connection(timeout_seconds + 15)  # a silent server cannot hang the caller
        try:
            conn.request("GET", url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError("WATCH", path, resp.status, resp.read().decode("utf-8", "replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                event = json.loads(line)
                if event["type"] == "ERROR":
                    status = event["object"]
                    raise ApiError("WATCH", path, status.get("code", 500), status)
                yield event["type"], event["object"]
        finally:
            conn.close()

    def wait_for(self, path, predicate, timeout=30, what=None, interval=0.2):
        """GET `path` until predicate(obj) is truthy; returns the object (TimeoutError otherwise)."""
        from tests.cluster.procs import wait_until

        found = {}

        def check():
            found["obj"] = self.get(path)
            return predicate(found["obj"])

        try:
            wait_until(check, timeout, what or f"{path} to match", interval)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last object: {found.get('obj')}") from None
        return found["obj"]

    def wait_gone(self, path, timeout=30):
        """Wait until GET `path` answers 404."""
        from tests.cluster.procs import wait_until

        def gone():
            try:
                self.get(path)
            except ApiError as e:
                return e.status == 404
            return False

        wait_until(gone, timeout, f"{path} to be deleted")
