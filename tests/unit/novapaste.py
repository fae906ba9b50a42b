"""Nova 34's nova-api paste pipelines as DevStack and the lab install them
(the parts the vtpcm_witness filter and the lab's identity stand-in edit),
for the tests of both."""

NOVA_34_PIPELINES = """[composite:openstack_compute_api_v21]
use = call:nova.api.auth:pipeline_factory_v21
keystone = cors http_proxy_to_wsgi compute_req_id faultwrap request_log sizelimit osprofiler \
authtoken keystonecontext osapi_compute_app_v21

[composite:openstack_compute_api_v21_legacy_v2_compatible]
use = call:nova.api.auth:pipeline_factory_v21
keystone = cors compute_req_id authtoken keystonecontext legacy_v2_compatible osapi_compute_app_v21

[pipeline:oscomputeversions]
pipeline = cors faultwrap request_log http_proxy_to_wsgi oscomputeversionapp
""".replace("\\\n", "")
