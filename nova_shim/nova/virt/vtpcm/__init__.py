# nova-compute loads drivers only from the nova.virt package
# (compute_driver = vtpcm.VTPCMLibvirtDriver); this shim only re-exports the
# driver, whose code lives in vtpcm_nova. Installed by tools/install-nova-shim.sh.
from vtpcm_nova.virt.driver import VTPCMLibvirtDriver

__all__ = ["VTPCMLibvirtDriver"]
