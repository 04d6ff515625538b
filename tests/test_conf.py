"""The shipped Hydra config group `ttt` builds valid TTTConfigs."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.ttt import TTTConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("name", ["none", "inplace", "ntp", "recon"])
def test_ttt_group_builds_a_config(name):
    values = OmegaConf.to_container(OmegaConf.load(CONF / "ttt" / f"{name}.yaml"))
    cfg = TTTConfig(**values)
    assert cfg.method == name
