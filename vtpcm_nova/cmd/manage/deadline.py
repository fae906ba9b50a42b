"""A hard deadline around each engine call.

Why: the rabbit driver retries a refused broker connection forever,
ignoring the RPC timeout, so without this a dead broker hangs the CLI.
"""

import threading
from typing import Any

import oslo_messaging as messaging

from vtpcm_nova.cmd.manage.results import PROG


class DeadlineAPI:
    """Run each engine call in a worker thread and give up after ``seconds``.

    The rabbit driver retries a refused broker connection forever, so a call
    to a dead broker would hang the CLI despite the RPC timeout.
    """

    def __init__(self, api: Any, seconds: float) -> None:
        self._api = api
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["value"] = method(*args, **kwargs)
                except BaseException as err:  # noqa: B036 - re-raised in the caller
                    outcome["error"] = err

            worker = threading.Thread(target=run, name=f"{PROG}-{name}", daemon=True)
            worker.start()
            worker.join(self._seconds)
            if worker.is_alive():
                raise messaging.MessagingTimeout(
                    f"no reply from vtpcm-engine within {self._seconds:g} s")
            if "error" in outcome:
                raise outcome["error"]
            return outcome.get("value")
        return call
