"""Shared plumbing for the in-cluster commands: API credentials, logging, and the small HTTP endpoints."""

from __future__ import annotations

import datetime
import http.server
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import kubernetes.client
import kubernetes.config
import prometheus_client
import yaml

from agentlat.operator.model import errors

LOG_LEVELS = ("debug", "info", "warning", "error")
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """In a pod: the ServiceAccount (token refreshed by the client); else ``--kubeconfig``/$KUBECONFIG.
    No usable config is the user's to fix (InputError naming the file), never a client traceback."""
    config = kubernetes.client.Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            kubernetes.config.load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
        except kubernetes.config.ConfigException as exc:
            raise errors.single("in-cluster config", "", str(exc)) from None
        return config
    source, files = _kubeconfig_files(kubeconfig)
    if not any(os.path.isfile(path) for path in files):
        raise errors.single(source, "", _missing(source, files))
    try:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.pathsep.join(files), client_configuration=config)
    except (kubernetes.config.ConfigException, OSError, ValueError, TypeError, AttributeError, KeyError,
            yaml.YAMLError) as exc:  # the loader's own errors on a file that is not a kubeconfig
        reason = " ".join(str(exc).split())  # one line
        raise errors.single(source, "", f"{', '.join(files)} is not a usable kubeconfig: {reason}") from None
    return config


def _kubeconfig_files(kubeconfig: str | None) -> tuple[str, list[str]]:
    """(who named them, the files): --kubeconfig, else $KUBECONFIG (a path list), else ~/.kube/config."""
    if kubeconfig:
        return "--kubeconfig", [os.path.expanduser(kubeconfig)]
    listed = [path for path in os.environ.get("KUBECONFIG", "").split(os.pathsep) if path]
    if listed:
        return "$KUBECONFIG", [os.path.expanduser(path) for path in listed]
    return "", [os.path.expanduser("~/.kube/config")]


def _missing(source: str, files: list[str]) -> str:
    if len(files) > 1:
        return f"none of {', '.join(files)} exists"
    hint = "" if source else ", and this is not a pod: pass --kubeconfig FILE or set $KUBECONFIG"
    return f"{files[0]}: no such file{hint}"


def namespace(kubeconfig: str | None = None) -> str | None:
    """This pod's namespace ($POD_NAMESPACE, or the ServiceAccount's), else the kubeconfig context's."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            with open(SA_NAMESPACE, encoding="utf-8") as stream:
                return stream.read().strip() or None
        except OSError:
            return None
    try:
        _contexts, current = kubernetes.config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=kubeconfig or os.environ.get("KUBECONFIG") or None)
    except (kubernetes.config.ConfigException, OSError):
        return None
    found = (current or {}).get("context", {}).get("namespace")
    return str(found) if found else None


def api_client(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    return kubernetes.client.ApiClient(configuration(kubeconfig))


def kopf_login(kubeconfig: str | None) -> Callable[..., Any]:
    """A Kopf login handler with the same credentials as :func:`api_client` (re-read on every login, so a
    rotated ServiceAccount token is picked up when Kopf re-authenticates after a 401)."""
    import kopf

    def login(**_: Any) -> kopf.ConnectionInfo:
        config = configuration(kubeconfig)
        header = str(config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
                     or "")
        scheme, _sep, token = header.partition(" ")
        return kopf.ConnectionInfo(
            server=config.host,
            ca_path=config.ssl_ca_cert,
            insecure=not config.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=config.cert_file,
            private_key_path=config.key_file,
            default_namespace=os.environ.get("POD_NAMESPACE"),
        )

    return login


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve_metrics(registry: prometheus_client.CollectorRegistry, port: int, host: str = "0.0.0.0") -> Any:
    """Prometheus text exposition on ``host:port/metrics``; returns the server (``.shutdown()``)."""
    server, _thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return server


class HealthServer:
    """``GET /healthz``: 200 while ``check()`` returns (True, reason), else 503 with the reason."""

    def __init__(self, check: Callable[[], tuple[bool, str]], host: str = "0.0.0.0", port: int = 0) -> None:
        probe = check

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/healthz", "/livez", "/readyz"):
                    self.send_error(404)
                    return
                ok, reason = probe()
                body = (reason + "\n").encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="agentlat-health", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def parse_listen(url: str) -> tuple[str, int]:
    """``http://0.0.0.0:8080/healthz`` (Kopf's --liveness syntax) -> (host, port)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host or "0.0.0.0", int(port)


def timestamp(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC, as Kubernetes writes lastTransitionTime."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
