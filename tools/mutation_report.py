#!/usr/bin/env python3
"""Summarise tools/mutation.sh output: per module the mutants, how many the
fast tests killed, and the survivors judged equivalent (a rule below says
why; every other survivor counts against the score).

Usage: tools/mutation_report.py OUT_DIR > tests/mutation/scores.rst
"""

import collections
import re
import sys
from pathlib import Path

MODULES = ("protocol", "verifier", "sealing", "authn", "association", "keystore")

# (rule name, why it is equivalent, predicate over (removed line, added line))
_SQL = re.compile(r"\b(SELECT|INSERT|DELETE|UPDATE|PRAGMA|WHERE|FROM|ORDER BY|DROP)\b", re.I)


def _quoted(text: str) -> list[str]:
    return re.findall(r"'[^']*'", text)


RULES = [
    ("byteorder", "int.from_bytes/to_bytes without byteorder: the default is \"big\" "
     "since Python 3.11, the value the code passes",
     lambda old, new: re.sub(r',\s*"big"\)', ",)", old).replace(" ", "")
     == new.replace(" ", "")
     or re.sub(r',\s*"big"\)', ", )", old) == new),
    ("sql-case", "case of SQL keywords and identifiers only (SQLite ignores it); quoted "
     "literals unchanged",
     lambda old, new: old.lower() == new.lower() and bool(_SQL.search(old))
     and _quoted(old) == _quoted(new)),
    ("sql-column-key", "case of a column name used only to build SET col = ? (SQLite "
     "identifiers ignore case)",
     lambda old, new: old.lower() == new.lower() and re.search(r'sets\[|"state":', old)
     is not None),
    ("codec-name", "codec name spelled in other case (\"UTF-8\" is \"utf-8\")",
     lambda old, new: old.lower() == new.lower() and re.search(r'encode\(|decode\(', old)
     is not None),
    ("struct-sign", "signed instead of unsigned struct field for values the code keeps "
     "below 2**31 (lengths <= 255) or 2**63 (generations)",
     lambda old, new: re.sub(r'">[iq]"', lambda m: m.group(0).upper(), new) == old),
    ("bit-range", "range(9) over the bits of a byte: bit 8 of a byte is always 0",
     lambda old, new: "range(8)" in old and "range(9)" in new),
    ("reason-default", "getattr(event, \"reason\", ...) without its default: every event "
     "that enters ABORTING has a reason",
     lambda old, new: 'getattr(event, "reason", DEADLINE_REASON)' in old
     and new in ('reason = getattr(event, "reason", None)', 'reason = getattr(event, "reason", )')),
    ("read-chunk", "a different read chunk size: the loop reads until EOF either way",
     lambda old, new: "os.read(fd, 65536)" in old and "65537" in new),
]

# Survivors judged equivalent by reading them (name -> why).
MANUAL = {
    "vtpcm_agent.keystore.xǁInstanceKeysǁgenerate__mutmut_5":
        "secrets.token_bytes(None) returns 32 bytes, KEY_LEN",
    "vtpcm_agent.keystore.xǁInstanceKeysǁgenerate__mutmut_6":
        "secrets.token_bytes(None) returns 32 bytes, KEY_LEN",
    "vtpcm_agent.keystore.xǁDevKeyFileHostKeyǁ_load_or_create__mutmut_12":
        "write_atomic(replace=None): None is false, as the False it replaces",
    "vtpcm_agent.keystore.xǁDevKeyFileHostKeyǁ_load_or_create__mutmut_15":
        "write_atomic without replace: its default is the False passed",
    "vtpcm_agent.keystore.xǁTPMSealedHostKeyǁ_load_or_create__mutmut_14":
        "write_atomic(replace=None): None is false, as the False it replaces",
    "vtpcm_agent.keystore.xǁTPMSealedHostKeyǁ_load_or_create__mutmut_17":
        "write_atomic without replace: its default is the False passed",
    "vtpcm_agent.keystore.xǁKeyStoreǁ__init____mutmut_14":
        "the condition only decides whether a warning is logged",
    "vtpcm_agent.keystore.xǁKeyStoreǁ__init____mutmut_15":
        "the condition only decides whether a warning is logged",
    "vtpcm_agent.keystore.xǁKeyStoreǁ_aead__mutmut_15":
        "HKDF without salt=None: None is its default",
    "vtpcm_agent.keystore.x__read_private_file__mutmut_32":
        "b'XXXX'.join of the chunks: every file the key store reads is one chunk (< 64 KiB)",
    "vtpcm_agent.keystore.xǁDevKeyFileHostKeyǁ_load_or_create__mutmut_9":
        "secrets.token_bytes(None) returns 32 bytes, KEY_LEN",
    "vtpcm_agent.association.xǁAssociationListǁtransition__mutmut_94":
        "the condition only decides whether a log line is written",
    "vtpcm_agent.association.xǁAssociationListǁ__init____mutmut_34":
        "the condition only decides whether a log line is written",
    "vtpcm_agent.association.xǁAssociationListǁ__init____mutmut_35":
        "the condition only decides whether a log line is written",
    "vtpcm_agent.association.xǁAssociationListǁ__init____mutmut_20":
        "the SQLite busy timeout 11 s instead of 10 s: not observable",
    "vtpcm_agent.association.xǁAssociationListǁ_row__mutmut_5":
        "zip(strict=None): a row always has len(_COLUMNS) values (SELECT of those columns)",
    "vtpcm_agent.association.xǁAssociationListǁ_row__mutmut_8":
        "zip without strict: a row always has len(_COLUMNS) values",
    "vtpcm_agent.association.xǁAssociationListǁ_row__mutmut_9":
        "zip(strict=False): a row always has len(_COLUMNS) values",
    "vtpcm_agent.association.xǁAssociationListǁ_record_tombstone__mutmut_1":
        "the previous tombstone is never above the generation destroyed (add refuses lower)",
    "vtpcm_agent.association.xǁAssociationListǁ_record_tombstone__mutmut_3":
        "the previous tombstone is never above the generation destroyed (add refuses lower)",
    "vtpcm_common.authn.xǁCommandVerifierǁverify__mutmut_13":
        "zip(strict=None): fingerprints and keys are built from one list",
    "vtpcm_common.authn.xǁCommandVerifierǁverify__mutmut_16":
        "zip without strict: fingerprints and keys are built from one list",
    "vtpcm_common.authn.xǁCommandVerifierǁverify__mutmut_17":
        "zip(strict=False): fingerprints and keys are built from one list",
    "vtpcm_agent.sealing.x__p256_point__mutmut_1":
        "the only caller passes two fixed 32-byte slices of the envelope",
    "vtpcm_agent.sealing.x__p256_point__mutmut_4":
        "the only caller passes two fixed 32-byte slices of the envelope",
}


