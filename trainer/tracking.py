"""Where a run's numbers go: `metrics.jsonl` (one JSON object per optimizer step) and Weights & Biases.

W&B never fails a run: `online` without an API key falls back to `offline`, and any error while
starting or logging disables W&B with one warning. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from trainer.config import WandbConfig


def write_text_atomically(path: Path, text: str) -> None:
    """Readers never see a half-written file: write beside it, then rename over it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_json_atomically(path: Path, data) -> None:
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


class MetricsFile:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():  # drop steps past the checkpoint we resume from: they are about to be redone
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in lines))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def last_recorded(path: Path, key: str) -> float | None:
    """The last value of `key` in a metrics.jsonl; None when no step recorded it."""
    if not path.exists():  # e.g. a run resumed from the checkpoint of its last step: nothing left to train
        return None
    values = [row[key] for row in map(json.loads, path.read_text().splitlines()) if key in row]
    return values[-1] if values else None


class WandbRun:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, run_id: str | None, name: str):
        self.run = None
        if cfg.mode == "disabled":
            return
        mode = cfg.mode
        if mode == "online" and not os.environ.get("WANDB_API_KEY") and not _has_netrc_login():
            print("wandb: no API key found, logging offline", file=sys.stderr)
            mode = "offline"
        try:
            self.run = self._init(mode, cfg, run_dir, config, run_id, name)
        except Exception as err:  # W&B must never take a training run down
            if mode == "online":  # e.g. no network: keep the history locally instead
                warnings.warn(f"wandb online failed ({err}); logging offline", stacklevel=2)
                try:
                    self.run = self._init("offline", cfg, run_dir, config, run_id, name)
                except Exception as err2:
                    warnings.warn(f"wandb disabled: {err2}", stacklevel=2)
            else:
                warnings.warn(f"wandb disabled: {err}", stacklevel=2)

    @staticmethod
    def _init(mode: str, cfg: WandbConfig, run_dir: Path, config: dict, run_id: str | None, name: str):
        import wandb

        return wandb.init(
            mode=mode,
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            id=run_id,
            name=name,
            resume="allow",
            settings=wandb.Settings(init_timeout=120, console="off", silent=True),
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    @property
    def offline_dir(self) -> str | None:
        return None if self.run is None else self.run.dir

    def log(self, record: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(record, step=step)
        except Exception as err:
            warnings.warn(f"wandb disabled: {err}", stacklevel=2)
            self.run = None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as err:
                warnings.warn(f"wandb finish failed: {err}", stacklevel=2)


def _has_netrc_login() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
