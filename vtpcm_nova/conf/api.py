"""Options of nova-api's vtpcm_witness paste filter (``[vtpcm]`` in the
nova.conf of the API nodes); nothing here imports Nova."""

from typing import Any

from oslo_config import cfg

from vtpcm_common import config

vtpcm_group = cfg.OptGroup(
    "vtpcm", title="vTPCM for Nova",
    help="How nova-compute's VTPCMLibvirtDriver and nova-scheduler's VTPCMFilter reach "
         "the vtpcm-engine and the local vtpcm-agent.")
API_OPTS = [
    cfg.StrOpt("api_witness_key_file",
               help="nova-api only (the vtpcm_witness paste filter): the Ed25519 key "
                    "this API node signs its witnesses of unshelve and delete requests "
                    "with ('vtpcm-manage keys create PATH' makes one; owner nova, mode "
                    "600 or 640). The engine lists its public key (PATH.pub) in "
                    "[nova] api_witness_public_keys. Required by the filter: nova-api "
                    "does not start with the filter and no usable key."),
    cfg.FloatOpt("api_witness_timeout", default=5.0, min=0.5, max=60.0,
                 help="nova-api only: seconds the vtpcm_witness filter waits for the "
                      "engine to record a witness, after Nova answered the request and "
                      "before the answer goes out (the answer is never changed; a "
                      "witness the engine did not record is logged, and the unshelve "
                      "elsewhere it was for is then refused). It bounds the whole send, "
                      "plus half a second: the wait for one of the 8 send slots, and "
                      "no reconnection to a broker that is down."),
    cfg.ListOpt("api_witness_refused_roles", default=["service"],
                help="nova-api only: the vtpcm_witness filter witnesses no request whose "
                     "Keystone roles or service roles include one of these, nor one "
                     "carrying a service token (it logs why; Nova's answer is never "
                     "changed). Why: nova-compute holds service credentials, so a "
                     "compromised compute host could otherwise ask nova-api itself to "
                     "unshelve a server onto it and get a genuine witness. List the "
                     "role your service users have (upstream: 'service')."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    config.register(conf, vtpcm_group, API_OPTS)


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [(vtpcm_group, API_OPTS)]
