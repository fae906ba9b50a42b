"""Phases of one real-Nova live migration, from the logs' timestamps.

Nova 34's own DEBUG/INFO lines (both nova-computes log at DEBUG in the lab)
bracket every step, for a plain server as for a vTPCM one, so the same
spans are read for both arms and compared; the driver's own DEBUG lines
(``vTPCM <step> of migration ... took N ms``, ``vtpcm_nova.virt.driver``)
add the vTPCM's steps where the driver writes them. Every timestamp is the
log's wall clock (one machine, one clock); a span whose marker is missing
is left out, never guessed.

Events, in order (S: source compute, D: destination compute):

==================  ====  ==========================================================
``cli``             -     the ``openstack server migrate`` call (the benchmark's clock)
``conductor``       C     ``Requesting cell ... while live migrating`` (the conductor's task)
``dest_checked``    D     ``destination check data is`` (check_can_live_migrate_destination
                          past the driver's part, the vTPCM's attestation gate)
``src_checked``     S     ``source check data is`` (check_can_live_migrate_source)
``pre_start``       D     ``pre_live_migration data is``
``pre_done``        S     ``Took N seconds for pre_live_migration on destination``
``lm_start``        S     ``live_migration data is`` (the driver's live_migration next)
``libvirt_start``   S     ``About to invoke the migrate API``
``libvirt_done``    S     ``Migration operation has completed`` (the monitor saw it)
``post_start``      S     ``_post_live_migration() is started..``
``post_driver_done`` S    ``Calling driver.cleanup from _post_live_migration``
``dest_post``       D     ``Post operation of migration started``
``src_done``        S     ``Migrating instance to ... finished successfully``
``active``          -     the server seen out of MIGRATING (the benchmark's clock)
==================  ====  ==========================================================
"""

import datetime
import re
from pathlib import Path
from typing import Any

_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")
_REQ = re.compile(r"\[(?:None|req-\S+) (req-[0-9a-f-]+) ")
_TOOK = re.compile(r"vTPCM (?P<step>[a-z_ ]+?) of migration \S+ took (?P<ms>[0-9.]+) ms")

# event: (role, substring); lines without the instance's uuid are matched by
# the request id of the conductor's task instead
MARKERS: dict[str, tuple[str, str]] = {
    "conductor": ("conductor", "while live migrating"),
    "dest_checked": ("dest", "destination check data is"),
    "src_checked": ("source", "source check data is"),
    "pre_start": ("dest", "pre_live_migration data is"),
    "pre_done": ("source", "seconds for pre_live_migration on destination host"),
    "lm_start": ("source", "live_migration data is"),
    "libvirt_start": ("source", "About to invoke the migrate API"),
    "libvirt_done": ("source", "Migration operation has completed"),
    "post_start": ("source", "_post_live_migration() is started.."),
    "post_driver_done": ("source", "Calling driver.cleanup from _post_live_migration"),
    "dest_post": ("dest", "Post operation of migration started"),
    "src_done": ("source", "finished successfully"),
}

