"""Run a Kopf operator (its own ``kopf.OperatorRegistry``) in a thread against the harness.

Kopf logs in through a ``@kopf.on.login`` handler that returns the harness URL and the bearer token of
the chosen ServiceAccount, so every request it makes is RBAC-checked as that account. Settings are
tuned for tests: short retry backoffs (Kopf retries even 403s, 1+1+2+3+5+8+13+21 s by default),
no Kubernetes events unless asked.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import kopf

from tests.fakeapi import apiserver


def quick_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.watching.reconnect_backoff = 0.1
    settings.watching.inactivity_timeout = 30.0
    settings.scanning.disabled = False
    return settings


class KopfThread:
    def __init__(
        self,
        registry: kopf.OperatorRegistry,
        server: apiserver.ApiServer,
        *,
        namespace: str,
        service_account: str,
        settings: kopf.OperatorSettings | None = None,
        standalone: bool = True,
        peering_name: str | None = None,
        **operator_kwargs: Any,
    ) -> None:
        self.registry = registry
        self.server = server
        self.settings = settings if settings is not None else quick_settings()
        kopf.on.login(registry=registry)(server.kopf_login(namespace, service_account))
        self._kwargs: dict[str, Any] = {"clusterwide": True, **operator_kwargs}
        if peering_name is not None:
            self._kwargs["peering_name"] = peering_name
        else:
            self._kwargs["standalone"] = standalone
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                    **self._kwargs,
                )
            )
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
            self._ready.set()

    def start(self, timeout: float = 15.0) -> KopfThread:
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("Kopf did not become ready")
        if self.error is not None:
            raise RuntimeError("Kopf failed to start") from self.error
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("Kopf did not stop")
        if self.error is not None:
            raise RuntimeError("Kopf failed") from self.error

    def __enter__(self) -> KopfThread:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
