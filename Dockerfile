# The bgp-fabric node agent image (manifests/daemonset.yaml runs it).
#   docker build -t bgp-fabric:0.1.0 .
FROM python:3.11-slim-bookworm

# iproute2: `ip` (render-config init container, debugging); ipvsadm, nftables, conntrack: inspecting
# and cleaning what the agent programs; kmod: modprobe in the prepare-node init container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 ipvsadm nftables conntrack kmod \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install . && cd / && rm -rf /src

WORKDIR /
ENTRYPOINT ["fabric", "agent", "-c", "/etc/bgp-fabric/config.yaml"]
