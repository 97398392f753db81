"""The IPVS service proxy: Services/EndpointSlices -> IPVS virtual servers + one nftables table.

Entry point: `loadbalancer.proxy.ServiceProxy` (see docs/services.md).
"""
