"""Metric logging: a small logger interface and its Weights & Biases implementation.

Only rank 0 logs; other ranks get a ``NullLogger``. ``wandb`` is imported lazily, inside ``WandbLogger``, so
that importing this module (and the config that holds a ``WandbConfig``) stays light. W&B never stops training:
any error it raises is reported by one warning and the logger turns itself off.
"""

from __future__ import annotations

import netrc
import os
import secrets
import shlex
import string
import time
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

MODES = ("auto", "online", "offline", "disabled")
CHECKPOINT_POLICIES = ("best", "last", "all", "none")
MAX_IMAGE_PANELS = 48
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}
_PROJECT_FORBIDDEN = "/\\#?%:"  # W&B rejects these in project names


@dataclass(frozen=True)
class WandbConfig:
    mode: str = "auto"  #: auto: WANDB_MODE if set, else online with W&B credentials, else offline
    project: str = "iunet3d"
    entity: str | None = None  #: team or user; None: the default entity of the credentials
    name: str | None = None  #: display name; None: W&B picks one
    group: str | None = None
    tags: tuple[str, ...] = ()
    #: image cells per validation (and per prediction job): three planes through the largest error of the worst
    #: cases, at most MAX_IMAGE_PANELS (W&B advises fewer than 50 images per step); 0: tables without images
    image_panels: int = 8
    #: checkpoints logged as versions of one W&B model artifact per training run, ``model-<run id>`` (each copied
    #: into W&B's staging area when logged, so offline runs keep them for ``wandb sync`` after the run directory
    #: rotated them away). "best": a checkpoint saved at a step whose validation ``val/dice_mean`` beats every
    #: earlier one (aliases "best", "step-<N>"), and the final checkpoint (step == train.steps; aliases "last",
    #: "step-<N>"; one version with "best" and "last" when it is both); "last": the final one only (also "best" when
    #: its validation is the best); "all": every saved checkpoint, with "best"/"last" where they apply; "none": none
    log_checkpoints: str = "best"
    #: where W&B writes its files (``wandb/offline-run-*``); None: the run directory. A directory outside the run
    #: directory keeps W&B's files apart (e.g. on a file system the login node can read for ``wandb sync``).
    dir: str | None = None
    #: seconds ``wandb.init`` may take (online: until the server answers); then one warning, and training goes on
    #: without W&B
    init_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"wandb.mode: expected one of {MODES}, got {self.mode!r}")
        if not self.project or len(self.project) > 128 or any(c in _PROJECT_FORBIDDEN for c in self.project):
            raise ValueError(
                f"wandb.project: expected 1 to 128 characters without {_PROJECT_FORBIDDEN}, got {self.project!r}"
            )
        for i, tag in enumerate(self.tags):
            if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
                raise ValueError(f"wandb.tags[{i}]: expected a string of 1 to 64 characters, got {tag!r}")
        if not 0 <= self.image_panels <= MAX_IMAGE_PANELS:
            raise ValueError(f"wandb.image_panels: expected an integer from 0 to {MAX_IMAGE_PANELS} (W&B advises fewer "
                             f"than 50 images per step), got {self.image_panels}")  # fmt: skip
        if self.log_checkpoints not in CHECKPOINT_POLICIES:
            raise ValueError(f"wandb.log_checkpoints: expected one of {CHECKPOINT_POLICIES}, got "
                             f"{self.log_checkpoints!r}")  # fmt: skip
        if self.dir is not None and not str(self.dir).strip():
            raise ValueError("wandb.dir: expected a directory path or no value, got an empty string")
        if not self.init_timeout > 0:
            raise ValueError(f"wandb.init_timeout: expected a positive number of seconds, got {self.init_timeout}")


def resolve_mode(config: WandbConfig) -> str:
    """``"online"``, ``"offline"`` or ``"disabled"``. An explicit mode wins; ``"auto"`` takes WANDB_MODE when set,
    else ``"online"`` when W&B credentials exist (WANDB_API_KEY, or a netrc entry for the W&B host), else
    ``"offline"``."""
    if config.mode != "auto":
        return config.mode
    if env_mode := os.environ.get("WANDB_MODE", "").strip():
        if env_mode not in _ENV_MODES:
            raise ValueError(f"WANDB_MODE: expected one of {sorted(_ENV_MODES)}, got {env_mode!r}")
        return _ENV_MODES[env_mode]
    return "online" if _has_credentials() else "offline"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


