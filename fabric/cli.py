"""The `fabric` command: agent, plan, explain, check-config, lab, lab-kernel."""

from __future__ import annotations

import argparse
import os
import sys

from fabric import config as cfg

EXIT_BAD_CONFIG = 2


def _check_config(args: argparse.Namespace) -> int:
    c = _load(args.file)
    if c is None:
        return EXIT_BAD_CONFIG
    print(f"{args.file}: ok (node {c.node.name}, asn {c.node.asn or c.cluster.asn}, "
          f"{len(c.pools)} pool(s), {len(c.peers)} external peer(s))")
    return 0


def _lab_kernel(args: argparse.Namespace) -> int:
    from fabric.lab import kernel as labkernel

    try:
        if args.action == "status":
            ok, missing = labkernel.capable()
            print("this kernel has ipip, IPVS and dummy" if ok else f"this kernel lacks: {', '.join(missing)}")
            print(f"lab kernel cache: {labkernel.CACHE} ({'ready' if labkernel.uml_binary().exists() else 'absent'})")
            from fabric.lab import vm as labvm

            vm_ok, vm_missing = labvm.capable()
            print("this kernel has IPv4 nftables NAT too" if vm_ok else
                  f"nat tests need the lab VM (this kernel lacks: {', '.join(vm_missing)}); accel: {labvm.accel()}")
            print(f"lab VM cache: {labvm.CACHE} ({'ready, ' + labvm.kernel_version() if labvm.ready() else 'absent'})")
            return 0
        if args.action == "prepare":
            from fabric.lab import vm as labvm

            if labkernel.capable()[0]:
                print("lab kernel: not needed (this kernel has ipip, IPVS and dummy)")
            else:
                labkernel.ensure()
            if labvm.capable()[0]:
                print("lab VM: not needed (this kernel has IPVS and IPv4 nftables NAT)")
            else:
                labvm.ensure()
            return 0
        command = args.command
        if not command:
            print("fabric lab-kernel run: give a command after --", file=sys.stderr)
            return 2
        if args.backend == "vm":
            from fabric.lab import vm as labvm

            return labvm.run(command, timeout=args.timeout).returncode
        return labkernel.run(command, timeout=args.timeout, mem=args.mem).returncode
    except labkernel.LabKernelError as e:
        print(f"lab kernel: {e}", file=sys.stderr)
        return 1


def _lab_run(args: argparse.Namespace) -> int:
    from fabric.lab import runner

    return runner.main(args)


def _lab_exec(args: argparse.Namespace) -> int:
    from fabric.lab import exec_client

    return exec_client.main(args)


def _load(path: str) -> cfg.AgentConfig | None:
    try:
        return cfg.load(path)
    except cfg.ConfigError as e:
        for line in e.problems:
            print(f"{path}: {line}", file=sys.stderr)
        return None


