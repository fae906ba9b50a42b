"""The real-Nova mode of the lab: Nova 34 services on top of the two-host lab.

Real placement, glance, nova-api, nova-conductor, nova-scheduler (with
VTPCMFilter) and one nova-compute per lab host running this project's driver,
from their own virtualenv (``tools/install-nova-services.sh``). Two stand-ins,
both documented in the operator guide: an identity-header paste filter in
place of keystone's ``authtoken`` (``identity``) and a Neutron that answers
the read-only calls of networkless servers with empty lists (``neutron``).
"""
