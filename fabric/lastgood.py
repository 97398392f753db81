"""Last-good cluster objects, persisted in the run dir so a restart keeps them (`last-good.json`, 0600).

What is kept: every Node the Store holds (they are good: bad ones are never recorded), and the raw
BGPConfiguration / BGPPeer / IPPool objects whose version in effect is good (fabric.crds). Not kept:
Secrets (a peer's password is read again; its secretKeyRef is in the object). At start the agent seeds
the Store's `remember()` and the CRD overlay's `seed()` with them, and — until the source has listed
every kind once — computes its effective configuration from them, so a restarted agent meeting a bad
object (or no API server) behaves as the previous run did instead of dropping pools or peers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fabric.inputs import NodeInfo

log = logging.getLogger("fabric.lastgood")

FILE = "last-good.json"
VERSION = 1


def load(run_dir: Path) -> dict[str, dict[str, Any]]:
    """kind -> key -> object (Nodes as NodeInfo); {} when absent or unreadable (logged)."""
    path = run_dir / FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s): starting without last-good objects", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("objects"), dict):
        log.warning("%s has an unknown format: starting without last-good objects", path)
        return {}
    out: dict[str, dict[str, Any]] = {}
    for kind, objs in data["objects"].items():
        if not isinstance(objs, dict):
            continue
        good: dict[str, Any] = {}
        for key, obj in objs.items():
            if kind == "Node":
                try:
                    good[key] = NodeInfo.model_validate(obj)
                except ValidationError:
                    continue
            elif isinstance(obj, dict):
                good[key] = obj
        out[kind] = good
    return out


def dump(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for kind, objs in objects.items():
        out[kind] = {k: (v.model_dump(mode="json", by_alias=True) if isinstance(v, NodeInfo) else v)
                     for k, v in sorted(objs.items())}
    return {"version": VERSION, "objects": out}


def save(run_dir: Path, objects: dict[str, dict[str, Any]]) -> None:
    """Atomic write, 0600 (the run dir is 0700)."""
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".last-good-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dump(objects), f, sort_keys=True, default=str)
        os.replace(tmp, run_dir / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
