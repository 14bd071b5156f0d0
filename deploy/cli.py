"""The ``tandem`` command line."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from protocol.sampling import SamplingParams


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="HF model directory, .gguf file, 'default' (SmolLM2-135M-Instruct) or dummy:<preset>")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache budget in GiB")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=tuple(args.stop))


def _llm(args: argparse.Namespace):
    from engine.llm import LLM

    print(f"loading {args.model} ({args.dtype}, {args.device})...", file=sys.stderr)
    return LLM(args.model, dtype=args.dtype, device=args.device, kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
               num_threads=args.threads)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _sampling(args)
    for prompt in args.prompt:
        t0 = time.perf_counter()
        if args.raw:
            result = llm.generate(prompt, params)[0]
        else:
            result = llm.chat([{"role": "user", "content": prompt}], params)
        dt = time.perf_counter() - t0
        out = result.outputs[0]
        print(out.text)
        print(f"[{len(out.token_ids)} tokens in {dt:.2f}s, {len(out.token_ids) / dt:.1f} tok/s, "
              f"finish: {out.finish_reason.value if out.finish_reason else '?'}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llm(args)
    params = _sampling(args)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = llm.chat(messages, params).outputs[0].text
        print(reply)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


_ETCD_ACCESS = ("etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_user", "etcd_password",
                "etcd_password_file")


def _cluster_config(args: argparse.Namespace):
    """The ``ClusterConfig`` of ``settings.add_arguments`` flags, with ``--internal-tls-dir``'s
    files as the ``internal_tls_*`` settings (a flag naming one of them wins) and as the ``etcd_*``
    ones (TLS with the cluster's certificate, the user ``tandem``), unless some etcd TLS or user
    setting is given (flag, env or config file): then those are etcd's, the directory's are not."""
    import os

    from deploy.certs import CertFiles
    from runtime import settings

    if args.internal_tls_dir:
        files = CertFiles.in_dir(args.internal_tls_dir)
        for name, path in files.settings().items():
            if getattr(args, name) is None:
                setattr(args, name, path)
        given = {name for name in _ETCD_ACCESS if getattr(args, name, None) is not None}
        given |= set(settings.read_env(os.environ)) & set(_ETCD_ACCESS)
        config = args.config or os.environ.get(settings.CONFIG_ENV)
        if config:
            given |= set(settings.read_config_file(config)) & set(_ETCD_ACCESS)
        if not given:
            for name, value in files.etcd_settings().items():
                setattr(args, name, value)
    return settings.from_args(args)


def _add_internal_tls_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--internal-tls-dir", default=None, metavar="DIR",
                   help="secure the cluster's internal connections with the files tandem certs wrote in DIR: "
                        "mutual TLS on the internal gRPC (workers, launcher service), and etcd over TLS with "
                        "DIR's certificate as the user tandem (DIR/etcd-password), unless etcd TLS or user "
                        "settings are given; tandem serve's embedded etcd then requires all of it")


def cmd_certs(args: argparse.Namespace) -> int:
    from deploy.certs import make_certs

    files = make_certs(args.out, args.host, args.days)
    print(f"tandem: wrote {files.ca} (the cluster CA), {files.cert} and {files.key} (every process's "
          f"certificate and key; hosts {', '.join(['127.0.0.1', '::1', 'localhost', *args.host])}) and "
          f"{files.etcd_password} (the password of the cluster's etcd user)\n"
          f"  tandem serve --internal-tls-dir {args.out}", flush=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.launcher import ServiceState
    from deploy.launcher_service import LauncherServer
    from deploy.local_cluster import LocalCluster
    from deploy.local_launcher import LocalLauncher

    # SIGTERM (a service manager, a container's stop) stops everything as Ctrl-C does; so does
    # SIGINT when our parent ignored it (a non-interactive shell's background job).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupt)
    cfg = _cluster_config(args)
    cluster = LocalCluster(cfg, num_prefill=args.prefill_workers, num_decode=args.decode_workers,
                           log_dir=args.log_dir)
    planner = control = None
    try:
        cluster.start()
        # One launcher for whoever scales the cluster: its planner here, or one in another process
        # (tandem planner) through the control service, which etcd lists under the cluster's namespace.
        launcher = LocalLauncher.around(cluster)
        control = LauncherServer(launcher, cluster.cfg).start()
        planner = _serve_planner(args, launcher)
        r = cluster.router
        mode = f"{cluster.num_prefill} prefill + {cluster.num_decode} decode" if cfg.mode == "disaggregated" \
            else f"{cluster.num_decode} aggregated"
        print(f"tandem: serving {r['model']} ({mode} worker(s), {cfg.dtype} on {cfg.device})\n"
              f"  OpenAI API   {r['http']}/v1   (e.g. curl {r['http']}/v1/models)\n"
              f"  KServe gRPC  {r['grpc']}\n"
              f"  metrics      {r['http']}/metrics\n"
              f"  etcd         {','.join(cluster.cfg.etcd_endpoints)}   (namespace {cfg.namespace}; "
              f"{_etcd_access(cfg)})\n"
              f"  launcher     {control.endpoint}   (tandem planner --etcd-endpoints ... scales the cluster)\n"
              + (f"  internal     mutual TLS, CA {cfg.internal_tls_ca_file}\n" if cfg.internal_tls_ca_file else "")
              + (f"  planner      {planner.config.mode} mode, every {planner.config.adjustment_interval_s:g} s, "
                 f"up to {planner.config.max_workers} workers, {planner.metrics_url} (--no-planner: none)\n"
                 if planner else "")
              + "Ctrl-C stops everything.", flush=True)
        # Until a service dies: one a planner drained was stopped on purpose, not dead.
        while not (dead := [s.name for s in launcher.services() if s.state is ServiceState.DEAD]):
            time.sleep(0.5)
        print(f"tandem: {', '.join(dead)} exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ntandem: stopping...", file=sys.stderr)
        return 0
    finally:
        # The children first: they exit while the planner and the launcher service stop here (the
        # cluster starts nothing once stopping, whatever the planner still decides).
        cluster.terminate()
        if planner is not None:
            planner.stop()
        if control is not None:
            control.stop()
        cluster.stop()


def _etcd_access(cfg) -> str:
    """How the cluster's processes reach etcd, in words (serve's banner)."""
    tls = "TLS with client certificates" if cfg.etcd_cert_file else "TLS" if cfg.etcd_ca_file else "plaintext"
    return f"{tls}, " + (f"user {cfg.etcd_user}" if cfg.etcd_user else "no user")


def _serve_planner(args: argparse.Namespace, launcher):
    """``tandem serve``'s planner, in this process, acting on its cluster (disaggregated or
    aggregated): on unless the planner setting says false (``--no-planner``, TANDEM_PLANNER, the
    config file)."""
    import os

    from deploy.planner_actuator import PlannerRunner
    from runtime import settings

    explicit = args.planner if args.planner is not None else settings.read_env(os.environ).get("planner")
    if explicit is None and args.config:
        explicit = settings.read_config_file(args.config).get("planner")
    if explicit is False:
        return None
    return PlannerRunner(launcher.cfg, launcher).start()


def cmd_planner(args: argparse.Namespace) -> int:
    """The planner in the foreground on a running cluster: on a ``tandem serve`` cluster (its etcd,
    ``--etcd-endpoints``) it acts through the launcher service ``tandem serve`` registered there; on
    a Ray deployment (``tandem deploy``) through the deployment's controller; with ``--dry-run`` it
    only writes decisions, on any cluster's etcd."""
    import logging

    from deploy.launcher_service import find_launcher
    from deploy.planner_actuator import PlannerRunner
    from deploy.planner_service import ray_planner

    signal.signal(signal.SIGTERM, _interrupt)  # stops as Ctrl-C does: its registration goes with its lease
    cfg = _cluster_config(args)
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s planner %(levelname)s %(name)s: %(message)s")
    launcher = find_launcher(cfg) if cfg.etcd_endpoints and not cfg.ray_address else None
    if launcher is not None and not args.dry_run and (acting := _acting_planners(cfg)):
        raise ValueError("a planner acts on this cluster already: " + ", ".join(
            f"{p.planner_id} (pid {p.pid})" for p in acting) + "; start tandem serve with --no-planner to run "
            "tandem planner instead (a planner that died is forgotten after its lease, lease_ttl_s)")
    if launcher is not None:  # a tandem serve cluster: act through its launcher service
        runner = PlannerRunner(launcher.cfg, launcher, dry_run=args.dry_run)
    elif args.dry_run and cfg.etcd_endpoints:  # any cluster's etcd: decide only
        runner = PlannerRunner(cfg, None, dry_run=True, num_workers=cfg.gpu_budget or cfg.num_prefill + cfg.num_decode)
    else:  # a Ray deployment: act through its controller
        runner = ray_planner(cfg, dry_run=args.dry_run)
    print(f"tandem: planner {runner.service.planner_id}, {runner.config.mode} mode, every "
          f"{runner.config.adjustment_interval_s:g} s, up to {runner.config.max_workers} workers"
          + (f", acting through the launcher at {launcher.endpoint}" if launcher is not None else "")
          + (" (dry run)" if args.dry_run else ""), flush=True)
    runner.run_forever()  # until Ctrl-C
    return 0


