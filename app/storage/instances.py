"""Which other app instances are alive on this database (rows of `instances`)."""

from __future__ import annotations

import os
import socket
import time

from mixtral_chat.app.storage.records import Instance

# A running app refreshes its row in `instances` this often; a row not refreshed for
# STALE_AFTER_S belongs to an app that is gone (or frozen), whatever its pid.
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


def pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it there: rely on the heartbeat
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def instance_is_live(instance: Instance, now: float | None = None) -> bool:
    if (now if now is not None else time.time()) - instance.heartbeat_at > STALE_AFTER_S:
        return False
    return instance.host != socket.gethostname() or pid_alive(instance.pid)
