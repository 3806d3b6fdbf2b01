"""The ``atlas-pl`` command: a ``LightningCLI`` over ``Federation`` and ``FederatedDataModule``.

Examples: ``atlas-pl fit --config configs/demo.yaml`` (add ``--print_config`` to see every option, or
``--ckpt_path last`` to resume); ``atlas-pl predict --config run.yaml --ckpt_path last`` writes per-example
predictions to ``predictions.jsonl``; ``atlas-pl export --config run.yaml --ckpt_path last`` writes each cluster's
adapter in the PEFT folder format.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from atlas_pl.callbacks import FederatedProgress, FederatedResults, RoundCheckpoint
from atlas_pl.data import FederatedDataModule
from atlas_pl.export import export_peft
from atlas_pl.federation import Federation
from atlas_pl.io import AtomicCheckpointIO, atomic_write_text
from atlas_pl.transport.grpc_link import LinkError
from atlas_pl.transport.wire import Message

PredictSplit = Literal["test", "validation"]
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")


class CheckpointError(ValueError):
    """A ``--ckpt_path`` that does not exist or cannot be read (``atlas-pl`` exits with code 2)."""


def read_checkpoint(path: str, weights_only: bool | None = None) -> dict[str, Any]:
    """Load the checkpoint at ``path`` on the CPU, or raise an error that names the file and the fix.

    Raises:
        CheckpointError: The file is truncated, not a checkpoint, or has no ``state_dict``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001  # torch raises anything from RuntimeError to IndexError on bad bytes
        reason = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read (truncated or not a checkpoint; {type(err).__name__}: {reason}): "
            "pass another --ckpt_path or delete it"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path!r} is not a Lightning checkpoint (no `state_dict`): pass another --ckpt_path or "
            "delete it"
        )
    return checkpoint


def check_checkpoint_path(path: str | None, weights_only: bool | None = None) -> dict[str, Any] | None:
    """Fail early, before anything is built or written, on a local ``--ckpt_path`` that is missing or unreadable.

    Returns the checkpoint it loaded, or ``None`` when the path is left to Lightning.

    ``last``/``best``/``hpc``, registry names and remote paths are left to Lightning (``last`` is checked once the
    Trainer knows its checkpoint folder, see :func:`resolve_checkpoint`).

    Raises:
        CheckpointError: A missing, truncated or foreign file.
    """
    if not path or path in SPECIAL_CKPT_PATHS or str(path).startswith("registry:"):
        return None
    if not isinstance(get_filesystem(path), LocalFileSystem) or os.path.isdir(path):
        return None
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint {path!r} does not exist: pass an existing --ckpt_path (or `last` for the newest round "
            "checkpoint of this run)"
        )
    return read_checkpoint(path, weights_only)


def resolve_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """The file behind ``ckpt_path``: ``last`` is the newest ``last*.ckpt`` in the checkpoint callbacks' folders."""
    if ckpt_path != "last":
        return ckpt_path
    candidates = []
    for callback in trainer.checkpoint_callbacks:
        folder = getattr(callback, "dirpath", None)
        if folder and os.path.isdir(folder):
            names = [n for n in os.listdir(folder) if n.startswith("last") and n.endswith(".ckpt")]
            candidates += [os.path.join(folder, n) for n in names]
    return max(candidates, key=os.path.getmtime) if candidates else None


