"""Regenerate the DDL of the engine schemas the previous releases created.

Why files and not code: the upgrade tests must start from exactly what the
old engines made (``create_all`` of their models at v1, v2 and v3), not from
today's models with parts removed. Each fixture is that release's models,
read from git, compiled for SQLite, PostgreSQL and MySQL/MariaDB.

Run from the repository root (once; the output is committed)::

    python tests/functional/engine/legacy/make_fixtures.py
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.schema import CreateIndex, CreateTable

# the last commit of each hand-versioned schema (SCHEMA_VERSION in models.py)
RELEASES = {1: "af66088^", 2: "cfafacd^", 3: "c383b19"}
DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect(),
            "mysql": mysql.dialect()}
HERE = Path(__file__).parent


def old_models(commit: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{commit}:vtpcm_nova/engine/db/models.py"],
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"models_{commit}")
    sys.modules[module.__name__] = module  # dataclass-like annotations resolve here
    exec(compile(source, f"{commit}:models.py", "exec"), module.__dict__)  # noqa: S102
    return module


def main() -> None:
    for version, commit in RELEASES.items():
        models = old_models(commit)
        assert models.SCHEMA_VERSION == version, (commit, models.SCHEMA_VERSION)
        for name, dialect in DIALECTS.items():
            statements = []
            for table in models.Base.metadata.sorted_tables:
                statements.append(str(CreateTable(table).compile(dialect=dialect)).strip())
                statements += [str(CreateIndex(index).compile(dialect=dialect)).strip()
                               for index in sorted(table.indexes, key=lambda i: i.name)]
            out = HERE / f"engine-v{version}.{name}.sql"
            out.write_text(f"-- engine schema v{version} as created by {commit}, "
                           f"{name}\n" + ";\n\n".join(statements) + ";\n")
            print(out)


if __name__ == "__main__":
    main()
