"""`shoal peer`: run a swarm peer (data-parallel trainer, or a pipeline stage server).

    shoal peer --mode diloco --run-dir runs/a --port 31337          # first peer
    shoal peer --mode diloco --run-dir runs/b --join 127.0.0.1:31337

Stdout carries progress lines (``--json``: one JSON object per line with an ``event`` key;
see ``docs/peer.md``); logs go to stderr. SIGINT/SIGTERM stop the peer cleanly.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer

__all__ = ["flag_names", "register"]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The settings' names in the layers below, and the flags that set them: errors raised there
# name their own fields, which a user of `shoal peer` never typed.
_FLAGS = {
    "NetConfig.port": "--port",
    "NetConfig.host": "--host",
    "NetConfig.announce": "--announce",
    "data_dir": "--data-dir",
    "optim.lr": "--lr",
    "data.seq_len": "--seq-len",
    "data.batch_size": "--batch-size",
    "data.eval_batches": "--eval-batches",
    "model.d_model": "--width",
    "model.n_layer": "--layers",
    "outer.lr": "--outer-lr",
    "outer.momentum": "--outer-momentum",
    "wire_codec": "--codec",
    "aggregation": "--aggregation",
    "topk": "--topk",
    "local_steps": "--local-steps",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "target_batch": "--target-batch",
    "overlap_steps": "--overlap-steps",
    "metrics_port": "--metrics-port",
    "window_s": "--window",
    "max_group_size": "--max-group-size",
    "heartbeat_s": "--heartbeat",
    "checkpoint_every_rounds": "--checkpoint-every",
    "eval_every_rounds": "--eval-every",
    "eval_batches": "--eval-batches",
    "report_every": "--report-every",
    "join addresses": "--join addresses",
}
# Plain words are flags only where a message starts with them ("steps must be ...").
_LEADING_FLAGS = (
    "steps",
    "fragments",
    "threads",
    "rank",
    "port",
    "lr",
    "announce",
    "mode",
    "swarm",
    "shard",
)
_NAMES = re.compile(
    "|".join(
        rf"(?<![\w./'\"-]){re.escape(name)}(?![\w/'\"])" for name in sorted(_FLAGS, key=len)[::-1]
    )
)
_LEADING = re.compile(rf"^({'|'.join(_LEADING_FLAGS)})(?![\w])")


def flag_names(message: str) -> str:
    """``message`` with the settings it names spelled as ``shoal peer``'s flags."""
    message = _NAMES.sub(lambda m: _FLAGS[m.group(0)], message)
    return _LEADING.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def register(app: typer.Typer) -> None:
    @app.command("peer")
    def peer(
        mode: str = typer.Option("diloco", "--mode", help="sync | diloco | streaming"),
        join: list[str] = typer.Option([], "--join", help="Bootstrap HOST:PORT (repeatable)."),  # noqa: B008
        data_dir: str = typer.Option(None, "--data-dir", help="Text files (default: embedded)."),
        run_dir: Path = typer.Option(Path("runs/peer"), "--run-dir", help="Key + checkpoints."),  # noqa: B008
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(0, "--port", help="TCP port (0 = any)."),
        announce: str = typer.Option(
            None, "--announce", help="host:port to publish instead of the listener's (a proxy)."
        ),
        metrics_port: int = typer.Option(None, "--metrics-port", help="Prometheus port."),
        events: Path = typer.Option(None, "--events", help="JSONL event log path."),  # noqa: B008
        swarm: str = typer.Option("default", "--swarm", help="Swarm name."),
        swarm_key_file: Path = typer.Option(None, "--swarm-key-file", help="Closed-swarm key."),  # noqa: B008
        steps: int = typer.Option(1_000_000, "--steps", help="Stop after N local steps."),
        local_steps: int = typer.Option(50, "--local-steps", "-H", help="DiLoCo H."),
        outer_lr: float = typer.Option(0.7, "--outer-lr"),
        outer_momentum: float = typer.Option(0.9, "--outer-momentum"),
        codec: str = typer.Option(
            None,
            "--codec",
            help="Wire codec: none | fp16 | int8 | int4 | sparse "
            "(default: int8; sparse with --topk).",
        ),
        aggregation: str = typer.Option(
            "mean",
            "--aggregation",
            help="How reducers combine contributions: mean | trimmed_mean | centered_clip "
            "(the robust ones withstand a minority of lying peers).",
        ),
        rank: int = typer.Option(0, "--rank", help="DiLoCo low-rank averaging (0 = off)."),
        topk: float = typer.Option(
            0.0,
            "--topk",
            help="DiLoCo: send this fraction of each pseudo-gradient, its largest values, "
            "with error feedback (0 = off).",
        ),
        client_mode: bool = typer.Option(
            False,
            "--client-mode",
            help="Average without reducing or being dialed (a slow peer, or one behind a NAT).",
        ),
        assume_reachable: bool = typer.Option(
            False,
            "--assume-reachable",
            help="Skip the dial-back check that turns client mode on behind a NAT.",
        ),
        relay: bool = typer.Option(
            False, "--relay", help="Relay for peers behind NATs (needs a public address)."
        ),
        fragments: int = typer.Option(4, "--fragments", help="Streaming DiLoCo fragments."),
        overlap_steps: int = typer.Option(
            None, "--overlap-steps", help="Streaming overlap (default: 5, at most H/fragments)."
        ),
        target_batch: int = typer.Option(256, "--target-batch", help="Sync: global batch."),
        batch_size: int = typer.Option(8, "--batch-size"),
        seq_len: int = typer.Option(64, "--seq-len"),
        lr: float = typer.Option(3e-3, "--lr", help="Inner AdamW peak learning rate."),
        model: str = typer.Option("tiny", "--model"),
        layers: int = typer.Option(None, "--layers", help="Override the model's n_layer."),
        width: int = typer.Option(None, "--width", help="Override the model's d_model."),
        shard: str = typer.Option(None, "--shard", help="Data shard I/N (default: by PeerID)."),
        seed: int = typer.Option(0, "--seed", help="Model init seed (same on every peer)."),
        threads: int = typer.Option(1, "--threads"),
        window_s: float = typer.Option(15.0, "--window", help="First matchmaking window, s."),
        heartbeat_s: float = typer.Option(3.0, "--heartbeat", help="Membership period, s."),
        max_group: int = typer.Option(
            64, "--max-group-size", help="Largest all-reduce group (2-256); beyond, across groups."
        ),
        ckpt_rounds: int = typer.Option(1, "--checkpoint-every", help="Rounds per disk write."),
        eval_rounds: int = typer.Option(0, "--eval-every", help="Rounds per validation."),
        eval_batches: int = typer.Option(8, "--eval-batches", help="Batches per validation."),
        report_every: int = typer.Option(10, "--report-every", help="Steps per step line."),
        role: str = typer.Option("trainer", "--role", help="trainer | stage"),
        stage: str = typer.Option("auto", "--stage", help="Pipeline stage K or auto."),
        tp: int = typer.Option(1, "--tp", help="Tensor-parallel ranks of a stage server."),
        json_out: bool = typer.Option(False, "--json", help="JSON progress lines."),
    ) -> None:
        """Join (or start) a swarm and train."""
        from shoal.cli._peer_run import run_stage, run_trainer
        from shoal.cli.train import setup_logging

        setup_logging()
        from shoal.errors import ConfigError

        try:
            key = swarm_key_file.read_bytes().strip() if swarm_key_file is not None else b""
        except OSError as exc:
            raise ConfigError(f"--swarm-key-file {swarm_key_file}: {exc.strerror}") from exc
        if events is not None and events.is_dir():
            raise ConfigError(f"--events {events}: is a directory; give a file path")
        if role == "stage":
            raise typer.Exit(
                run_stage(
                    stage=stage,
                    tp=tp,
                    join=join,
                    port=port,
                    host=host,
                    run_dir=run_dir,
                    swarm_key=key,
                    model=model,
                )
            )
        if role != "trainer":
            raise ConfigError(f"--role must be trainer or stage, got {role!r}")
        overrides = {k: v for k, v in (("n_layer", layers), ("d_model", width)) if v is not None}
        shard_index, num_shards = None, 1
        if shard:
            i, _, n = shard.partition("/")
            if not i.isdigit() or not n.isdigit():
                raise ConfigError(f"--shard must be I/N (e.g. 0/4), got {shard!r}")
            shard_index, num_shards = int(i), int(n)
        from shoal.train.outer import OuterConfig
        from shoal.train.swarm_config import PeerOptions

        try:
            opts = PeerOptions(
                mode=mode,
                join=tuple(join),
                run_dir=run_dir,
                data_dir=data_dir,
                host=host,
                port=port,
                announce=announce,
                metrics_port=metrics_port,
                events=events,
                swarm=swarm,
                swarm_key=key,
                model=model,
                model_overrides=overrides,
                seq_len=seq_len,
                batch_size=batch_size,
                lr=lr,
                steps=steps,
                seed=seed,
                shard_index=shard_index,
                num_shards=num_shards,
                threads=threads,
                local_steps=local_steps,
                outer=OuterConfig(lr=outer_lr, momentum=outer_momentum),
                wire_codec=codec or ("sparse" if topk else "int8"),
                aggregation=aggregation,
                client_mode=client_mode,
                check_reachability=not assume_reachable,
                relay=relay,
                rank=rank,
                topk=topk,
                fragments=fragments,
                overlap_steps=overlap_steps,
                target_batch=target_batch,
                window_s=window_s,
                max_group_size=max_group,
                heartbeat_s=heartbeat_s,
                checkpoint_every_rounds=ckpt_rounds,
                eval_every_rounds=eval_rounds,
                eval_batches=eval_batches,
                report_every=report_every,
                json=json_out,
            )
            code = run_trainer(opts)
        except ConfigError as exc:
            raise ConfigError(flag_names(str(exc))) from exc
        raise typer.Exit(code)
