"""``python -m lockstep ARGS``: runs the installed ``lockstep`` binary with ARGS."""

import os
import sys

from ._api import binary

if __name__ == "__main__":
    exe = str(binary())
    if os.name == "nt":
        import subprocess

        sys.exit(subprocess.call([exe, *sys.argv[1:]]))
    os.execv(exe, [exe, *sys.argv[1:]])