def _acting_planners(cfg):
    """The registered planners of ``cfg``'s namespace that act (not dry runs)."""
    import asyncio

    from runtime.discovery import list_planners
    from runtime.etcd import ControlPlane

    async def read():
        async with ControlPlane.from_config(cfg) as plane:
            return [p for p in await list_planners(plane) if not p.dry_run]
    return asyncio.run(read())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from prompts offline (chat template applied unless --raw)")
    _add_engine_args(g)
    _add_sampling_args(g)
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    g.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the model")
    _add_engine_args(c)
    _add_sampling_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.set_defaults(func=cmd_chat)

    from runtime import settings

    s = sub.add_parser("serve", help="run the embedded cluster: etcd, router, prefill and decode workers")
    settings.add_arguments(s)
    s.add_argument("--prefill-workers", type=int, default=1, help="prefill workers (disaggregated mode)")
    s.add_argument("--decode-workers", type=int, default=1, help="decode workers")
    s.add_argument("--log-dir", default=None, help="write each process's log here instead of the terminal")
    _add_internal_tls_dir(s)
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("planner", help="the autoscaler on a tandem serve cluster (--etcd-endpoints: its etcd), a "
                                        "Ray deployment (--ray-address), or any cluster's etcd with --dry-run "
                                        "(decisions only)")
    settings.add_arguments(pl)
    pl.add_argument("--dry-run", action="store_true", help="write decisions to etcd and Prometheus, act on nothing")
    _add_internal_tls_dir(pl)
    pl.set_defaults(func=cmd_planner)

    ce = sub.add_parser("certs", help="make a CA and a certificate for the cluster's internal mutual TLS and its "
                                      "etcd's TLS, and its etcd user's password (tandem serve --internal-tls-dir)")
    ce.add_argument("--out", required=True, metavar="DIR",
                    help="directory for ca.pem, tandem.pem, tandem-key.pem, etcd-password")
    ce.add_argument("--host", action="append", default=[],
                    help="a host name or address processes dial (repeatable; 127.0.0.1, ::1 and localhost always)")
    ce.add_argument("--days", type=int, default=365, help="validity in days")
    ce.set_defaults(func=cmd_certs)

    from deploy.ray_cli import add_parser as add_deploy_parser

    add_deploy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