def _agent(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    from pathlib import Path

    from fabric import logs

    logs.setup(args.log_level, args.log_format)
    c = _load(args.config)
    if c is None:
        return EXIT_BAD_CONFIG
    logs.register_secrets(p.password for p in c.peers)
    from fabric.agent import Agent

    return asyncio.run(Agent(c, Path(args.config)).run())


def _status(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fabric import status

    c = _load(args.config)
    if c is None:
        return EXIT_BAD_CONFIG
    run_dir = Path(c.paths.run_dir)
    if not run_dir.is_absolute():
        run_dir = Path(args.config).resolve().parent / run_dir
    try:
        s = status.read(run_dir)
    except (OSError, ValueError) as e:
        print(f"no agent status in {run_dir}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(s, indent=1) if args.json else status.render(s))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fabric import plan
    from ipip.kernel import FactsError

    c = _load(args.config)
    if c is None:
        return EXIT_BAD_CONFIG
    try:
        r = plan.compute(c, Path(args.config))
    except cfg.ConfigError as e:
        for line in e.problems:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except FactsError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 1
    print(plan.render_explain(r, args.target) if args.cmd == "explain" else plan.render_plan(r))
    return 0


def _explain_target(args: argparse.Namespace) -> int:
    """A service (ns/name, name) or VIP[:port]: the service part; an address or prefix: the route part
    too (an address can be both a VIP and inside a routed prefix)."""
    import ipaddress
    from pathlib import Path

    from fabric import plan

    c = _load(args.config)
    if c is None:
        return EXIT_BAD_CONFIG
    target = args.target
    try:
        text = plan.explain_services(c, Path(args.config), target) if c.services.enabled else None
    except cfg.ConfigError as e:
        for line in e.problems:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        ipaddress.IPv4Network(target, strict=False)
    except ValueError:
        if text is None:
            print(f"explain: {target!r} is no service (ns/name), VIP[:port], address or prefix known here",
                  file=sys.stderr)
            return 1
        print(text)
        return 0
    if text:
        print(text)
    return _plan(args)


def _config_arg() -> dict:
    """-c defaults to $FABRIC_CONFIG (set on a lab's agent nodes, so `fabric lab exec NODE -- fabric status` works)."""
    env = os.environ.get("FABRIC_CONFIG")
    return {"default": env, "required": not env, "help": "agent config file" + (f" (default {env})" if env else "")}


def _explain(args: argparse.Namespace) -> int:
    """Exit 0: allowed (or a route explained), 1: denied, 2: bad config or arguments."""
    if args.flow is None:
        if args.target is None:
            print("fabric explain: give a TARGET (service, VIP[:port], address or prefix) or --flow SRC DST "
                  "PORT/PROTO", file=sys.stderr)
            return EXIT_BAD_CONFIG
        return _explain_target(args)
    from fabric.policy.explain import FlowError, explain_flow, load_cluster

    c = _load(args.config)
    if c is None:
        return EXIT_BAD_CONFIG
    try:
        objs = load_cluster(c, args.config)
        r = explain_flow(objs["Pod"], objs["Namespace"], objs["NetworkPolicy"], objs["Node"], *args.flow)
    except cfg.ConfigError as e:
        for line in e.problems:
            print(f"{e.source}: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except FlowError as e:
        print(f"explain --flow: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(r.text())
    return 0 if r.allowed else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fabric", description="bgp-fabric: BGP routing fabric node agent")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check-config", help="validate an agent config file (exit 2 on problems)")
    c.add_argument("file")
    c.set_defaults(func=_check_config)

    a = sub.add_parser("agent", help="run the node agent (foreground)")
    a.add_argument("-c", "--config", **_config_arg())
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: human lines (default); json: one JSON object per line (time, level, logger, msg, exc)")
    a.set_defaults(func=_agent)

    st = sub.add_parser("status", help="show the running agent's status")
    st.add_argument("-c", "--config", **_config_arg())
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    pl = sub.add_parser("plan", help="print what the agent would change in this kernel (writes nothing)")
    pl.add_argument("-c", "--config", **_config_arg())
    pl.set_defaults(func=_plan)

    ex = sub.add_parser("explain", help="why a route/prefix/address is (or is not) programmed; with --flow, "
                                        "whether NetworkPolicy allows a connection and by which policy and rule")
    ex.add_argument("-c", "--config", **_config_arg())
    ex.add_argument("target", nargs="?", help="a service (namespace/name), a VIP[:port], an IPv4 address or prefix")
    ex.add_argument("--flow", nargs=3, metavar=("SRC", "DST", "PORT/PROTO"),
                    help="SRC and DST: a pod (namespace/name), a node name or an IPv4 address; PORT/PROTO: 80/tcp")
    ex.set_defaults(func=_explain)

    k = sub.add_parser("lab-kernel", help="the kernel that tests and labs run in")
    ksub = k.add_subparsers(dest="action", required=True)
    ksub.add_parser("status", help="does this kernel need the lab kernel; is its cache ready")
    ksub.add_parser("prepare", help="fetch and prepare the lab kernels this machine needs")
    kr = ksub.add_parser("run", help="boot the lab kernel once and run a command in it",
                         usage="fabric lab-kernel run [--timeout S] [--backend {uml,vm}] [--mem SIZE] -- COMMAND [ARG ...]")
    # Also accepted before `run` (older spelling: `lab-kernel --backend vm run -- CMD`).
    for parser, default in ((k, 1800.0), (kr, argparse.SUPPRESS)):
        parser.add_argument("--timeout", type=float, default=default, help="seconds before the kernel is killed")
        parser.add_argument("--backend", choices=["uml", "vm"], default="uml" if default == 1800.0 else default,
                            help="uml: user-mode Linux (default); vm: Debian's kernel in qemu, has IPv4 nftables NAT")
    kr.add_argument("--mem", default="2G", metavar="SIZE",
                    help="uml: the lab kernel's memory (default 2G; e.g. 6G for a 50-node bench)")
    kr.add_argument("command", nargs="*", metavar="COMMAND",
                    help="the command and its arguments, after -- (options after -- belong to the command)")
    k.set_defaults(func=_lab_kernel)

    lab = sub.add_parser("lab", help="containerlab-style labs built as namespaces")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    lr = lsub.add_parser("run", help="build a lab, check it, report, tear it down")
    lr.add_argument("topology")
    lr.add_argument("--keep", action="store_true",
                    help="leave the lab up after the report until Ctrl-C (enter it with `fabric lab exec`)")
    lr.add_argument("--timeout", type=float, default=900)
    lr.add_argument("--checks", metavar="FILE", help="checks file (default: <name>.checks.yml next to the topology)")
    lr.add_argument("--report-dir", metavar="DIR",
                    help="where report.txt and topology.svg go (default /tmp/bgp-fabric-reports/<lab>-<run>)")
    lr.set_defaults(func=_lab_run)
    le = lsub.add_parser("exec", help="run a command (default: a shell) in a node of a running lab",
                         usage="fabric lab exec [--lab NAME] [-t|-T] NODE [-- COMMAND [ARG ...]]")
    le.add_argument("--lab", help="the lab's name (or NAME@RUN, as `fabric lab ls` shows), when several labs run")
    t = le.add_mutually_exclusive_group()
    t.add_argument("-t", dest="tty", action="store_const", const=True, help="use a pty (default: only for a shell)")
    t.add_argument("-T", dest="tty", action="store_const", const=False, help="never use a pty")
    le.add_argument("node")
    le.add_argument("command", nargs="*", metavar="COMMAND", help="after --; the exit status is the command's")
    le.set_defaults(func=_lab_exec)
    ls = lsub.add_parser("ls", help="running labs and their nodes")
    ls.set_defaults(func=_lab_exec)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