class AtlasTrainer(L.Trainer):
    """The ``Trainer`` of ``atlas-pl``: ``predict`` writes a predictions file, and ``export`` writes PEFT adapters."""

    @override
    def predict(  # type: ignore[override]
        self,
        model: L.LightningModule | None = None,
        dataloaders: Any = None,
        datamodule: L.LightningDataModule | None = None,
        return_predictions: bool | None = None,
        ckpt_path: str | None = None,
        weights_only: bool | None = None,
        split: PredictSplit = "test",
        output: str | None = None,
    ) -> Any:
        """Per-example predictions of every client's test (or validation) split, written to a JSONL file.

        With a ``Federation`` and a datamodule without ``predict_dataloader``, the examples of ``split`` are scored
        as ``test`` scores them and written to ``output`` (default ``<log_dir>/predictions.jsonl``), one JSON
        record per line: ``split``, ``client``, ``cluster``, ``example_id`` (position in the client's split),
        ``task``, ``task_id``, ``kind``, ``prediction``, ``label``, ``correct`` and, for classification,
        ``probabilities`` (over the task's classes, in class order) and the class names; generated text and its
        ``score`` for QA / summarization. Anything else runs Lightning's ``predict`` unchanged.

        Args:
            model: The model.
            dataloaders: Dataloaders (then Lightning's ``predict`` runs as is).
            datamodule: The datamodule.
            return_predictions: Whether to return the predictions (the file is written either way).
            ckpt_path: Checkpoint to predict with (``last``: the newest round checkpoint).
            weights_only: ``torch.load`` ``weights_only``.
            split: ``test`` or ``validation``.
            output: File to write (``.jsonl``); default ``<log_dir>/predictions.jsonl``.
        """
        if (
            not isinstance(model, Federation)
            or datamodule is None
            or dataloaders is not None
            or is_overridden("predict_dataloader", datamodule)
        ):
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        if split not in ("test", "validation"):
            raise ValueError(f"`split` must be 'test' or 'validation', got {split!r}")
        datamodule.setup("predict")
        model.attach_data(datamodule)
        loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
        with warnings.catch_warnings():  # the client-chunk sampler returns every index once, by construction
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
            batches = super().predict(model, loader, None, True, ckpt_path, weights_only) or []
        rows = [{"split": split, **row} for batch in batches for row in batch]  # type: ignore[union-attr]
        path = Path(output or os.path.join(self.log_dir or self.default_root_dir, "predictions.jsonl"))
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
        if self.is_global_zero:
            print(f"predictions of {len(rows)} examples ({split} split) written to {path}")
        return batches if return_predictions is not False else None

    def export(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        ckpt_path: str = "last",
        output_dir: str | None = None,
        per_client: bool = False,
    ) -> list[Path]:
        """Adapters of every cluster (and client) from a checkpoint, in the PEFT folder format.

        Each cluster's client and server LoRA halves are joined into one adapter over the whole model
        (``adapter_config.json`` + ``adapter_model.safetensors``, ranks in ``rank_pattern``), with the task heads of
        encoders in ``heads.safetensors`` and a README.md; load one with ``PeftModel.from_pretrained(base, folder)``.

        Args:
            model: The federation (built from the same config as the checkpoint).
            datamodule: The datamodule (its tasks give the heads and their names).
            ckpt_path: Checkpoint to export (``last``: the newest round checkpoint of this run).
            output_dir: Parent folder of ``cluster_<k>`` (and ``client_<i>``); default ``<log_dir>/peft``.
            per_client: Also export every client's own adapter pair (``client_<i>``).

        Returns:
            The written folders.

        Raises:
            CheckpointError: No checkpoint behind ``ckpt_path``, or an unreadable one.
            ValueError: ``model`` is not a ``Federation``.
        """
        if not isinstance(model, Federation):
            raise ValueError(f"`export` needs a Federation model, got {type(model).__name__}")
        path = resolve_checkpoint(self, ckpt_path)
        if path is None:
            raise CheckpointError(
                f"no checkpoint found for --ckpt_path {ckpt_path!r}: run `atlas-pl fit` with this config first, or "
                "pass the path of a checkpoint"
            )
        checkpoint = check_checkpoint_path(path) or read_checkpoint(path)  # one load for a local file
        if datamodule is not None:
            datamodule.setup("predict")
            model.attach_data(datamodule)
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"], strict=False)
        folders = export_peft(
            model, output_dir or os.path.join(self.log_dir or self.default_root_dir, "peft"), per_client
        )
        if self.is_global_zero:
            print(f"exported {len(folders)} PEFT adapters from {path}:")
            for folder in folders:
                print(f"  {folder}")
        return folders

    def serve(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        clients: list[int] | None = None,
        output_dir: str | None = None,
        round_timeout_s: float = 600.0,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Run the server half of the config's federation for clients in other processes (``atlas-pl client``).

        The server holds the server adapters, task heads and their optimizers, answers every client's training and
        validation batches over gRPC, and runs the config's ``ClusterAggregation`` at every round end; it stops when
        every expected client has finished. State after every round: ``<output_dir>/server_state.pt``.

        Args:
            model: The federation (the same config and seed as the clients').
            datamodule: The datamodule (the server reads the task list and client sizes from it).
            address: ``host:port`` to listen on (port 0: a free port, written to ``<output_dir>/address``).
            token: Shared secret the clients must present (``--token``); none: any client is accepted.
            tls_cert: PEM certificate of the server (TLS with ``tls_key``).
            tls_key: PEM private key of the server.
            clients: Client ids expected at every round end (default: all of the config's clients).
            output_dir: Folder of the server state and log; default ``<default_root_dir>/server``.
            round_timeout_s: Seconds to wait at a round end for late clients before leaving them out of the merge.
            resume: Continue from ``<output_dir>/server_state.pt``.
        """
        from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation
        from atlas_pl.transport import LinkServer, SplitServer

        fed = _networked(model, datamodule, list(getattr(self, "callbacks", [])))
        out = Path(output_dir or os.path.join(self.default_root_dir, "server"))
        aggregation = next((c for c in getattr(self, "callbacks", []) if isinstance(c, ClusterAggregation)), None)
        server = SplitServer(fed, aggregation, clients, out, round_timeout_s, resume)
        link = LinkServer(server, address, token, tls_cert, tls_key).start()
        atomic_write_text(out / "address", link.address)
        print(f"atlas-pl serve: listening on {link.address} for clients {server.expected}", flush=True)
        try:
            while not set(server.expected) <= server.finished:
                link.wait(0.2)
        finally:
            link.stop()
        print(f"atlas-pl serve: every client finished; state in {out}", flush=True)
        return {"completed_round": server.completed_round, "log": server.log}

    def client(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule | None = None,
        server: str = "127.0.0.1:50051",
        clients: list[int] | None = None,
        token: str | None = None,
        tls_root_cert: str | None = None,
        compression: Literal["none", "bf16", "fp16"] = "none",
        timeout_s: float = 120.0,
        output_dir: str | None = None,
        resume: bool = False,
    ) -> list[dict[str, Any]]:
        """Train some clients of the config's federation against a server started with ``atlas-pl serve``.

        This process runs the clients' layers and adapters on their own data for ``trainer.max_epochs`` rounds:
        activations go to the server, activation gradients come back, and at every round end the client adapters
        are merged by the server. Per round: ``<output_dir>/clients_<ids>.json`` (train and validation loss per
        client, bytes) and ``clients_<ids>.pt`` (adapters, optimizer moments) for ``--resume true``.

        Args:
            model: The federation (the same config and seed as the server's).
            datamodule: The datamodule (each client reads only its own data).
            server: The server's ``host:port``.
            clients: Client ids this process runs (default ``[0]``).
            token: The server's shared token.
            tls_root_cert: PEM certificate that signed the server's (TLS on).
            compression: Wire dtype of activations and gradients.
            timeout_s: Seconds to wait for each reply of the server.
            output_dir: Folder of the results and state; default ``<default_root_dir>/clients``.
            resume: Continue from this folder's state of the same clients.
        """
        from atlas_pl.transport import LinkClient, RemoteClients

        ids = list(clients) if clients is not None else [0]
        fed = _networked(model, datamodule, list(getattr(self, "callbacks", [])))
        out = Path(output_dir or os.path.join(self.default_root_dir, "clients"))
        stem = out / f"clients_{'_'.join(str(c) for c in ids)}"
        link = LinkClient(server, token, tls_root_cert, timeout_s)
        try:
            remote = RemoteClients(fed, datamodule, link, ids, compression)
            state = stem.with_suffix(".pt")
            if resume and not state.exists():
                raise FileNotFoundError(f"--resume: no client state at {state}; start these clients without --resume")
            start = remote.load(state) + 1 if resume else 0
            served = remote.hello()
            if served != start - 1:
                raise ValueError(
                    f"the server has completed round {served} and clients {ids} round {start - 1}: resume both from "
                    "the same round (--resume true on both after a crash, or a fresh server for a fresh run)"
                )
            for round_idx in range(start, int(self.max_epochs or 1)):
                row = remote.round(round_idx)
                losses = [v for k, v in row.items() if k.startswith("val_loss/")]
                print(f"atlas-pl client {ids}: round {round_idx} val loss {sum(losses) / len(losses):.4f}", flush=True)
                from atlas_pl.transport.remote import save_state

                save_state(stem.with_suffix(".pt"), remote.state_dict(round_idx))
                atomic_write_text(stem.with_suffix(".json"), json.dumps({"history": remote.history,
                    "step_seconds": remote.step_seconds}, indent=1))  # fmt: skip
            for c in ids:
                remote.link.request(Message("bye", {"client": str(c)}))
        finally:
            link.close()
        return remote.history


def _networked(model: Any, datamodule: Any, callbacks: list[Any]) -> Federation:
    """The federation of ``serve`` / ``client`` with its data attached; phases 1-2 are not networked yet."""
    from atlas_pl.callbacks import RankAllocation, TaskClustering

    if not isinstance(model, Federation) or datamodule is None:
        raise ValueError("`serve` and `client` need a Federation model and its datamodule (the run's config)")
    unsupported = [type(c).__name__ for c in callbacks if isinstance(c, (TaskClustering, RankAllocation))]
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)} do not run over the network yet; remove them from trainer.callbacks for "
            "`serve` and `client` (clients keep the config's ranks and cluster 0), or train in one process with `fit`"
        )
    if model.backbone.shape != "two_part":
        raise ValueError("`serve` and `client` run the two-part split only; set model.split_shape: two_part")
    private = [n for n, on in (("model.dp_sgd", model.dp_sgd is not None),
                               ("model.bottleneck", model.backbone.bottleneck is not None)) if on]  # fmt: skip
    if private:
        raise ValueError(
            f"{' and '.join(private)} do not run over the network yet (the networked client step has no per-example "
            "clipping or learned noise); train in one process with `fit`, or drop them (model.activation_noise and "
            "data.label_dp_epsilon do work over the network)"
        )
    datamodule.setup("fit")
    model.attach_data(datamodule)
    return model


class AtlasCLI(LightningCLI):
    """``LightningCLI`` with federation defaults: rounds as epochs, round progress, results JSON, round checkpoints.

    A ``RoundCheckpoint`` writes ``<save_dir>/<name>/checkpoints/last.ckpt`` atomically after every round (unless the
    config has its own ``ModelCheckpoint`` or ``trainer.enable_checkpointing`` is false).
    """

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``export``, ``serve`` and ``client`` (methods of ``AtlasTrainer``)."""
        return {**LightningCLI.subcommands(), **dict.fromkeys(("export", "serve", "client"), {"model", "datamodule"})}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_clients", "model.num_clients")
        parser.link_arguments("data.task_format", "model.task_format")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then check a ``--ckpt_path`` file before anything is built (a bad one exits 2 naming the file)."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            options = self.config[subcommand]
            check_checkpoint_path(options.get("ckpt_path"), options.get("weights_only"))

    def _check_last_checkpoint(self) -> None:
        """``--ckpt_path last``: check the file it names, now that the Trainer knows its checkpoint folder."""
        options = self.config_init[self.subcommand]
        if options.get("ckpt_path") == "last":
            check_checkpoint_path(resolve_checkpoint(self.trainer, "last"), options.get("weights_only"))

    def before_fit(self) -> None:
        self._check_last_checkpoint()

    def before_validate(self) -> None:
        self._check_last_checkpoint()

    def before_test(self) -> None:
        self._check_last_checkpoint()

    def before_predict(self) -> None:
        self._check_last_checkpoint()

    @override
    def instantiate_trainer(self, **kwargs: Any):  # type: ignore[override]
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if config.get("plugins") is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        callbacks = list(config.get("callbacks") or [])
        if not any(isinstance(c, FederatedResults) for c in callbacks):
            callbacks.append(FederatedResults())
        if config.get("enable_checkpointing") is not False:
            callbacks = with_round_checkpoint(callbacks, config)
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FederatedProgress())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def default_checkpoint_dir(config: dict[str, Any]) -> str:
    """``<save_dir>/<name>/checkpoints`` of the configured logger (not its versioned folder: ``last`` must find it)."""
    logger = config.get("logger")
    if isinstance(logger, (list, tuple)):
        logger = logger[0] if logger else None
    root_dir = config.get("default_root_dir") or os.getcwd()
    root = getattr(logger, "root_dir", None)
    if root is None:  # no logger object: Lightning's default logger folder, or the root folder without a logger
        root = root_dir if logger is False else os.path.join(root_dir, "lightning_logs")
    return os.path.join(str(root), "checkpoints")


def with_round_checkpoint(callbacks: list[Any], config: dict[str, Any]) -> list[Any]:
    """Add a ``RoundCheckpoint`` unless one is configured; warn of a ``ModelCheckpoint`` that never writes per round."""
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    for c in checkpoints:
        if not isinstance(c, RoundCheckpoint) and c.save_last and c.save_top_k == 0:
            warnings.warn(
                "ModelCheckpoint(save_last=True, save_top_k=0) writes last.ckpt only when fit ends (Lightning >= 2.6): "
                "a crash loses every round. Use atlas_pl.callbacks.RoundCheckpoint (or drop the callback: atlas-pl "
                "adds one) to write last.ckpt after every round",
                UserWarning,
                stacklevel=2,
            )
    for c in checkpoints:  # a configured RoundCheckpoint (e.g. `asynchronous: true`) writes where `last` looks
        if isinstance(c, RoundCheckpoint) and c.dirpath is None:
            c.dirpath = default_checkpoint_dir(config)
    if checkpoints:
        return callbacks
    return [*callbacks, RoundCheckpoint(dirpath=default_checkpoint_dir(config))]


TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 5,
    "num_sanity_val_steps": 0,
    "use_distributed_sampler": False,
    "log_every_n_steps": 1,
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``atlas-pl`` console script (``args`` for programmatic use and tests)."""
    try:
        AtlasCLI(
            Federation,
            FederatedDataModule,
            trainer_class=AtlasTrainer,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except (ValueError, KeyError, FileNotFoundError, LinkError) as err:
        if os.environ.get("ATLAS_PL_DEBUG"):
            traceback.print_exc()
        print(f"atlas-pl: error: {err}\n(set ATLAS_PL_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