# span: (from event, to event, what it covers)
SPANS: dict[str, tuple[str, str, str]] = {
    "prechecks_ms": ("cli", "pre_start",
                     "CLI start, API, conductor, scheduler (VTPCMFilter), "
                     "check_can_live_migrate_destination (the vTPCM's attestation gate) "
                     "and _source: the sum of the next three"),
    "cli_api_ms": ("cli", "conductor", "the openstack CLI's start, nova-api, the cast to "
                                      "the conductor"),
    "schedule_dest_check_ms": ("conductor", "dest_checked",
                               "scheduler (VTPCMFilter) and the destination's check "
                               "(the vTPCM's attestation gate first)"),
    "src_check_to_pre_ms": ("dest_checked", "pre_start",
                            "the source's check, port bindings, the conductor's cast to "
                            "the source, until pre_live_migration starts"),
    "pre_live_migration_ms": ("pre_start", "pre_done", "pre_live_migration on the dest"),
    "to_driver_ms": ("pre_done", "lm_start", "source: after pre_live_migration until the "
                                             "driver's live_migration"),
    "before_libvirt_ms": ("lm_start", "libvirt_start",
                          "the driver's live_migration before libvirt (vTPCM: begin and "
                          "the destination socket lookup)"),
    "checked_to_libvirt_ms": ("dest_checked", "libvirt_start",
                              "the source's check until libvirt: the early begin's window "
                              "and its take-over (the sum of the four spans above), without "
                              "the CLI's start and libvirt, the noisiest spans"),
    "libvirt_ms": ("libvirt_start", "libvirt_done",
                   "migrateToURI3 until Nova's monitor (0.5 s poll) saw it complete"),
    "to_post_ms": ("libvirt_done", "post_start", "the monitor until _post_live_migration"),
    "post_driver_ms": ("post_start", "post_driver_done",
                       "_post_live_migration's first part: Neutron, driver."
                       "post_live_migration (vTPCM: commit), post_live_migration_at_source"),
    "to_dest_post_ms": ("post_driver_done", "dest_post", "source cleanup, then the RPC to "
                                                        "post_live_migration_at_destination"),
    "tail_ms": ("dest_post", "active", "post_live_migration_at_destination until the "
                                       "benchmark's poll (0.3 s) saw the server ACTIVE"),
    "total_ms": ("cli", "active", "the CLI call to ACTIVE, as logged"),
}

METRICS: dict[str, str] = {
    "cli_to_active_ms": "the CLI call until the server is out of MIGRATING (0.3 s poll)",
    **{name: "%s -> %s: %s" % span for name, span in SPANS.items()},
    "driver_<step>_ms": "the driver's own 'vTPCM <step> ... took N ms' lines (newer code)",
}


def _stamp(line: str) -> float | None:
    found = _STAMP.match(line)
    if not found:
        return None
    when = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S.%f")
    # oslo.log writes local time; the benchmark's clock is time.time()
    return when.timestamp()


def _lines(path: Path, start: float, end: float) -> list[tuple[float, str]]:
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            when = _stamp(line)
            if when is not None and start <= when <= end:
                out.append((when, line))
    return out


def phases(logs: Path, roles: dict[str, str], sample: dict[str, Any]) -> dict[str, float]:
    """The spans of ``sample`` (one migration of the benchmark) in ms."""
    start, end = sample["wall_start"] - 0.5, sample["wall_end"] + 0.5
    instance = sample["instance"]
    files = {"source": roles.get("compute:" + sample["source"]),
             "dest": roles.get("compute:" + sample["dest"]),
             "conductor": roles.get("nova-conductor")}
    every = {role: _lines(logs / name, start, end) for role, name in files.items() if name}
    request = None
    for _when, line in every.get("conductor", []):
        if instance in line and MARKERS["conductor"][1] in line:
            found = _REQ.search(line)
            request = found.group(1) if found else None
            break
    lines = {role: [(t, ln) for t, ln in found
                    if instance in ln or (request is not None and request in ln)]
             for role, found in every.items()}
    # wall_end is later: the benchmark then waits for the migration record
    events: dict[str, float] = {"cli": sample["wall_start"],
                                "active": sample["wall_start"]
                                + sample["cli_to_active_ms"] / 1000.0}
    for event, (role, text) in MARKERS.items():
        for when, line in lines.get(role, []):
            if text in line:
                events[event] = when
                break
    out = {}
    for name, (a, b, _what) in SPANS.items():
        if a in events and b in events:
            out[name] = (events[b] - events[a]) * 1000.0
    for role in ("source", "dest"):
        for _when, line in lines.get(role, []):
            found = _TOOK.search(line)
            if found:
                key = "driver_%s_ms" % found.group("step").replace(" ", "_")
                out[key] = float(found.group("ms"))
    return out
