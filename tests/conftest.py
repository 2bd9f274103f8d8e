"""Shared fixtures: the repository's configs composed for a test, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from visual_search.config import register_configs

REPO = Path(__file__).resolve().parents[1]
# Real inputs live outside the repository: ../shared beside it unless the variables say otherwise.
SHARED = REPO.parent / "shared"
DATA = Path(os.environ.get("VISUAL_SEARCH_DATA", SHARED / "data")).expanduser().resolve()
MODELS = Path(os.environ.get("VISUAL_SEARCH_MODELS", SHARED / "models")).expanduser().resolve()
CASES = Path(os.environ.get("VISUAL_SEARCH_CASES", SHARED / "cases")).expanduser().resolve()
# CI sets this so that a missing input fails the run instead of quietly skipping tests.
REQUIRE_INPUTS = os.environ.get("VISUAL_SEARCH_REQUIRE_INPUTS") == "1"

register_configs()


def needs(path: Path) -> Path:
    """Skip the calling test when a real input is absent (e.g. a clone without ../shared)."""
    if not path.exists():
        message = (
            f"{path} not found: set VISUAL_SEARCH_DATA, VISUAL_SEARCH_MODELS or "
            "VISUAL_SEARCH_CASES (default: ../shared beside the repository)"
        )
        if REQUIRE_INPUTS:
            pytest.fail(message)
        pytest.skip(message)
    return path


def embedder_config(**overrides):
    """The torchvision embedder config with the shared weights file, plus `overrides`."""
    from omegaconf import OmegaConf

    from visual_search.config import EmbedderConfig

    cfg = OmegaConf.structured(EmbedderConfig)
    cfg.local_files = {"IMAGENET1K_V1": "mobilenet_v2_imagenet.pth"}
    cfg.preprocess_from = "IMAGENET1K_V1"
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def compose_config(tmp_path, monkeypatch):
    """Compose the real configs with overrides; caches and MLflow go to a temporary folder."""
    monkeypatch.setenv("VISUAL_SEARCH_DATA", str(DATA))
    monkeypatch.setenv("VISUAL_SEARCH_MODELS", str(MODELS))
    monkeypatch.setenv("VISUAL_SEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
            cfg = compose(
                "config", overrides=[*overrides, f"tracking.artifact_root={tmp_path}/art"]
            )
        return cfg

    return _compose
