"""The fault matrix's cells (part, step, mode), apart from the matrix so
that ``tools/faults-table.py`` can check a results file against them
without importing the test deployment."""

STEPS = ("before_begin", "inside_begin", "transfer", "after_switchover", "inside_commit")
DAEMONS = ("engine", "src_agent", "dst_agent")
SWTPM_STEPS = {"src_swtpm": ("after_switchover", "inside_commit"),
               "dst_swtpm": ("transfer", "after_switchover", "inside_commit")}
CELLS = ([(part, step, mode) for part in DAEMONS for step in STEPS
          for mode in ("restart", "down")]
         + [(part, step, "kill") for part, steps in SWTPM_STEPS.items() for step in steps]
         # a broker restart: the relay the daemons reach RabbitMQ through, cut
         + [("broker", step, mode) for step in STEPS[1:] for mode in ("restart", "down")])
# the names in results.json
CELL_NAMES = frozenset("%s/%s/%s" % cell for cell in CELLS)
