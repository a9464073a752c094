"""A user's own Celery app with wove's task registered, for the duplicate-delivery test in ``test_celery``.

Messages not acknowledged for a second are redelivered (kombu's Redis transport restores them), instead of after
the one-hour default. With ``TEST_DIE_AFTER_RESULT`` naming a file that does not exist yet, the first task to finish
creates it and SIGKILLs the whole worker from ``task_postrun``: after the wove task posted its result to the weave,
before the pool reported back, so the ``acks_late`` message is never acknowledged.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from celery import Celery
from celery.signals import task_postrun

from wove.integrations.celery_worker import register

app = Celery("redelivery", broker=os.environ.get("TEST_BROKER_URL"))
app.conf.update(
    broker_transport_options={
        "visibility_timeout": 1,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
register(app)


@task_postrun.connect
def die_after_the_first_result(**_: Any) -> None:
    marker = os.environ.get("TEST_DIE_AFTER_RESULT")
    if marker and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.killpg(os.getpgid(0), signal.SIGKILL)
