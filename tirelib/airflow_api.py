"""A small client of Airflow 3's REST API (``/api/v2``): trigger DAG runs and wait for them.

The demo and the end-to-end tests use it to watch the real scheduler; operators can too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from tirelib.errors import StackError

log = logging.getLogger(__name__)

FINISHED = {"success", "failed"}


class AirflowClient:
    """Token-authenticated calls to Airflow's api-server (simple auth manager's users)."""

    def __init__(self, base_url: str, username: str, password: str, *, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, trust_env=False)
        self._token: str | None = None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _authorize(self) -> None:
        response = self.http.post(
            "/auth/token", json={"username": self.username, "password": self.password}
        )
        if response.status_code >= 400:
            raise StackError(
                f"Airflow at {self.base_url} refused the login of {self.username!r}: "
                f"{response.status_code} {response.text[:200]}"
            )
        self._token = response.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._token is None:
            self._authorize()
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self._token}"}
            try:
                response = self.http.request(method, f"/api/v2{path}", headers=headers, **kwargs)
            except httpx.HTTPError as error:
                raise StackError(f"Airflow at {self.base_url} did not answer: {error}") from error
            if response.status_code == 401 and attempt == 1:
                self._authorize()  # the token expired
                continue
            if response.status_code >= 400:
                raise StackError(
                    f"Airflow {method} {path}: {response.status_code} {response.text[:300]}"
                )
            return response.json() if response.content else None
        raise StackError(f"Airflow at {self.base_url} refused the token")

    def dag(self, dag_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", f"/dags/{dag_id}")
        return result

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.request(
            "GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": 100}
        )["dag_runs"]
        return runs

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        )["task_instances"]
        return items

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a run now; returns its run id."""
        body = {"logical_date": None, "conf": conf or {}}
        run = self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)
        return str(run["dag_run_id"])

    def wait_for_dag(self, dag_id: str, *, timeout: float = 180) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``."""
        return self._poll(
            f"DAG {dag_id} to be parsed",
            lambda: self._dag_or_none(dag_id),
            timeout=timeout,
        )

    def _dag_or_none(self, dag_id: str) -> dict[str, Any] | None:
        try:
            return self.dag(dag_id)
        except StackError as error:
            if " 404 " in str(error):
                return None
            raise

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str | None = None,
        *,
        after: set[str] | None = None,
        timeout: float = 900,
    ) -> dict[str, Any]:
        """Wait until run ``run_id`` (or the first run not in ``after``) has finished."""

        def finished() -> dict[str, Any] | None:
            for run in self.dag_runs(dag_id):
                if run_id is not None and run["dag_run_id"] != run_id:
                    continue
                if after is not None and run["dag_run_id"] in after:
                    continue
                if run["state"] in FINISHED:
                    return run
            return None

        which = run_id or "the next run"
        return self._poll(f"{which} of {dag_id} to finish", finished, timeout=timeout)

    def _poll(
        self, what: str, check: Callable[[], dict[str, Any] | None], *, timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise StackError(f"gave up waiting for {what} after {timeout:.0f} s")
            time.sleep(2)
