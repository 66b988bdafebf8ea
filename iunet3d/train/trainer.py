"""The DDP training loop: patches from Zarr -> segmentation iUNet -> Dice + CE, checkpoints, W&B.

Launch with ``torchrun --nproc-per-node=N -m iunet3d train --config FILE`` (or ``iunet3d train`` for one
process). Every rank builds the same network from the same seed, reads its own disjoint patch stream,
and synchronises gradients through DDP; rank 0 alone writes checkpoints and logs to W&B.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from iunet3d.data import CTNormalization, open_dataset
from iunet3d.data.resampling import dataset_target_spacing
from iunet3d.distributed import Distributed
from iunet3d.models.precision import autocast_dtype_for
from iunet3d.models.segmentation import SegmentationIUNet
from iunet3d.patches import split_cases
from iunet3d.tracking.wandb_run import WandbLogger, create_logger, sync_command
from iunet3d.train.checkpoint import CheckpointManager, load_checkpoint
from iunet3d.train.checkpoint_artifacts import (
    artifact_name,
    artifact_reference,
    checkpoint_aliases,
    checkpoint_metadata,
)
from iunet3d.train.config import TrainingConfig, check_resume_config
from iunet3d.train.health import InvertibilityMonitor
from iunet3d.train.loss import DiceCELoss
from iunet3d.train.patch_validation import PatchValidator
from iunet3d.train.preemption import PreemptionFlag
from iunet3d.train.rng_state import capture_rng_state, restore_rng_state
from iunet3d.train.run_directory import prepare_run_directory, write_summary
from iunet3d.train.run_fingerprint import dataset_fingerprint, network_layout
from iunet3d.train.schedule import build_scheduler
from iunet3d.train.throughput import ThroughputMeter
from iunet3d.train.toml_config import to_dict
from iunet3d.train.validator import ValidationResult, Validator
from iunet3d.train.volume_validation import VolumeValidator

#: Fault injection for the crash-and-resume tests: "RANK:STEP" makes that rank exit abruptly (code 1)
#: after finishing STEP, in the first attempt of a torchrun job only (TORCHELASTIC_RESTART_COUNT 0).
CRASH_ENV = "IUNET3D_CRASH_AFTER_STEP"


class TrainingError(ValueError):
    """The run cannot go on (non-finite loss, a checkpoint that does not fit the dataset...)."""


def check_classes(config: TrainingConfig, class_names: list[str], source: str) -> None:
    expected = config.data.classes
    if expected is not None and list(expected) != list(class_names):
        raise TrainingError(
            f"{source}: has {len(class_names)} classes {list(class_names)}, but data.classes in the config expects "
            f"{len(expected)}: {list(expected)}"
        )
    if len(class_names) < 2:
        raise TrainingError(f"{source}: has {len(class_names)} class ({class_names}); segmentation needs >= 2")


class Trainer:
    """Builds the components from their config sections and runs the loop (``fit``)."""

    def __init__(self, config: TrainingConfig, distributed: Distributed):
        self.config, self.distributed = config, distributed
        self.run_dir = Path(config.run.dir)
        data, train = config.data, config.train
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep=train.keep_checkpoints)
        resume_from = self._find_checkpoint()  # a refused resume stops here, before anything is written
        try:
            self.dataset = open_dataset(data.dataset)
        except ValueError as error:
            raise TrainingError(f"data.dataset: {error}") from None
        check_classes(config, self.dataset.class_names, f"dataset {self.dataset.path}")
        train_cases, validation_cases = split_cases(self.dataset.case_names, data.validation_cases, data.split_seed)
        self.normalization = (
            CTNormalization.window(*data.window) if data.window else CTNormalization.from_dataset(self.dataset)
        )
        try:
            self.target_spacing = dataset_target_spacing(self.dataset, data.target_spacing)
        except ValueError as error:
            raise TrainingError(f"data.target_spacing: {error}") from None
        self.device = distributed.device
        torch.manual_seed(train.seed)
        self.memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
        self.network = SegmentationIUNet(1, self.dataset.num_classes, **config.model.network_kwargs())
        self.network.to(self.device, memory_format=self.memory_format)
        for parameter in self.network.parameters():  # 1x1x1 kernels: standard strides, as their gradients have
            if parameter.dim() == 5 and parameter.shape[2:] == (1, 1, 1):
                parameter.data = torch.empty_like(parameter, memory_format=torch.contiguous_format).copy_(parameter)
        self.model = self.network
        if distributed.active:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients as views of the all-reduce buckets: no copy, and no stride mismatch warning for
            # 1x1x1 kernels in channels-last format.
            self.model = DistributedDataParallel(self.network, device_ids=device_ids, gradient_as_bucket_view=True)
        self.loss = DiceCELoss(config.loss.dice_weight, config.loss.ce_weight)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, steps=train.steps, warmup_steps=train.warmup_steps,
                                         schedule=train.schedule, min_lr_ratio=train.min_lr_ratio)  # fmt: skip
        on_cuda = self.device.type == "cuda"
        self.autocast_dtype = autocast_dtype_for(train.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and train.precision == "fp16")
        self.loader = self._patch_loader(train_cases, pin_memory=on_cuda)
        self.validator = self._validator(validation_cases) if validation_cases else None
        self.step = 0
        self.best_validation: tuple[float, int] | None = None  #: (val/dice_mean, step) of the best validation
        self.last_validation_step: int | None = None
        self.identity = self._prepare_run()
        if resume_from is not None:
            self._resume(*resume_from)
        self.logger = create_logger(
            config.wandb, self.run_dir, self._run_config(train_cases, validation_cases),
            self.identity["wandb_id"], self.step, distributed.rank,
        )  # fmt: skip
        self.preemption = PreemptionFlag()
        self.last_validation: ValidationResult | None = None
        self.health = InvertibilityMonitor(train.health_every, train.health_threshold, distributed, self.autocast)
        self.last_image: torch.Tensor | None = None  # the last micro-batch, for the health check
        self.last_loss_terms: dict[str, float] = {}  # the last step's unweighted loss terms
        self.dashboard_seconds = 0.0  # spent on W&B panels, tables and checkpoint artifacts (this start)

    def _patch_loader(self, cases: list[str], pin_memory: bool):
        from iunet3d.patches import PatchLoader, PatchStream

        data = self.config.data
        stream = PatchStream(
            self.dataset,
            patch_size=data.patch_size,
            rank=self.distributed.rank,
            world_size=self.distributed.world_size,
            seed=self.config.train.seed,
            transform=self.config.augmentation if data.augment else None,
            foreground_fraction=data.foreground_fraction,
            class_probabilities=data.class_probabilities(self.dataset.num_classes),
            cases=cases,
            normalization=self.normalization,
            target_spacing="native" if self.target_spacing is None else self.target_spacing,
            image_interpolation=data.image_interpolation,
            label_interpolation=data.label_interpolation,
        )
        return PatchLoader(stream, data.batch_size, data.num_workers, pin_memory=pin_memory)

    def _validator(self, cases: list[str]) -> Validator:
        """Whole-volume validation (the default), or patch-based with ``validation.mode = "patch"``."""
        arguments = (self.dataset, cases, self.config.data.patch_size, self.config.validation, self.distributed,
                     self.normalization, self.autocast_dtype)  # fmt: skip
        data = self.config.data
        spacing = {"target_spacing": self.target_spacing, "image_interpolation": data.image_interpolation}
        if self.config.validation.mode == "patch":
            return PatchValidator(*arguments, to_device=self.to_device, label_interpolation=data.label_interpolation,
                                  **spacing)  # fmt: skip
        return VolumeValidator(*arguments, scratch=self.run_dir, **spacing)

    def to_device(self, image: torch.Tensor) -> torch.Tensor:
        """An image batch (B, 1, D, H, W) on the training device, in the network's memory format."""
        return image.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ----- the loop ------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Train until ``train.steps`` (or a preemption signal); returns the summary."""
        train = self.config.train
        meter = ThroughputMeter(self.distributed, self.config.data, train.accumulation_steps)
        stopped_by = None
        self._say(f"training from step {self.step} to {train.steps} on {self.distributed.world_size} process(es), "
                  f"{self.device}; run directory {self.run_dir}")  # fmt: skip
        shown = None if self.target_spacing is None else "x".join(f"{s:g}" for s in self.target_spacing)
        self._say("patches of the cases' own voxels (native spacing)" if shown is None else
                  f"patches at target spacing {shown} mm (z, y, x), resampled per patch")  # fmt: skip
        try:
            while self.step < train.steps:
                loss, finite = self.train_step()
                preempted, diverged = self._agree(self.preemption.requested, not finite)
                if diverged:
                    raise TrainingError(self._divergence_message(loss))
                grad_norm = self.optimizer_step()
                self.step += 1
                meter.add(loss, self.last_loss_terms, grad_norm)
                if self.step % train.log_every == 0 or self.step == train.steps:
                    self.logger.log(meter.collect(self.scheduler.get_last_lr()[0]), self.step)
                    self._say(meter.last_line(self.step, train.steps))
                validating = self._validation_due() and not preempted  # a stopping job saves at once
                if self.health.due(self.step, validating):
                    self.logger.log(self.health.check(self.network, self.last_image, self.step), self.step)
                if validating:
                    self.validate()
                if self.step % train.checkpoint_every == 0 or self.step == train.steps or preempted:
                    self.save_checkpoint()
                self._maybe_crash()
                if preempted:
                    stopped_by = self.preemption.signal_name
                    self._say(f"{stopped_by}: stopped at step {self.step} after saving a checkpoint")
                    break
            if self.last_validation is None and self.validator is not None and stopped_by is None:
                self.validate()  # resumed at the last step: the summary still reports validation Dice
        except BaseException:
            self.logger.close()  # what was logged up to the failure reaches W&B
            raise
        finally:
            self.loader.close()
            self.preemption.restore(preempted=stopped_by is not None)
        return self._finish(stopped_by, meter)

    def train_step(self) -> tuple[float, bool]:
        """Forward and backward over ``accumulation_steps`` micro-batches; DDP all-reduces on the last."""
        accumulation = self.config.train.accumulation_steps
        self.model.train()
        total, terms = 0.0, {"dice": 0.0, "ce": 0.0}
        for micro_step in range(accumulation):
            batch = next(self.loader)
            image = self.last_image = self.to_device(batch["image"])
            label = batch["label"].to(self.device, non_blocking=True)
            last = micro_step == accumulation - 1
            sync = self.model.no_sync() if self.distributed.active and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    parts = self.loss.terms(self.model(image), label)
                    loss = (self.loss.dice_weight * parts["dice"] + self.loss.ce_weight * parts["ce"]) / accumulation
                self.scaler.scale(loss).backward()
            loss_value, dice, ce = torch.stack([loss.detach(), parts["dice"].detach(), parts["ce"].detach()]).tolist()
            total += loss_value  # one device sync for the loss and its terms
            terms["dice"] += dice / accumulation
            terms["ce"] += ce / accumulation
        self.last_loss_terms = terms
        return total, math.isfinite(total)

    def optimizer_step(self) -> torch.Tensor:
        """Clip (``train.clip_grad_norm`` > 0) and step; returns the gradient norm before clipping (unscaled), a
        scalar tensor on the device (read when metrics are logged, not every step: no device sync here)."""
        self.scaler.unscale_(self.optimizer)
        parameters = [p for p in self.network.parameters() if p.grad is not None]
        if self.config.train.clip_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(parameters, self.config.train.clip_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach()

    def _agree(self, preempted: bool, diverged: bool) -> tuple[bool, bool]:
        """Both flags as the maximum over all ranks: every rank stops (or fails) after the same step."""
        flags = torch.tensor([float(preempted), float(diverged)], device=self.device)
        flags = self.distributed.all_reduce(flags, op="max").tolist()
        return flags[0] > 0, flags[1] > 0

    def _divergence_message(self, loss: float) -> str:
        latest = self.checkpoints.steps()
        kept = f"the last good checkpoint is step {latest[-1]}" if latest else "no checkpoint was written yet"
        return (f"train/loss is not finite at step {self.step + 1} (this rank: {loss}); stopped before the "
                f"optimizer step, {kept} in {self.checkpoints.directory}. Lower train.lr or raise "
                f"train.warmup_steps, or check the data")  # fmt: skip

    def _validation_due(self) -> bool:
        return self.validator is not None and self.validator.should_validate(self.step, self.config.train.steps)

    def validate(self) -> ValidationResult:
        result = self.validator.run(self.network, self.config.wandb.image_panels)
        started = time.perf_counter()
        self.logger.log(result.metrics(), self.step)
        self.logger.log_images(result.panels, self.step)
        self.logger.log_tables(result.tables(list(self.dataset.class_names)), self.step)
        self.dashboard_seconds += result.dashboard_seconds + time.perf_counter() - started
        dice = ", ".join(f"{name} {value:.3f}" for name, value in result.dice.items())
        self._say(f"step {self.step}: validation Dice mean {result.dice_mean:.3f} ({dice})")
        self.last_validation, self.last_validation_step = result, self.step
        dice_mean = float(result.dice_mean)
        if math.isfinite(dice_mean) and (self.best_validation is None or dice_mean > self.best_validation[0]):
            self.best_validation = (dice_mean, self.step)
            self.logger.update_summary({"val/best_dice_mean": dice_mean, "val/best_step": self.step})
        return result

    def _run_config(self, train_cases: list[str], validation_cases: list[str]) -> dict:
        """The W&B run config: the config sections, the git revision, the dataset's fingerprint and the network's
        resolved layout (``run_fingerprint``)."""
        return {
            **to_dict(self.config),
            "git_revision": self.identity.get("git_revision"),
            "dataset": dataset_fingerprint(self.dataset, train_cases, validation_cases, self.target_spacing),
            "network": network_layout(self.network, self.config.model.block_depth),
        }

    # ----- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """All ranks call this (RNG states are gathered); the main rank writes it, then logs it as a W&B model
        artifact when ``wandb.log_checkpoints`` asks for it (the state names that artifact version in
        ``wandb_artifact``, so the decision comes first)."""
        rng_states = self.distributed.gather_objects(capture_rng_state(self.device))
        path = None
        if self.distributed.is_main:
            aliases = self._checkpoint_aliases()
            run_id = self.identity["wandb_id"]
            state = {
                "step": self.step,
                "model": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "data": self.loader.state_dict(),
                "rng": rng_states,
                "config": to_dict(self.config),
                "class_names": list(self.dataset.class_names),
                "network": {"in_channels": 1, "num_classes": self.dataset.num_classes,
                            **self.config.model.network_kwargs()},
                "patch_size": list(self.config.data.patch_size),
                "target_spacing": None if self.target_spacing is None else list(self.target_spacing),
                "image_interpolation": self.config.data.image_interpolation,
                "training_spacing": (self.dataset.statistics.get("spacing") or {}).get("median"),
                "normalization": self.normalization.to_dict(),
                "wandb_id": self.identity["wandb_id"],
                "git_revision": self.identity.get("git_revision"),
                "best_validation": None if self.best_validation is None else list(self.best_validation),
                "wandb_artifact": None if aliases is None else artifact_reference(run_id, self.step),
            }  # fmt: skip
            path = self.checkpoints.save(self.step, state)
            if aliases is not None:
                metrics = self.last_validation.metrics() if self.last_validation_step == self.step else None
                started = time.perf_counter()
                self.logger.log_checkpoint(path, artifact_name(run_id), aliases, checkpoint_metadata(state, metrics))
                self.dashboard_seconds += time.perf_counter() - started  # W&B copies the file to its staging area
        self.distributed.barrier()
        return path

    def _checkpoint_aliases(self) -> list[str] | None:
        """The artifact aliases of the checkpoint of this step, or None when it is not logged (W&B off, or
        ``wandb.log_checkpoints`` skips it): "best" when this step's validation set the best Dice so far."""
        if not self.logger.active:
            return None
        best_step = None if self.best_validation is None else self.best_validation[1]
        new_best = best_step == self.step == self.last_validation_step
        final = self.step >= self.config.train.steps
        return checkpoint_aliases(self.config.wandb.log_checkpoints, self.step, final, new_best)

    def _prepare_run(self) -> dict:
        identity = prepare_run_directory(self.run_dir, self.config) if self.distributed.is_main else None
        return self.distributed.broadcast_object(identity)

    def _find_checkpoint(self) -> tuple[str, dict] | None:
        """The newest readable checkpoint of the run directory and its state on every rank, or None.

        Rank 0 picks it and checks that this start's config may resume it (``check_resume_config``); a
        refusal, or checkpoint files of which none is readable, reach every rank as the same error.
        """
        found, refusal = None, None
        if self.distributed.is_main:
            try:
                found = self.checkpoints.load_latest()
                if found is not None:
                    check_resume_config(found[1].get("config"), self.config, f"checkpoint {found[0]}")
            except ValueError as error:
                refusal = str(error)
        path, refusal = self.distributed.broadcast_object((None if found is None else str(found[0]), refusal))
        if refusal is not None:
            raise TrainingError(refusal)
        if path is None:
            return None
        return path, found[1] if found is not None else load_checkpoint(path)

    def _resume(self, path: str, state: dict) -> None:
        """Continue from the checkpoint ``_find_checkpoint`` picked (the same file on every rank)."""
        check_classes(self.config, state.get("class_names", []), f"checkpoint {path}")
        if list(state.get("class_names", [])) != list(self.dataset.class_names):
            raise TrainingError(f"checkpoint {path}: classes {state.get('class_names')} differ from the dataset's "
                                f"{self.dataset.class_names}; use another run.dir for a new dataset")  # fmt: skip
        try:
            self.network.load_state_dict(state["model"])
        except RuntimeError as error:
            raise TrainingError(f"checkpoint {path}: does not fit the [model] section of the config "
                                f"({str(error).splitlines()[0]})") from None  # fmt: skip
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The next step's LR from this start's schedule (the same value unless train.steps changed on resume).
        epoch = self.scheduler.last_epoch
        for group, base_lr, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                          self.scheduler.lr_lambdas, strict=True):  # fmt: skip
            group["lr"] = base_lr * factor(epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["data"])
        rng = state.get("rng") or []
        if len(rng) == self.distributed.world_size:
            restore_rng_state(rng[self.distributed.rank], self.device)
        self.step = int(state["step"])
        best = state.get("best_validation")
        self.best_validation = None if best is None else (float(best[0]), int(best[1]))
        self.identity = {**self.identity, "wandb_id": state.get("wandb_id") or self.identity["wandb_id"]}
        self._say(f"resumed from {path} at step {self.step}")

    def _maybe_crash(self) -> None:
        target = os.environ.get(CRASH_ENV)
        if not target or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        rank, step = (int(part) for part in target.split(":"))
        if rank == self.distributed.rank and step == self.step:
            self._say(f"{CRASH_ENV}: rank {rank} exits abruptly after step {step}", every_rank=True)
            os._exit(1)

    # ----- end of run ----------------------------------------------------------------------------

    def _finish(self, stopped_by: str | None, meter: ThroughputMeter) -> dict:
        summary = {
            "step": self.step,
            "steps": self.config.train.steps,
            "completed": self.step >= self.config.train.steps,
            "stopped_by": stopped_by,
            "world_size": self.distributed.world_size,
            "device": str(self.device),
            "run_dir": str(self.run_dir),
            "checkpoints": str(self.checkpoints.directory),
            "latest_checkpoint": str(self.checkpoints.directory / f"step-{self.step}.pt"),
            "wandb_id": self.identity["wandb_id"],
            **meter.totals(),
        }
        summary.update(self.health.last)
        summary["dashboard_seconds"] = self.dashboard_seconds  # W&B panels and tables, a share of train_seconds
        if self.last_validation is not None:
            summary["val/dice_mean"] = self.last_validation.dice_mean
            summary.update({f"val/dice/{k}": v for k, v in self.last_validation.dice.items()})
        if self.best_validation is not None:
            summary["val/best_dice_mean"], summary["val/best_step"] = self.best_validation
        self.logger.close()
        if isinstance(self.logger, WandbLogger) and self.logger.run_id is not None:
            summary["wandb_mode"] = self.logger.mode
            summary["wandb_dir"] = str(self.logger.files_dir / "wandb")
            if self.logger.mode == "offline":
                shared = self.config.wandb.dir is not None  # other runs' files may be there too
                summary["wandb_sync"] = sync_command(self.logger.files_dir, self.logger.run_id if shared else None)
        if self.distributed.is_main:
            write_summary(self.run_dir, summary)
        return summary

    def _say(self, text: str, every_rank: bool = False) -> None:
        if every_rank or self.distributed.is_main:
            prefix = f"[rank {self.distributed.rank}] " if every_rank else ""
            print(f"{prefix}{text}", flush=True)
