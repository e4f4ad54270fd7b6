"""The operator process: logging, configuration, kopf in standalone mode."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence

import kopf

from graft.controller.config import ConfigError, OperatorConfig
from graft.controller.handlers import Runtime, register
from graft.controller.login import login_in_cluster

logger = logging.getLogger("graft.controller")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graft operator",
        description="Run the Graft operator (configuration from GRAFT_* environment variables).",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG or in-cluster)")
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="namespace to watch (repeatable); overrides GRAFT_WATCH_NAMESPACES",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def configure_logging(fmt: str, verbose: bool) -> None:
    kopf.configure(
        debug=verbose,
        verbose=verbose,
        log_format=kopf.LogFormat.JSON if fmt == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("graft").setLevel(logging.DEBUG if verbose else logging.INFO)
    # The watch-stream chatter of kopf at INFO is noise at scale.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


async def run(config: OperatorConfig, kubeconfig: str | None) -> None:
    registry = kopf.OperatorRegistry()
    runtime = Runtime(config, kubeconfig)
    register(runtime, registry)

    @kopf.on.login(registry=registry)
    def graft_login(**kwargs: object) -> kopf.ConnectionInfo | None:
        if kubeconfig or os.environ.get("KUBECONFIG"):
            if kubeconfig:
                os.environ["KUBECONFIG"] = kubeconfig
            return kopf.login_with_kubeconfig(**kwargs)  # type: ignore[arg-type]
        return login_in_cluster()

    namespaces = list(config.watch_namespaces)
    logger.info(
        "starting: namespaces=%s trainer_image=%s output=%s",
        ",".join(namespaces) or "*",
        config.trainer_image,
        config.output_uri or "-",
    )
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = dict(os.environ)
    if args.namespace:
        env["GRAFT_WATCH_NAMESPACES"] = ",".join(args.namespace)
    try:
        config = OperatorConfig.from_env(env)
    except ConfigError as exc:
        print(f"graft operator: {exc}")
        return 2
    configure_logging(config.log_format, args.verbose)
    asyncio.run(run(config, args.kubeconfig))
    return 0
