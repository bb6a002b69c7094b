"""Hatchling build hook: ship mergekit_cabs_autoload.pth in every wheel.

The .pth file goes to the root of the wheel, so installers put it straight
into site-packages, where Python's ``site`` module runs it at start-up. It is
added both to normal wheels (``force_include``) and to editable wheels
(``force_include_editable``; hatchling builds those from that map alone once
it is non-empty), so ``pip install .`` and ``pip install -e .`` behave alike.
"""

import os

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH = "mergekit_cabs_autoload.pth"


class AutoloadPthHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        if self.target_name != "wheel":
            return
        source = os.path.join(self.root, PTH)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{PTH} is missing from {self.root}")
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data[key][source] = PTH