def survivors(path: Path) -> dict[str, tuple[list[str], list[str]]]:
    out: dict[str, tuple[list[str], list[str]]] = {}
    name = None
    for line in path.read_text().splitlines():
        if line.startswith("# ") and line.endswith(": survived"):
            name = line[2:].rsplit(":", 1)[0]
            out[name] = ([], [])
        elif name and line.startswith("-") and not line.startswith("---"):
            out[name][0].append(line[1:].strip())
        elif name and line.startswith("+") and not line.startswith("+++"):
            out[name][1].append(line[1:].strip())
    return out


def judge(name: str, old: list[str], new: list[str]) -> str | None:
    if name in MANUAL:
        return MANUAL[name]
    if len(old) == len(new) == 1:
        for rule, why, pred in RULES:
            if pred(old[0], new[0]):
                return "%s: %s" % (rule, why)
    return None


def main(out: Path) -> int:
    rows, details = [], []
    for mod in MODULES:
        results = out / (mod + ".results")
        if not results.exists():
            continue
        counts = collections.Counter(line.rsplit(":", 1)[1].strip()
                                     for line in results.read_text().splitlines() if ":" in line)
        alive = survivors(out / (mod + ".survivors"))
        equivalent = {n: judge(n, *d) for n, d in alive.items()}
        equivalent = {n: why for n, why in equivalent.items() if why}
        total = sum(counts.values())
        killed = counts["killed"] + counts["timeout"]
        scored = total - len(equivalent)
        rows.append((mod, total, killed, counts["survived"], counts["no tests"],
                     len(equivalent), 100.0 * killed / scored if scored else 0.0))
        details.append((mod, equivalent, [n for n in alive if n not in equivalent]))
    print("Mutation scores\n===============\n")
    print("``tox -e mutation`` (mutmut 3.8.1, ``tools/mutation.sh``; log statements not\n"
          "mutated), generated by ``tools/mutation_report.py``. *score* = killed /\n"
          "(mutants - equivalent survivors); *no tests* are mutants in code the fast\n"
          "unit tests do not run (they count against the score).\n")
    print("=============  =======  ======  ========  ========  ==========  =======")
    print("module         mutants  killed  survived  no tests  equivalent  score")
    print("=============  =======  ======  ========  ========  ==========  =======")
    for mod, total, killed, surv, none, equiv, score in rows:
        print("%-13s  %7d  %6d  %8d  %8d  %10d  %6.1f%%" % (mod, total, killed, surv, none,
                                                             equiv, score))
    print("=============  =======  ======  ========  ========  ==========  =======\n")
    for mod, equivalent, others in details:
        print("%s\n%s\n" % (mod, "-" * len(mod)))
        print("Survivors judged equivalent:\n")
        for name, why in sorted(equivalent.items()):
            print("* ``%s``: %s" % (name.rsplit(".", 1)[1], why))
        if not equivalent:
            print("* none")
        print("\nOther survivors (not killed yet; ``mutmut show NAME`` in a run):\n")
        for name in sorted(others):
            print("* ``%s``" % name.rsplit(".", 1)[1])
        if not others:
            print("* none")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