@dataclass
class SegmentationPanel:
    """One validation image: a CT slice with ground-truth and predicted class masks.

    image: (H, W) float, any range (scaled to 0..255 for display); label, prediction: (H, W) integer classes;
    class_names[i] names class i.
    """

    key: str  #: history key, e.g. "val/panel/case_003"
    image: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    class_names: list[str]
    caption: str = ""

    def __post_init__(self) -> None:
        shapes = {np.shape(self.image), np.shape(self.label), np.shape(self.prediction)}
        if len(shapes) != 1 or len(np.shape(self.image)) != 2:
            raise ValueError(f"SegmentationPanel {self.key!r}: expected one (H, W) shape for all three, got {shapes}")

    @classmethod
    def middle_slice(cls, key: str, image, label, prediction, class_names: list[str], caption: str = ""):
        """The panel of the middle z slice of volumes ``image``, ``label``, ``prediction``: (D, H, W)."""
        z = np.shape(image)[0] // 2
        return cls(key, np.asarray(image[z]), np.asarray(label[z]), np.asarray(prediction[z]), class_names, caption)

    def to_wandb(self):
        import wandb

        image = np.nan_to_num(np.asarray(self.image, dtype=np.float64))
        low, high = float(image.min()), float(image.max())
        scaled = (image - low) * (255.0 / (high - low)) if high > low else np.zeros_like(image)
        class_labels = dict(enumerate(self.class_names))
        masks = {
            "ground_truth": {"mask_data": np.asarray(self.label, dtype=np.int64), "class_labels": class_labels},
            "prediction": {"mask_data": np.asarray(self.prediction, dtype=np.int64), "class_labels": class_labels},
        }
        return wandb.Image(np.round(scaled).astype(np.uint8), masks=masks, caption=self.caption)


