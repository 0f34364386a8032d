"""Transient tracking-store errors are retried where that is safe, and only there."""

from __future__ import annotations

import pytest

from orchestrator import retrying
from orchestrator.retrying import RetryingClient

POOL = Exception("RESOURCE: BAD_REQUEST: QueuePool limit of size 5 overflow 10 reached, "
                 "connection timed out, timeout 30.00")
TIMEOUT = Exception("API request failed with exception Read timed out. (read timeout=120)")


class Flaky:
    """A stand-in store: each method fails with the given errors first, then answers."""

    def __init__(self, **failures):
        self.failures = {name: list(errors) for name, errors in failures.items()}
        self.calls: list[str] = []
        self.tracking_uri = "http://store"

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append(name)
            if self.failures.get(name):
                raise self.failures[name].pop(0)
            return f"{name} done"
        return method


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(retrying.time, "sleep", lambda seconds: None)


def test_a_saturated_store_is_ridden_out_for_every_call():
    store = Flaky(create_run=[POOL, POOL], log_batch=[POOL])
    client = RetryingClient(store)
    assert client.create_run("0") == "create_run done"  # never reached the database: safe
    assert client.log_batch("run") == "log_batch done"
    assert store.calls == ["create_run"] * 3 + ["log_batch"] * 2
    assert client.tracking_uri == "http://store"  # attributes pass through


def test_an_unknown_outcome_is_retried_only_where_repeating_is_harmless():
    store = Flaky(log_batch=[TIMEOUT], create_run=[TIMEOUT])
    client = RetryingClient(store)
    assert client.log_batch("run") == "log_batch done"  # metric rows it holds are skipped
    with pytest.raises(Exception, match="Read timed out"):
        client.create_run("0")  # it may exist already: a retry could make a second run
    assert store.calls.count("create_run") == 1


def test_other_errors_and_lasting_outages_surface():
    store = Flaky(get_run=[KeyError("no such run")],
                  set_tag=[POOL] * (len(retrying.DELAYS_S) + 1))
    client = RetryingClient(store)
    with pytest.raises(KeyError):
        client.get_run("x")
    assert store.calls == ["get_run"]
    with pytest.raises(Exception, match="QueuePool limit"):
        client.set_tag("run", "k", "v")
    assert store.calls.count("set_tag") == len(retrying.DELAYS_S) + 1
