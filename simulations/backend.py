"""Flower's Ray backend, made to ride out a slow machine and to name what failed.

Flower 1.42's simulation engine (``flwr.server.superlink.fleet.vce``) ends a whole run with only
"An error was encountered. Ending simulation." when its backend fails to start, and its actor
pool has three weak spots on a loaded machine:

- **starting Ray**: ``ray.init`` gives the raylet 30 s to register with the GCS (hard-coded in
  ``ray/_private/node.py``), then raises "The current node timed out during startup"; Flower
  reports only "An error was encountered. Ending simulation." (its worker threads turn every
  other failure into a site's error reply, so that message means the backend did not start).
  Measured on the 2-core development machine at a load of 29-37: ``ray.init`` failed that way once
  in three tries and took 42 s and 48 s the other two times;
- **a lost actor**: an actor whose worker process dies or does not register in time (Ray's
  ``worker_register_timeout_seconds``, 60 s by default) raises ``RayActorError`` for its message,
  and Flower puts the dead actor back into its pool, so every later message it is handed fails
  too;
- **a hung actor**: Flower waits for an actor's answer without a timeout, so one stuck ClientApp
  holds a pool slot for ever.

:class:`PatientRayBackend` (installed for one run by :func:`fedgov.flower_hooks.
simulation_backend`) starts Ray up to :data:`RAY_START_ATTEMPTS` times, logging each failure;
replaces a lost actor with a fresh one and retries its message once; waits at most the round
timeout for an answer; and makes every failure name the site, round and stage (the message type:
``query``, ``train``, ``evaluate``, ``train.secagg_*``), so that the error reply the ServerApp
records against the site (``failures`` in metrics.json) and the warning on the console say which.
:data:`RAY_ENVIRONMENT` gives Ray's own start-up waits more room as well.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from logging import WARNING
from typing import Any

import ray
from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import PARTITION_ID_KEY
from flwr.common.logger import log
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from ray.exceptions import GetTimeoutError, RayActorError, WorkerCrashedError

from fedgov.messages import SERVER_ROUND

RAY_START_ATTEMPTS = 4  # ~1 in 3 starts failed at a load of ~30: all four, ~1 in 80
RAY_RETRY_PAUSE_SECONDS = 2.0
#: Ray's settings, read from the environment by every Ray process (set when absent): its log
#: lines undeduplicated, no accelerator variables touched, and (system config) a worker process
#: may take up to 5 minutes to register on a loaded machine (Ray's default: 60 s).
RAY_ENVIRONMENT = {
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_worker_register_timeout_seconds": "300",
    "RAY_raylet_start_wait_time_s": "120",
}
#: Keys fedgov adds to Flower's backend config (Flower's backend ignores them).
SITE_IDS_KEY = "fedgov_site_ids"  # partition id → fedgov site id
MESSAGE_TIMEOUT_KEY = "fedgov_message_timeout"  # seconds an actor may take for one message


class EngineFailure(RuntimeError):
    """The simulation engine could not go on; the message names the stage (and site, round)."""


class SiteFailure(RuntimeError):
    """A simulated site failed one message; the message names the site, round and stage."""


def describe(message: Message, site_id: str) -> str:
    """``site hospital-3, round 2, stage train``: where a message's processing failed."""
    server_round: object = message.metadata.group_id or "?"
    for record in message.content.config_records.values():
        if SERVER_ROUND in record:
            server_round = record[SERVER_ROUND]
            break
    return f"site {site_id}, round {server_round}, stage {message.metadata.message_type}"


