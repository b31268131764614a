"""The only code that touches the OS (see DESIGN.md).

pyroute2 becomes a bare package before any module here imports from it: the kernel
modules import the submodules they use, not pyroute2's whole API (pyroute2_lean.py).
"""

from appliance.kernel import pyroute2_lean

pyroute2_lean.install()
pyroute2_lean.install("pyroute2.ethtool")
