"""distributed.idle_new_pollers: only threads created since the snapshot and waiting in epoll go idle."""

from __future__ import annotations

import os
import select
import sys
import threading
import time

import pytest

from caee_jax.parallel.distributed import _thread_ids, idle_new_pollers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux threads and schedulers")


def _poller(stop: threading.Event, ids: list) -> None:
    ids.append(threading.get_native_id())
    epoll = select.epoll()
    while not stop.is_set():
        epoll.poll(0.05)


def _sleeper(stop: threading.Event, ids: list) -> None:
    ids.append(threading.get_native_id())
    stop.wait()


def test_only_new_epoll_threads_go_idle():
    stop = threading.Event()
    old_ids, new_ids, sleeper_ids = [], [], []
    old = threading.Thread(target=_poller, args=(stop, old_ids))
    old.start()
    time.sleep(0.05)
    existing = _thread_ids()
    threads = [
        threading.Thread(target=_poller, args=(stop, new_ids)),
        threading.Thread(target=_sleeper, args=(stop, sleeper_ids)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    try:
        assert idle_new_pollers(existing) == new_ids
        assert os.sched_getscheduler(new_ids[0]) == os.SCHED_IDLE
        assert os.sched_getscheduler(old_ids[0]) == os.SCHED_OTHER
        assert os.sched_getscheduler(sleeper_ids[0]) == os.SCHED_OTHER
    finally:
        stop.set()
        for thread in (old, *threads):
            thread.join()
