"""swtpm layer of the compute-node agent.

Knows nothing of key storage, the database or RPC: every key, path and
timeout is an explicit argument. ``ctrl`` speaks the control channel
(re-exporting ``framing``, ``client`` and ``transfer``), ``provision``
creates encrypted state, ``process`` runs swtpm detached,
``localca`` gives each agent its own certificate authority.
"""
