# The bgp-fabric node agent image (manifests/daemonset.yaml runs it).
#   docker build -t bgp-fabric:0.1.0 .

# The CNI plugin: a small static C program (cni/shim/bgp-fabric.c) the runtime runs on the host; the
# install-cni init container copies it to the node's /opt/cni/bin. Flags as cni/build.py.
FROM python:3.11-slim-bookworm AS cni-plugin
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY cni/shim/bgp-fabric.c /src/bgp-fabric.c
RUN mkdir /out && gcc -O2 -Wall -Wextra -Werror -static -s -o /out/bgp-fabric /src/bgp-fabric.c

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
COPY --from=cni-plugin /out/bgp-fabric /usr/lib/bgp-fabric/cni/bgp-fabric

WORKDIR /
ENTRYPOINT ["fabric", "agent", "-c", "/etc/bgp-fabric/config.yaml"]
