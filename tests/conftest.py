"""Test setup: 8 simulated CPU devices, set before jax is first imported anywhere; the shared
`folders` fixture (tiny HF students and a JSONL of records, built once per test module)."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from test_train import make_folders  # imported here: jax only after the flags above

    return make_folders(tmp_path_factory)