class MetricLogger(ABC):
    """Where training metrics go. ``step`` is the optimizer step; steps must not go back."""

    @property
    @abstractmethod
    def run_id(self) -> str | None:
        """The id to store in checkpoints and pass back on resume (None: nothing to resume)."""

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_images(self, panels: list[SegmentationPanel], step: int) -> None: ...

    @abstractmethod
    def log_tables(self, tables: list, step: int) -> None:
        """Log tables (each with a ``key`` and ``to_wandb()``, e.g. ``CaseTable``, ``ClassSummaryTable``)."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    def active(self) -> bool:
        """Whether calls still reach W&B (False: no W&B run, or it failed or was closed)."""
        return False

    @abstractmethod
    def log_checkpoint(self, path: Path, name: str, aliases: list[str], metadata: dict) -> None:
        """Log the file ``path`` as a new version of the model artifact ``name`` with ``aliases`` and ``metadata``
        (JSON values); the file is copied at once, so it may be removed afterwards."""

    @abstractmethod
    def update_summary(self, values: dict) -> None:
        """Set run summary values (e.g. the best validation so far); later updates of a key win."""

    @abstractmethod
    def use_checkpoint(self, reference: str) -> None:
        """Declare the model artifact ``reference`` ("[entity/]project/model-<id>:step-<N>") an input of this run,
        so the dashboard links the training that made it to this run."""


class NullLogger(MetricLogger):
    """Logs nothing: ranks other than 0, and W&B mode "disabled"."""

    @property
    def run_id(self) -> str | None:
        return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_images(self, panels: list[SegmentationPanel], step: int) -> None:
        pass

    def log_tables(self, tables: list, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], metadata: dict) -> None:
        pass

    def update_summary(self, values: dict) -> None:
        pass

    def use_checkpoint(self, reference: str) -> None:
        pass


class WandbLogger(MetricLogger):
    """A W&B run under ``run_dir/wandb/`` (under ``wandb.dir``/wandb when that is set). Resume: pass the stored
    ``run_id`` and the restored step as ``resume_step``; the run continues (online: the same run; offline: a new
    ``offline-run-*`` folder with the same id, which ``wandb sync`` appends). Steps lower than ``resume_step`` or
    than the last logged step are dropped with one warning (W&B would drop them silently)."""

    def __init__(self, config: WandbConfig, run_dir: Path, run_config: dict, run_id: str | None = None,
                 resume_step: int = 0, job_type: str | None = None) -> None:  # fmt: skip
        self.mode = resolve_mode(config)
        self.run_dir = Path(run_dir)
        self.files_dir = Path(config.dir).expanduser() if config.dir else self.run_dir  #: W&B writes ``wandb/`` here
        self._run = None
        self._run_id: str | None = None
        self._failed = False
        self._min_step = resume_step
        self._warned_step = False
        started = time.monotonic()
        try:
            import wandb

            self.files_dir.mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(
                project=config.project, entity=config.entity, name=config.name, group=config.group,
                tags=list(config.tags) or None, config=run_config, dir=str(self.files_dir),
                id=run_id or generate_run_id(), resume="allow", mode=self.mode, job_type=job_type,
                # console="off": no stdout/stderr capture (torchrun and tqdm own the terminal);
                # finish_previous: never get back another run still active in this process.
                settings=wandb.Settings(console="off", reinit="finish_previous", init_timeout=config.init_timeout),
            )  # fmt: skip
            self._run_id = self._run.id
            # Online resume: W&B continues after its last step, so earlier ones would be dropped.
            self._min_step = max(resume_step, int(getattr(self._run, "starting_step", 0) or 0))
        except Exception as error:
            what = "could not start a run"
            if time.monotonic() - started >= config.init_timeout:
                what += f" within wandb.init_timeout = {config.init_timeout:g} s"
            self._fail(what, error)

    @property
    def run_id(self) -> str | None:
        """The run's id (kept after ``close``); None when the run could not start."""
        return self._run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._accepts(step):
            self._call("could not log metrics", lambda: self._run.log(dict(metrics), step=step))

    def log_images(self, panels: list[SegmentationPanel], step: int) -> None:
        if panels and self._accepts(step):
            self._call("could not log images", lambda: self._run.log({p.key: p.to_wandb() for p in panels}, step=step))

    def log_tables(self, tables: list, step: int) -> None:
        if tables and self._accepts(step):
            self._call("could not log tables", lambda: self._run.log({t.key: t.to_wandb() for t in tables}, step=step))

    def close(self) -> None:
        """Finish the run (flushes and, online, uploads). Safe to call twice."""
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish()
            except Exception as error:
                self._fail("could not finish the run", error)

    @property
    def active(self) -> bool:
        return self._run is not None and not self._failed

    def log_checkpoint(self, path: Path, name: str, aliases: list[str], metadata: dict) -> None:
        """A ``type="model"`` artifact version holding ``path`` under its file name. ``add_file``'s default
        "mutable" policy copies the file into W&B's staging directory (``WANDB_DATA_DIR``) before this returns:
        offline, ``wandb sync`` uploads that copy, whatever became of the checkpoint since."""
        if not self.active:
            return

        def log() -> None:
            import wandb

            artifact = wandb.Artifact(name, type="model", metadata=dict(metadata))
            artifact.add_file(str(path), name=Path(path).name, policy="mutable")
            self._run.log_artifact(artifact, aliases=list(aliases))

        self._call(f"could not log checkpoint {path} as artifact {name}", log)

    def update_summary(self, values: dict) -> None:
        if self.active:
            self._call("could not update the run summary", lambda: self._run.summary.update(dict(values)))

    def use_checkpoint(self, reference: str) -> None:
        """Online: ``run.use_artifact(reference)``. W&B refuses that in offline mode (lineage is drawn by its
        server), so an offline run only says where the reference is kept (its config, put there by the caller)."""
        if not self.active:
            return
        if self.mode == "offline":
            print(f"W&B offline: this run's config records the checkpoint artifact {reference}; W&B links it as "
                  "an input only in online runs", flush=True)  # fmt: skip
            return
        self._call(f"could not declare the checkpoint artifact {reference}", lambda: self._run.use_artifact(reference))

    def _accepts(self, step: int) -> bool:
        if self._run is None or self._failed:
            return False
        if step < self._min_step:
            if not self._warned_step:
                self._warned_step = True
                warnings.warn(
                    f"W&B: dropped step {step}, lower than step {self._min_step} already logged or resumed from "
                    "(W&B ignores steps that go back); further drops are not reported",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return False
        self._min_step = step
        return True

    def _call(self, what: str, function) -> None:
        try:
            function()
        except Exception as error:
            self._fail(what, error, stacklevel=4)

    def _fail(self, what: str, error: Exception, stacklevel: int = 3) -> None:
        if not self._failed:
            warnings.warn(
                f"W&B: {what} ({type(error).__name__}: {error}); training goes on without W&B logging",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        self._failed = True


def generate_run_id(length: int = 8) -> str:
    """A random run id of lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(length))


def create_logger(config: WandbConfig, run_dir: Path, run_config: dict, run_id: str | None = None,
                  resume_step: int = 0, rank: int = 0, job_type: str | None = None) -> MetricLogger:  # fmt: skip
    """A ``WandbLogger`` on rank 0; a ``NullLogger`` on other ranks and when the mode resolves to "disabled"
    (so no ``wandb`` import, no files, and ``run_id`` None: a later resume with W&B on starts a new run)."""
    if rank != 0 or resolve_mode(config) == "disabled":
        return NullLogger()
    return WandbLogger(config, run_dir, run_config, run_id=run_id, resume_step=resume_step, job_type=job_type)


def sync_command(files_dir: Path, run_id: str | None = None) -> str:
    """The shell command that uploads the offline runs under ``files_dir/wandb`` (of ``run_id`` only, when given:
    a ``wandb.dir`` shared by several runs), in the order they were written."""
    pattern = f"offline-run-*-{run_id}" if run_id else "offline-run-*"
    return f"wandb sync {shlex.quote(str(Path(files_dir) / 'wandb'))}/{pattern}"
