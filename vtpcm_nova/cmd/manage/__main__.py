import sys

from vtpcm_nova.cmd.manage import main

sys.exit(main())
