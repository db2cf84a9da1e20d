"""The package's public surface (`ctxjax.__all__`, README's "Public API"): every name resolves to
the object its submodule defines, and `import ctxjax` alone imports no submodule (the names load
on first use), checked in a fresh interpreter's `sys.modules`."""

import importlib
import os
import re
import subprocess
import sys
import types

import pytest

import ctxjax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_is_unique_and_every_name_resolves():
    assert len(ctxjax.__all__) == len(set(ctxjax.__all__))
    for name in ctxjax.__all__:
        value = getattr(ctxjax, name)
        if isinstance(value, types.ModuleType):
            assert value is importlib.import_module(f"ctxjax.{name}")
            continue
        home = f"ctxjax.{ctxjax._NAMES[name]}"
        # The very object of the submodule that defines it (not a copy, not a re-import).
        assert value is getattr(importlib.import_module(home), name), name
        assert getattr(value, "__module__", home) == home, name
    assert set(ctxjax.__all__) <= set(dir(ctxjax))


def test_names_resolve_to_their_modules():
    from ctxjax import config, hf, losses, sampling, step

    assert ctxjax.load_model is hf.load_model
    assert ctxjax.load_config is config.load_config
    assert ctxjax.OPD_LOSSES is losses.OPD_LOSSES
    assert ctxjax.generate is sampling.generate
    assert ctxjax.make_train_step is step.make_train_step


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        ctxjax.not_a_name  # noqa: B018
    assert not hasattr(ctxjax, "_private")


def test_readme_public_api_lists_every_name():
    """README's "Public API" section names every name `__all__` holds, and no other."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Public API", 1)[1].split("\n## ", 1)[0]
    listed = section.split("`import ctxjax` gives", 1)[1]
    names = set(re.findall(r"`([A-Za-z_]+)`", listed))
    assert names == set(ctxjax.__all__)


def _modules_after(code: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        cwd=ROOT,
    ).stdout
    return set(out.split())


def test_import_ctxjax_loads_no_submodule_and_no_jax():
    loaded = _modules_after("import ctxjax")
    assert {m for m in loaded if m.startswith("ctxjax")} == {"ctxjax"}
    assert not {"jax", "flax", "numpy", "transformers"} & loaded
    # The first use imports what it needs, and only then.
    loaded = _modules_after("import ctxjax\nctxjax.masked_mean")
    assert {"ctxjax.losses", "jax"} <= loaded
    assert "ctxjax.train" not in loaded and "ctxjax.hf" not in loaded