class PatientRayBackend(RayBackend):
    """Flower's ``RayBackend`` with retried start-up, replaced lost actors, a bounded wait per
    message and failures that name the site, round and stage (see the module doc)."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        self._lock = threading.Lock()  # around the actor pool: Flower's is not thread-safe
        self.site_ids = [str(site) for site in backend_config.get(SITE_IDS_KEY, [])]
        timeout = float(backend_config.get(MESSAGE_TIMEOUT_KEY, 0) or 0)
        self.message_timeout = timeout if timeout > 0 else None
        super().__init__(backend_config)

    def init_ray(self, backend_config: dict[str, Any]) -> None:
        """Flower's ``ray.init``, retried: a loaded machine can miss Ray's start-up waits."""
        for attempt in range(1, RAY_START_ATTEMPTS + 1):
            try:
                super().init_ray(backend_config)
                return
            except Exception as error:  # whatever a half-started Ray raises
                ray.shutdown()
                if attempt == RAY_START_ATTEMPTS:
                    raise EngineFailure(
                        f"simulation engine: starting Ray failed {attempt} times, last with "
                        f"{type(error).__name__}: {error}"
                    ) from error
                log(
                    WARNING,
                    "simulation engine: starting Ray failed (attempt %d of %d: %s); retrying",
                    attempt,
                    RAY_START_ATTEMPTS,
                    _first_line(error),
                )
                time.sleep(RAY_RETRY_PAUSE_SECONDS * attempt)

    def build(self, app_fn: Any) -> None:
        """Flower's actor pool, with a failure that says it happened while starting it."""
        try:
            super().build(app_fn)
        except Exception as error:
            raise EngineFailure(
                f"simulation engine: starting the ClientApp actors failed: "
                f"{type(error).__name__}: {error}"
            ) from error

    def site_id(self, context: Context) -> str:
        """The fedgov site id of the simulated node ``context`` belongs to."""
        partition = int(context.node_config[PARTITION_ID_KEY])
        if 0 <= partition < len(self.site_ids):
            return self.site_ids[partition]
        return f"partition {partition}"

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on ``message`` in an actor; a lost actor is replaced and the
        message retried once; any failure names the site, round and stage."""
        if self.pool is None or self.app_fn is None:
            raise EngineFailure("simulation engine: the actor pool was used before it was built")
        where = describe(message, self.site_id(context))
        job = (self.app_fn, message, str(context.node_config[PARTITION_ID_KEY]), context)
        for attempt in (1, 2):
            used: list[Any] = []
            with self._lock:
                future = self.pool.submit(functools.partial(_run_on, used), job)
            try:
                _, reply, updated = ray.get(future, timeout=self.message_timeout)
            except (RayActorError, WorkerCrashedError, GetTimeoutError) as error:
                self._replace(future, used[0])
                lost = (
                    f"no answer within {self.message_timeout:.0f} s"
                    if isinstance(error, GetTimeoutError)
                    else f"its Ray actor was lost ({_first_line(error)})"
                )
                if attempt == 1 and not isinstance(error, GetTimeoutError):
                    log(WARNING, "%s: %s; retrying on a fresh actor", where, lost)
                    continue
                log(WARNING, "%s failed: %s", where, lost)
                raise SiteFailure(f"{where} failed: {lost}") from error
            except Exception as error:  # the ClientApp raised: the actor is fine
                with self._lock:
                    self.pool.add_actor_back_to_pool(future)
                cause = getattr(error, "cause", None) or error  # a RayTaskError's own error
                log(WARNING, "%s failed: %s", where, _first_line(cause))
                raise SiteFailure(f"{where} failed: {_first_line(cause)}") from error
            with self._lock:
                self.pool.add_actor_back_to_pool(future)
            return reply, updated
        raise AssertionError("unreachable")  # pragma: no cover

    def _replace(self, future: Any, dead: Any) -> None:
        """Put a fresh actor in the pool in place of ``dead`` (lost, or hung and killed)."""
        assert self.pool is not None
        with self._lock:
            self.pool.add_actor_back_to_pool(future)  # drops Flower's future → actor entry
            self.pool.pool.remove(dead)
            self.pool.pool.append(self.pool.create_actor_fn())
        with contextlib.suppress(Exception):  # already gone
            ray.kill(dead, no_restart=True)


def _run_on(used: list[Any], actor: Any, app_fn: Any, message: Any, cid: str, context: Any) -> Any:
    """Flower's job submission, noting which actor runs it."""
    used.append(actor)
    return actor.run.remote(app_fn, message, cid, context)


def _first_line(error: BaseException) -> str:
    """``Type: first line of the message`` (300 characters at most); for Flower's wrapper of a
    ClientApp's exception (whose text Ray's unpickling may wrap twice), the ClientApp's words."""
    text = str(error)
    name = type(error).__name__
    if isinstance(error, ClientAppException):
        text, name = text.rpartition("occurred. Message: ")[2], "the ClientApp raised"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{name}: {lines[0] if lines else ''}"[:300]
