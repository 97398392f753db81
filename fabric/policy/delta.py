"""What one policy sync changes in the kernel: the reconciler's plan, per key. Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field

from fabric.policy.state import Rule


@dataclass
class Plan:
    new_sets: set[str] = field(default_factory=set)
    del_sets: set[str] = field(default_factory=set)
    set_add: dict[str, set] = field(default_factory=dict)  # set name -> elements to add
    set_del: dict[str, set] = field(default_factory=dict)
    new_chains: set[str] = field(default_factory=set)
    chains: dict[str, tuple[Rule, ...]] = field(default_factory=dict)  # chains (re)written, new ones too
    del_chains: set[str] = field(default_factory=set)
    map_add: dict[str, dict[str, str]] = field(default_factory=dict)  # map name -> ip -> chain
    map_del: dict[str, set[str]] = field(default_factory=dict)  # map name -> ips

    def __bool__(self) -> bool:
        return bool(self.new_sets or self.del_sets or self.new_chains or self.chains or self.del_chains
                    or any(self.set_add.values()) or any(self.set_del.values())
                    or any(self.map_add.values()) or any(self.map_del.values()))

    @property
    def elements_only(self) -> bool:
        """Only elements of existing sets and maps change (the pod-event case: netlink, no nft run)."""
        return not (self.new_sets or self.del_sets or self.new_chains or self.chains or self.del_chains)

    def counts(self) -> dict[str, int]:
        return {"elements": sum(map(len, self.set_add.values())) + sum(map(len, self.set_del.values()))
                + sum(map(len, self.map_add.values())) + sum(map(len, self.map_del.values())),
                "chains": len(self.chains) + len(self.del_chains), "sets": len(self.new_sets) + len(self.del_sets)}
