"""What importing one of the package's optional faces prints in a fresh interpreter."""
import subprocess
import sys


def import_error(setup: str, module: str, timeout: float = 120):
    """Run ``setup`` then ``import module`` in a new interpreter, printing the ImportError's
    message if there is one; returns (stdout, stdout + stderr) for the assertion and its
    failure message."""
    code = f"{setup}\ntry:\n    import {module}\nexcept ImportError as e:\n    print(e)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=timeout)
    return r.stdout, r.stdout + r.stderr
