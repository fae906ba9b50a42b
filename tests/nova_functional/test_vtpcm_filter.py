"""VTPCMFilter on its own, as Nova tests compute_filter: fake host states,
one real RequestSpec per case. What it decides, and that a request parses
the flavor and reads the trusted hosts and the clock once, not per host."""

import datetime
import types
from typing import Any

import pytest
from nova import objects
from nova.scheduler import filters as nova_filters

from vtpcm_nova import extra_specs
from vtpcm_nova.scheduler import verdicts
from vtpcm_nova.scheduler.filters import vtpcm_filter
from vtpcm_nova.scheduler.filters.vtpcm_filter import VTPCMFilter

LATER = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
EARLIER = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
HOSTS = [types.SimpleNamespace(host=h) for h in ("good", "stale", "unknown", "good2")]
TRUSTED = {"good": LATER, "good2": LATER, "stale": EARLIER}


def request(extra: dict[str, str], rebuild: bool = False) -> Any:
    objects.register_all()
    spec = objects.RequestSpec(flavor=objects.Flavor(extra_specs=dict(extra)))
    if rebuild:
        spec.scheduler_hints = {"_nova_check_type": ["rebuild"]}
    return spec


@pytest.fixture
def flt() -> VTPCMFilter:
    flt = VTPCMFilter()
    flt.fetches = 0  # type: ignore[attr-defined]

    def fetch() -> dict[str, datetime.datetime]:
        flt.fetches += 1  # type: ignore[attr-defined]
        return dict(TRUSTED)
    flt._cache = verdicts.VerdictCache(fetch, ttl=3600.0)
    return flt


def names(hosts: list[Any]) -> list[str]:
    return [h.host for h in hosts]


def test_vtpcm_flavor_gets_fresh_trusted_hosts_only(flt: VTPCMFilter) -> None:
    spec = request({"vtpcm:enabled": "true"})
    assert names(flt.filter_all(HOSTS, spec)) == ["good", "good2"]
    assert [flt.host_passes(h, spec) for h in HOSTS] == [True, False, False, True]


def test_through_nova_filter_handler(flt: VTPCMFilter) -> None:
    handler = nova_filters.HostFilterHandler()
    got = handler.get_filtered_objects([flt], HOSTS, request({"vtpcm:enabled": "true"}))
    assert names(list(got or [])) == ["good", "good2"]


def test_plain_flavor_and_rebuild_pass_untouched(flt: VTPCMFilter) -> None:
    assert names(flt.filter_all(HOSTS, request({"hw:cpu_policy": "shared"}))) == \
        names(HOSTS)
    rebuild = request({"vtpcm:enabled": "true"}, rebuild=True)
    assert names(flt.filter_all(HOSTS, rebuild)) == names(HOSTS)
    assert flt.fetches == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("extra", [{"vtpcm:enabled": "maybe"},
                                   {"vtpcm:enabled": "true", "hw:tpm_version": "2.0"},
                                   {"vtpcm:enabled": "true", "vtpcm:model": "tpm-xyz"}])
def test_a_bad_vtpcm_flavor_fails_every_host(flt: VTPCMFilter, extra: dict[str, str]) -> None:
    spec = request(extra)
    assert flt.filter_all(HOSTS, spec) == []
    assert not any(flt.host_passes(h, spec) for h in HOSTS)


def test_engine_unreachable_fails_closed(flt: VTPCMFilter) -> None:
    def down() -> dict[str, datetime.datetime]:
        raise vtpcm_filter.exception.ServiceUnreachable(
            service="vtpcm-engine", method="trusted_hosts", reason="MessagingTimeout")
    flt._cache = verdicts.VerdictCache(down, ttl=3600.0)
    assert flt.filter_all(HOSTS, request({"vtpcm:enabled": "true"})) == []


def test_one_request_parses_and_reads_once(flt: VTPCMFilter,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost cut: per host only a lookup. Control: host_passes (one host
    per call) parses and snapshots once per host."""
    counts = {"parse": 0, "snapshot": 0}
    real_parse, real_snapshot = extra_specs.parse, verdicts.VerdictCache.snapshot

    def parse(specs: Any) -> Any:
        counts["parse"] += 1
        return real_parse(specs)

    def snapshot(self: Any, now: Any = None) -> Any:
        counts["snapshot"] += 1
        return real_snapshot(self, now)

    monkeypatch.setattr(vtpcm_filter.extra_specs, "parse", parse)
    monkeypatch.setattr(verdicts.VerdictCache, "snapshot", snapshot)
    many = [types.SimpleNamespace(host="good")] * 50
    spec = request({"vtpcm:enabled": "true"})
    assert len(flt.filter_all(many, spec)) == 50
    assert counts == {"parse": 1, "snapshot": 1}
    for host in many:
        flt.host_passes(host, spec)
    assert counts == {"parse": 51, "snapshot": 51}
