"""Pod networking for bgp-fabric: the CNI plugin's agent side, IPAM, and the pods' nftables table.

A lower package: it never imports fabric/ (the agent passes it plain inputs). The plugin executable
itself is the small C program in cni/shim/, built by cni.build.
"""
