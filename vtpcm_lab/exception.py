"""The lab's own error (the lab is test tooling, not the product: the
product's exception module knows nothing of it)."""

from vtpcm_common.exception import VTPCMException


class LabError(VTPCMException):
    msg_fmt = "Two-host lab: %(reason)s"
    code = "lab_error"
