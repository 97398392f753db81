"""The CNI network configuration list the agent writes for the runtime (render pure, write atomic).

    {"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": "bgp-fabric",
     "plugins": [{"type": "bgp-fabric", "socket": "...", "mtu": 1480, "capabilities": {"portMappings": true}}]}

`cniVersion` 1.0.0 is what runtimes with an older libcni (containerd 1.6) read; runtimes that know
`cniVersions` (spec 1.1) pick 1.1.0 and get GC and STATUS. The file is written (temporary file +
rename in the same folder) only when its content changes, so the runtime never reads half a file
and an unchanged agent restart does not touch it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cni.spec import PLUGIN_TYPE

CONF_VERSION = "1.0.0"
CONF_VERSIONS = ["1.0.0", "1.1.0"]


def render(*, network: str, socket_path: str, mtu: int) -> dict[str, Any]:
    return {"cniVersion": CONF_VERSION, "cniVersions": CONF_VERSIONS, "name": network,
            "plugins": [{"type": PLUGIN_TYPE, "socket": socket_path, "mtu": mtu,
                         "capabilities": {"portMappings": True}}]}


def text(conf: dict[str, Any]) -> str:
    return json.dumps(conf, indent=2) + "\n"


def write(path: Path, conf: dict[str, Any]) -> bool:
    """Write `conf` to `path` atomically if it differs from what is there. Returns whether it wrote."""
    data = text(conf)
    try:
        if path.read_text() == data:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True
